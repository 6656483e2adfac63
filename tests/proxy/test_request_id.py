"""Request ids at the conductor: the client's when safe, unique while in flight."""

from __future__ import annotations

import re

from mooncake_vllm.proxy.request_id import RequestIds


def test_the_clients_id_is_kept_and_a_duplicate_in_flight_gets_a_suffix() -> None:
    ids = RequestIds()
    first = ids.claim("order-42")
    second = ids.claim("order-42")
    assert first == "order-42" and re.fullmatch(r"order-42\.[0-9a-f]{8}", second)
    ids.release(first)
    assert ids.claim("order-42") == "order-42"  # free again once the first has ended
    assert len(ids) == 2


def test_an_id_that_could_forge_log_lines_or_headers_is_replaced() -> None:
    ids = RequestIds()
    for bad in ("two words", "line\nbreak", "x" * 129, "", None):
        rid = ids.claim(bad)
        assert re.fullmatch(r"[0-9a-f]{32}", rid), (bad, rid)
