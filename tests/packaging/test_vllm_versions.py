"""The supported vLLM range: older refused naming both, newer warned about, this one fine."""

from __future__ import annotations

import vllm

from mooncake_vllm import vllm_versions


def test_an_older_vllm_is_refused_naming_both_versions() -> None:
    why = vllm_versions.refusal("0.29.1")
    assert why is not None and "vLLM 0.30 to 0.32" in why and "vLLM 0.29.1" in why
    assert vllm_versions.refusal("0.11.0") is not None


def test_the_tested_range_passes_and_a_newer_one_is_warned_about() -> None:
    for version in ("0.30.0", "0.31.0", "0.32.0", "0.32.1rc1+cpu", vllm.__version__):
        assert vllm_versions.refusal(version) is None
        assert vllm_versions.warning(version) is None
    note = vllm_versions.warning("0.33.0")
    assert note is not None and "make compat" in note
