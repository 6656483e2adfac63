"""`mooncake-vllm proxy` argument checking: bad set-ups are refused with a message naming them."""

from __future__ import annotations

import pytest

from mooncake_vllm.cli import main as cli_main
from mooncake_vllm.proxy.__main__ import parse_args
from mooncake_vllm.proxy.config import ProxyConfigError


@pytest.mark.parametrize("argv,needle", [
    ([], "no instances"),
    (["--prefill", "http://127.0.0.1:1"], "needs at least one of each"),
    (["--both", "127.0.0.1:1"], "expected http://HOST:PORT"),
    (["--both", "http://127.0.0.1:1", "--slo-ttft-s", "0"], "slo_ttft_s=0.0"),
    (["--metadata-server", "zk://h:1"], "metadata_server='zk://h:1'"),
    (["--both", "http://127.0.0.1:1", "--local-prefill-max-tokens", "-1"],
     "local_prefill_max_tokens=-1"),
])
def test_bad_setups_are_refused(argv: list[str], needle: str,
                                capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["proxy", *argv]) == 2
    assert needle in capsys.readouterr().err


def test_unreachable_metadata_server_fails_fast(capsys: pytest.CaptureFixture[str]) -> None:
    from mooncake_vllm.testing.vllm_server import free_port

    assert cli_main(["proxy", "--port", "0", "--metadata-server",
                     f"etcd://127.0.0.1:{free_port()}"]) == 1
    assert "127.0.0.1" in capsys.readouterr().err


def test_secrets_come_from_flags_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from mooncake_vllm.proxy.__main__ import parse_args

    monkeypatch.setenv("MOONCAKE_VLLM_CLUSTER_TOKEN", "cluster-token-from-env")
    monkeypatch.setenv("MOONCAKE_VLLM_ADMIN_TOKEN", "admin-token-from-env")
    monkeypatch.delenv("MOONCAKE_VLLM_UPSTREAM_API_KEY", raising=False)
    cfg = parse_args(["--both", "http://127.0.0.1:1"])
    assert (cfg.cluster_token, cfg.admin_token, cfg.upstream_api_key) == \
        ("cluster-token-from-env", "admin-token-from-env", None)
    cfg = parse_args(["--both", "http://127.0.0.1:1", "--cluster-token", "cluster-token-from-flag",
                      "--upstream-api-key", "k"])
    assert (cfg.cluster_token, cfg.upstream_api_key) == ("cluster-token-from-flag", "k")
    assert cfg.max_concurrent_requests == 1024 and cfg.max_body_bytes == 8 * 1024 * 1024
    # A logged config shows no secret.
    assert "cluster-token-from-flag" not in repr(cfg) and "admin-token-from-env" not in repr(cfg)


@pytest.mark.parametrize("flag", ["--max-concurrent-requests", "--max-body-bytes"])
def test_limits_must_be_positive(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["proxy", "--both", "http://127.0.0.1:1", flag, "0"]) == 2
    assert "must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--cluster-token", "--admin-token"])
def test_short_tokens_are_refused_without_being_shown(flag: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["proxy", "--both", "http://127.0.0.1:1", flag, "short-secret"]) == 2
    err = capsys.readouterr().err
    assert "too short" in err and "short-secret" not in err


@pytest.mark.parametrize("argv,named", [
    (["--slo-itl-s", "soon"], "expected seconds or 'none'"),
    (["--prefill-window-tokens", "many"], "expected a number or 'auto'"),
])
def test_slo_and_override_values_are_checked_by_the_parser(argv: list[str], named: str,
                                                           capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--both", "http://127.0.0.1:1", *argv])
    assert named in capsys.readouterr().err


def test_defaults_plan_by_prediction_and_flags_override() -> None:
    plain = parse_args(["--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2"])
    assert (plain.local_prefill_max_tokens, plain.pipeline_prefill_min_tokens,
            plain.prefill_window_tokens, plain.pipeline_attention_tokens) == (None,) * 4
    assert plain.slo_ttft_s is None and plain.slo_itl_s == 0.1
    given = parse_args(["--both", "http://127.0.0.1:1", "--slo-ttft-s", "2", "--slo-itl-s",
                        "none", "--local-prefill-max-tokens", "0", "--prefill-window-tokens",
                        "auto", "--pipeline-attention-tokens", "1088.5"])
    assert (given.slo_ttft_s, given.slo_itl_s, given.local_prefill_max_tokens) == (2.0, None, 0)
    assert given.prefill_window_tokens is None and given.pipeline_attention_tokens == 1088.5
    with pytest.raises(ProxyConfigError, match="local_prefill_max_tokens=1.5: must be a whole"):
        parse_args(["--both", "http://127.0.0.1:1", "--local-prefill-max-tokens", "1.5"])
