"""`mooncake-vllm proxy` argument checking: bad set-ups are refused with a message naming them."""

from __future__ import annotations

import pytest

from mooncake_vllm.cli import main as cli_main


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
