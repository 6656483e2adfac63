"""Embedded (p2p) mode: no store, descriptors learned from peers, a static topology."""

from __future__ import annotations

import pytest

from mooncake_vllm.metadata import (
    EmbeddedMetadata,
    MalformedValueError,
    MetadataError,
    open_metadata,
)

from .helpers import EventLog, make_info


def test_p2p_is_the_default_and_needs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOONCAKE_VLLM_METADATA_SERVER", raising=False)
    with open_metadata() as md:
        assert isinstance(md, EmbeddedMetadata)
    with open_metadata("p2p", namespace="demo") as md:
        assert isinstance(md, EmbeddedMetadata) and md.namespace == "demo"


def test_segments_are_own_or_learned_from_a_peer() -> None:
    prefill, decode = open_metadata("p2p"), open_metadata("p2p")
    try:
        desc = {"name": "decode-0", "protocol": "tcp", "endpoint": "127.0.0.1:5555",
                "regions": [[4096, 65536]]}
        decode.publish_segment("decode-0", desc)
        assert decode.get_segment("decode-0") == desc
        # Two stores in one process share nothing: p2p has no discovery of its own.
        assert prefill.get_segment("decode-0") is None
        # What the connector does with the descriptor from D's registration message:
        prefill.learn_segment("decode-0", desc)
        assert prefill.get_segment("decode-0") == desc
        prefill.forget_segment("decode-0")
        assert prefill.get_segment("decode-0") is None
        with pytest.raises(MalformedValueError):
            prefill.learn_segment("x", "not a dict")  # type: ignore[arg-type]
        decode.unpublish_segment("decode-0")
        assert decode.get_segment("decode-0") is None
    finally:
        prefill.close()
        decode.close()


def test_static_and_registered_instances_with_watchers() -> None:
    static = [make_info("p0", role="prefill"), make_info("d0", role="decode")]
    md = open_metadata("p2p", instances=static)
    log = EventLog()
    md.watch_instances(log)
    assert log.pairs() == [("put", "d0"), ("put", "p0")]
    assert md.list_instances(role="prefill") == [static[0]]
    both = make_info("b0", role="both")
    md.register_instance(both)
    md.register_instance(both)  # unchanged: no second event
    assert md.list_instances(role="decode") == [both, static[1]]
    assert md.get_instance("b0") == both
    md.deregister_instance("p0")
    md.deregister_instance("unknown")  # nothing to remove, no event
    assert log.pairs() == [("put", "d0"), ("put", "p0"), ("put", "b0"), ("delete", "p0")]
    md.close()
    assert md.list_instances() == []
    with pytest.raises(MetadataError, match="closed"):
        md.register_instance(both)


def test_a_failing_watcher_does_not_break_the_others() -> None:
    md = open_metadata("p2p")
    good = EventLog()

    def broken(event: str, info: object) -> None:
        raise RuntimeError("watcher bug")

    md.watch_instances(broken)
    md.watch_instances(good)
    md.register_instance(make_info("p0"))
    assert good.pairs() == [("put", "p0")]
    md.close()
