"""Faults: a SIGKILLed instance, etcd restarts (same data, and wiped), etcd down at start,
a dead endpoint in the list."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mooncake_vllm.metadata import MetadataUnavailableError, open_metadata
from mooncake_vllm.testing.etcd_server import EtcdServer, free_port

from .helpers import EventLog, make_info, wait_until

pytestmark = pytest.mark.etcd
REGISTRANT = Path(__file__).with_name("registrant.py")


def test_sigkilled_instance_vanishes_from_every_watcher_within_ttl(
    etcd_server: EtcdServer,
) -> None:
    ttl_s = 2
    watchers = [open_metadata(etcd_server.url, ttl_s=5) for _ in range(3)]
    logs = [EventLog() for _ in watchers]
    for md, log in zip(watchers, logs, strict=True):
        md.watch_instances(log)
    proc = subprocess.Popen(
        [sys.executable, str(REGISTRANT), etcd_server.url, "default", "victim", str(ttl_s)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "REGISTERED", f"registrant failed: {line}{proc.stderr.read()}"
        for log in logs:
            wait_until(lambda log=log: log.seen("put", "victim") is not None, 5, "put")
        assert all(md.get_segment("seg-victim") is not None for md in watchers)
        killed_at = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
        for log in logs:
            wait_until(lambda log=log: log.seen("delete", "victim") is not None,
                       ttl_s + 1.5, "delete after SIGKILL")
        delays = [log.seen("delete", "victim") - killed_at for log in logs]  # type: ignore[operator]
        print(f"SIGKILL -> delete seen by watchers after {[round(d, 2) for d in delays]} s "
              f"(TTL {ttl_s} s)")
        assert max(delays) <= ttl_s + 1, delays
        assert all(md.list_instances() == [] for md in watchers)
        assert all(md.get_segment("seg-victim") is None for md in watchers)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        for md in watchers:
            md.close()


@pytest.mark.parametrize("wipe_data", [False, True], ids=["same-data", "wiped-data"])
def test_etcd_restart_serves_from_cache_and_loses_no_registration(
    tmp_path: Path, wipe_data: bool
) -> None:
    ttl_s = 2
    with EtcdServer(tmp_path / "etcd") as etcd:
        a = open_metadata(etcd.url, ttl_s=ttl_s)
        b = open_metadata(etcd.url, ttl_s=ttl_s)
        try:
            a.register_instance(make_info("a0"))
            a.publish_segment("seg-a0", {"name": "seg-a0"})
            b.register_instance(make_info("b0", role="decode"))
            wait_until(lambda: len(a.list_instances()) == 2 and len(b.list_instances()) == 2,
                       5, "both registered")
            log = EventLog()
            b.watch_instances(log)
            old_lease = a.lease_id  # type: ignore[attr-defined]

            etcd.stop()
            wait_until(lambda: not a.online and not b.online, 5,  # type: ignore[attr-defined]
                       "both to notice etcd is gone")
            # Down for longer than the TTL: lookups are answered from the cache meanwhile.
            down_until = time.monotonic() + ttl_s + 1
            while time.monotonic() < down_until:
                assert [i.instance_id for i in a.list_instances()] == ["a0", "b0"]
                assert b.get_segment("seg-a0") == {"name": "seg-a0"}
                time.sleep(0.1)
            # A registration made while etcd is down is kept and written when it is back.
            a.register_instance(make_info("a1", role="both"))

            restarted_at = time.monotonic()
            etcd.restart(wipe_data=wipe_data)
            wait_until(lambda: a.online and b.online, 10, "reconnect")  # type: ignore[attr-defined]
            wait_until(lambda: {i.instance_id for i in b.list_instances()} == {"a0", "a1", "b0"},
                       5, "every registration back in b's view")
            print(f"etcd restart ({'wiped' if wipe_data else 'same data'}): both back "
                  f"{time.monotonic() - restarted_at:.2f} s after etcd started")
            keys = etcd.etcdctl("get", "--prefix", "--keys-only", "/mooncake-vllm/").stdout
            assert sorted(keys.split()) == [
                "/mooncake-vllm/default/instances/a0",
                "/mooncake-vllm/default/instances/a1",
                "/mooncake-vllm/default/instances/b0",
                "/mooncake-vllm/default/segments/seg-a0",
            ]
            assert b.get_segment("seg-a0") == {"name": "seg-a0"}
            if wipe_data:  # the old lease died with the data: a new one was granted
                assert a.lease_id != old_lease  # type: ignore[attr-defined]
            # The leases are renewed again: the records outlive several TTLs.
            time.sleep(2.5 * ttl_s)
            assert {i.instance_id for i in b.list_instances()} == {"a0", "a1", "b0"}
            assert ("put", "a1") in log.pairs()
            if not wipe_data:
                # etcd kept its data: no watcher was ever told an instance went away. (A wiped
                # etcd really is empty until each owner re-puts, so a watcher that reconnects
                # first may see a delete followed by a put.)
                assert not [e for e in log.pairs() if e[0] == "delete"], log.pairs()
        finally:
            a.close()
            b.close()


def test_a_lease_lost_while_etcd_stays_up_is_regranted(etcd_server: EtcdServer) -> None:
    # E.g. an operator revoked it, or the process stalled past its TTL: etcd deleted our keys.
    with open_metadata(etcd_server.url, ttl_s=3) as owner, \
            open_metadata(etcd_server.url, ttl_s=3) as watcher:
        owner.register_instance(make_info("p0"))
        owner.publish_segment("seg-p0", {"name": "seg-p0"})
        wait_until(lambda: watcher.get_instance("p0") is not None, 3, "p0 seen")
        log = EventLog()
        watcher.watch_instances(log)
        assert log.pairs() == [("put", "p0")]
        old_lease = owner.lease_id  # type: ignore[attr-defined]
        etcd_server.etcdctl("lease", "revoke", f"{old_lease:x}")
        wait_until(lambda: log.seen("delete", "p0") is not None, 3, "delete on revoke")
        # The next renewal (every TTL/3) finds the lease gone: new lease, keys written again.
        wait_until(lambda: len([e for e in log.pairs() if e == ("put", "p0")]) == 2, 5,
                   "p0 back under a new lease")
        wait_until(lambda: owner.lease_id != old_lease, 1, "a new lease id")  # type: ignore[attr-defined]
        wait_until(lambda: watcher.get_segment("seg-p0") is not None, 3, "segment back")


def test_etcd_down_at_start_is_a_clear_error_within_seconds() -> None:
    dead = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(MetadataUnavailableError) as err:
        open_metadata(f"etcd://{dead}", timeout_s=2)
    elapsed = time.monotonic() - start
    message = str(err.value)
    assert elapsed < 5, f"took {elapsed:.1f} s"
    assert dead in message
    assert "Connection refused" in message or "UNAVAILABLE" in message
    assert "Check that etcd is running" in message


def test_unroutable_endpoint_fails_by_the_deadline() -> None:
    # 192.0.2.0/24 is TEST-NET-1: never routed, so the connect hangs until our deadline.
    start = time.monotonic()
    with pytest.raises(MetadataUnavailableError, match="192.0.2.1:2379"):
        open_metadata("etcd://192.0.2.1:2379", timeout_s=1)
    assert time.monotonic() - start < 4


def test_several_endpoints_one_dead_one_alive(etcd_server: EtcdServer) -> None:
    dead = f"127.0.0.1:{free_port()}"
    url = f"etcd://{dead},{etcd_server.endpoint}"
    with open_metadata(url, ttl_s=5) as md, open_metadata(etcd_server.url, ttl_s=5) as other:
        assert md.endpoint == etcd_server.endpoint  # type: ignore[attr-defined]
        md.register_instance(make_info("p0"))
        wait_until(lambda: other.get_instance("p0") is not None, 5, "discovery via alive one")


def test_a_deleted_segment_key_is_still_answered_until_a_new_one(
        etcd_server: EtcdServer) -> None:
    """A segment's key gone (a lapsed lease on a starved host; here an operator's delete):
    the peer that writes into it still finds its last descriptor, since it asks only when the
    segment's owner has just registered a transfer; the instance record gets no such grace."""
    with open_metadata(etcd_server.url, ttl_s=3) as owner, \
            open_metadata(etcd_server.url, ttl_s=3) as writer:
        owner.register_instance(make_info("d0"))
        owner.publish_segment("seg-d0", {"name": "seg-d0", "port": 1})
        wait_until(lambda: writer.get_segment("seg-d0") is not None, 3, "seg-d0 seen")
        ns = "/mooncake-vllm/default/"
        etcd_server.etcdctl("del", ns + "segments/seg-d0")
        etcd_server.etcdctl("del", ns + "instances/d0")
        wait_until(lambda: writer.get_instance("d0") is None, 3, "d0's record gone")
        wait_until(lambda: writer.get_segment("seg-d0") is None, 3, "seg-d0's record gone")
        assert writer.last_segment("seg-d0") == {"name": "seg-d0", "port": 1}
        owner.publish_segment("seg-d0", {"name": "seg-d0", "port": 2})  # a restart's record
        wait_until(lambda: writer.last_segment("seg-d0") == {"name": "seg-d0", "port": 2}, 3,
                   "the new descriptor")
