"""The non-overlapped measurement is a benchmark hook in P's environment, not a setting."""

from __future__ import annotations

import pytest

from mooncake_vllm.connector.stats import NON_OVERLAPPED_ENV

from .test_sides import BS, D_ID, _config, _make_pair


@pytest.mark.parametrize("hooked", [True, False])
def test_non_overlapped_resend_only_with_the_hook(hooked: bool,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    if hooked:
        monkeypatch.setenv(NON_OVERLAPPED_ENV, "1")
    else:
        monkeypatch.delenv(NON_OVERLAPPED_ENV, raising=False)
    for pair in _make_pair(_config(), _config()):
        reg = pair.register("t1", "r-d", [5, 6], 2 * BS)
        pair.p.on_message(D_ID, reg)
        pair.prefill("t1", "r-p", [1, 2], 2 * BS)
        [(_, done)] = pair.p_replies()
        assert done.ok
        resent = pair.p.stats.take().data["non_overlapped_s"]
        assert (len(resent) == 1 and resent[0] > 0) if hooked else resent == []
