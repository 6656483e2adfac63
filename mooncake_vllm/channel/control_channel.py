"""The control channel: one pyzmq thread per worker (or store node).

A ROUTER socket bound at this side's control endpoint receives from peers (registrations on
P, store requests on a store node, nothing unsolicited on D); one DEALER per remote endpoint
sends to peers and receives their replies. Records are those of one protocol (a codec.Codec):
the connector's between workers, the store's between a worker and a store node. zmq
sockets are not thread-safe, so only the channel thread touches them; other
threads enqueue and wake it through an inproc pair. Handlers run on the channel thread, and a
tick callback runs every `tick_s` for deadlines.

What a peer can do to the channel is bounded: frames over the codec's `max_bytes` are
dropped by zmq itself, with a cluster token every frame must carry its MAC (security.py) or is
dropped with a logged reason, at most MAX_DEALERS outgoing sockets exist (the least recently
used is closed), and an error in one handler or one send is logged and the loop goes on.
A frame refused on the ROUTER (no valid MAC, or not a record of this protocol) is answered
with a short unsealed notice naming one of a fixed set of reasons (REFUSED_*; at most one per
peer a second), so that a peer with another cluster token fails its transfer at first contact,
naming the cause, instead of waiting out its deadline. A notice only ever fails transfers
registered with the endpoint it came from: a peer without this cluster's token cannot open an
engine connection either, so no write of its can be landing.
Connections are heartbeated: one whose peer stops answering is dropped within
CONTROL_DELIVERY_S with the messages queued on it, and zmq queues nothing for a peer that is
not connected (ZMQ_IMMEDIATE): the channel keeps such messages itself and drops those it could
not hand over within CONTROL_DELIVERY_S. So no message is delivered long after it was sent,
which the block-lifetime rules rely on (a registration cannot reach P after D gave up on it).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import zmq

from mooncake_vllm.channel.codec import Codec
from mooncake_vllm.config import CONTROL_DELIVERY_S
from mooncake_vllm.remote_control import endpoint_problem
from mooncake_vllm.security import FrameAuth

# A child of "vllm" so that our lines go through vLLM's handlers, format and level.
logger = logging.getLogger("vllm.mooncake_vllm.channel")

# (reply_to, message): reply_to is a ROUTER identity (bytes) or a DEALER endpoint (str).
Handler = Callable[[bytes | str, Any], None]
MAX_DEALERS = 256
# The unsealed notice a ROUTER sends back for a refused frame, and its reasons.
NOTICE_PREFIX = b"\x00mooncake-vllm refused: "
REFUSED_TOKEN = "cluster-token"  # no MAC, or a MAC made with another token
REFUSED_MALFORMED = "malformed"  # not a record of this protocol version (or no token here)
_NOTICE_EVERY_S = 1.0
_MAX_NOTICED = 4096
MAX_PENDING = 10000  # messages waiting for one peer to connect
_HEARTBEAT_MS = 1000


def unpin_current_thread() -> None:
    """Let this thread run on every core the process may use.

    vLLM's CPU worker pins its main thread to one core for OpenMP, and threads it starts
    inherit that pin: our I/O threads would then only run when the busy model thread yields,
    which stretches a millisecond of work into seconds. On a host whose instances are pinned
    apart they may then run on another instance's cores: they do little, and waiting for our
    own model thread would cost far more. Inside a cgroup cpuset the kernel intersects the
    mask with the cpuset's cores, so a confined instance stays confined.
    """
    try:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    except (AttributeError, OSError, ValueError) as e:
        logger.debug("could not widen thread affinity: %s", e)


@contextlib.contextmanager
def widened_affinity() -> Iterator[None]:
    """Threads started inside this block (e.g. the engine's I/O threads) are not pinned."""
    try:
        before = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        yield
        return
    unpin_current_thread()
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            os.sched_setaffinity(0, before)


def endpoint_refusal(ep: object) -> str | None:
    """Why `ep` is not a control endpoint this side may connect to; None when it is."""
    why = endpoint_problem(ep)
    return None if why is None else f"control endpoint {ep!r:.80}: {why}"


def _bound(s: zmq.Socket, max_bytes: int) -> None:
    """Limits every control socket shares: frame size, linger, heartbeats."""
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.MAXMSGSIZE, max_bytes + 64)  # the MAC's room
    s.setsockopt(zmq.HEARTBEAT_IVL, _HEARTBEAT_MS)
    s.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(CONTROL_DELIVERY_S * 1000) - _HEARTBEAT_MS)
    s.setsockopt(zmq.HEARTBEAT_TTL, int(CONTROL_DELIVERY_S * 1000))


class ControlChannel:
    def __init__(self, host: str, port: int, on_message: Handler,
                 on_tick: Callable[[], None], *, codec: Codec[Any], tick_s: float = 0.05,
                 token: str | None = None,
                 on_refused: Callable[[str, str], None] | None = None) -> None:
        self._codec = codec
        self._auth = FrameAuth(token)
        # (endpoint, reason): a peer we sent to refused our frame (see the module docstring).
        self._on_refused = on_refused
        self._noticed: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        _bound(self._router, codec.max_bytes)
        # A peer that reconnects keeps its identity (below): its new connection takes over.
        self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # Our identity at every peer, the same across reconnects and evictions, so that P
        # recognises the D a transfer was registered by after the connection was replaced.
        self._identity = f"mooncake-{uuid.uuid4().hex}".encode()
        if port:
            self._router.bind(f"tcp://{host}:{port}")
        else:
            port = self._router.bind_to_random_port(f"tcp://{host}")
        self.endpoint = f"tcp://{host}:{port}"
        wake_addr = f"inproc://mooncake-wake-{uuid.uuid4().hex}"
        self._wake_rx = self._ctx.socket(zmq.PAIR)
        self._wake_rx.bind(wake_addr)
        self._wake_tx = self._ctx.socket(zmq.PAIR)
        self._wake_tx.connect(wake_addr)
        self._wake_lock = threading.Lock()
        # (to, frame, when it was sent): a message's delivery deadline counts from its send.
        self._out: queue.SimpleQueue[tuple[bytes | str, bytes, float]] = queue.SimpleQueue()
        self._dealers: dict[str, zmq.Socket] = {}
        # Frames for a DEALER not connected yet, each with the time it must be sent by.
        self._pending: dict[str, collections.deque[tuple[float, bytes]]] = {}
        self._on_message, self._on_tick, self._tick_s = on_message, on_tick, tick_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mooncake-control", daemon=True)
        self._thread.start()

    def send(self, to: bytes | str, msg: Any) -> None:
        """Queue a message to a ROUTER identity (a reply) or an endpoint; returns at once."""
        self._out.put((to, self._auth.seal(self._codec.encode(msg)), time.monotonic()))
        # A full wake pipe already holds a wake-up the channel thread has not read yet.
        with self._wake_lock, contextlib.suppress(zmq.Again):
            self._wake_tx.send(b"", zmq.NOBLOCK)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        with self._wake_lock, contextlib.suppress(zmq.ZMQError):
            self._wake_tx.send(b"", zmq.NOBLOCK)
        self._thread.join(timeout=5)
        for s in [self._router, self._wake_rx, self._wake_tx, *self._dealers.values()]:
            s.close(linger=0)
        self._ctx.term()

    # ---- channel thread ----

    def _dealer(self, endpoint: str, poller: zmq.Poller) -> zmq.Socket:
        s = self._dealers.pop(endpoint, None)
        if s is None:
            while len(self._dealers) >= MAX_DEALERS:
                # The least recently used, unless messages still wait for it.
                old_ep, old = next(((e, d) for e, d in self._dealers.items()
                                    if e not in self._pending),
                                   next(iter(self._dealers.items())))
                logger.info("control: closing the least recently used connection, to %s",
                            old_ep)
                poller.unregister(old)
                old.close(linger=0)
                del self._dealers[old_ep]
            s = self._ctx.socket(zmq.DEALER)
            _bound(s, self._codec.max_bytes)
            s.setsockopt(zmq.ROUTING_ID, self._identity)
            # A dead peer must not make messages pile up without bound.
            s.setsockopt(zmq.SNDHWM, 10000)
            s.setsockopt(zmq.IMMEDIATE, 1)
            s.connect(endpoint)
            poller.register(s, zmq.POLLIN)
        self._dealers[endpoint] = s  # most recently used last
        return s

    def _run(self) -> None:
        unpin_current_thread()
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        next_tick = time.monotonic() + self._tick_s
        while not self._stop.is_set():
            timeout_ms = max(0.0, (next_tick - time.monotonic()) * 1000)
            try:
                ready = dict(poller.poll(timeout_ms))
            except zmq.ZMQError as e:
                logger.error("control channel poll failed: %s", e)
                return
            if self._wake_rx in ready:
                while self._wake_rx.poll(0):
                    self._wake_rx.recv()
            self._flush_out(poller)
            self._send_pending()
            try:
                self._receive(ready)
            except Exception:  # one peer's frames must not end the channel
                logger.exception("control: receiving failed")
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + self._tick_s
                self._call(self._on_tick)

    def _receive(self, ready: dict) -> None:
        if self._router in ready:
            for _ in range(1000):  # bounded: a flooding peer must not starve deadlines
                if not self._router.poll(0):
                    break
                frames = self._router.recv_multipart()
                if len(frames) != 2:
                    logger.warning("control: refused a frame set of %d parts (want 2)",
                                   len(frames))
                    continue
                self._dispatch(frames[0], frames[1])
        for endpoint, s in list(self._dealers.items()):
            if s in ready:
                while s.poll(0):
                    frame = s.recv()
                    if frame.startswith(NOTICE_PREFIX):
                        reason = frame[len(NOTICE_PREFIX):len(NOTICE_PREFIX) + 32].decode(
                            "ascii", "replace")
                        logger.error("control: %s refused our frame (%s)", endpoint, reason)
                        if self._on_refused is not None:
                            self._call(self._on_refused, endpoint, reason)
                        continue
                    self._dispatch(endpoint, frame)

    def _flush_out(self, poller: zmq.Poller) -> None:
        while True:
            try:
                to, frame, sent = self._out.get_nowait()
            except queue.Empty:
                return
            logger.debug("control: flushing %d bytes to %r", len(frame), to)
            try:
                if isinstance(to, bytes):
                    self._router.send_multipart([to, frame], zmq.NOBLOCK)
                else:
                    why = endpoint_refusal(to)
                    if why is not None:
                        raise ValueError(why)
                    self._dealer(to, poller)  # connects now if it is new
                    pending = self._pending.setdefault(to, collections.deque())
                    if len(pending) >= MAX_PENDING:
                        raise RuntimeError(f"{len(pending)} messages already wait for it")
                    pending.append((sent + CONTROL_DELIVERY_S, frame))
            except Exception as e:  # zmq errors, a malformed endpoint: this message only
                # The deadline on the other side turns a lost message into a known failure.
                logger.warning("control: could not send to %r: %s", to, e)

    def _send_pending(self) -> None:
        """Hand queued messages to connected peers, oldest first; drop those not handed over
        within CONTROL_DELIVERY_S (ZMQ_IMMEDIATE: a peer not connected takes nothing)."""
        now = time.monotonic()
        for endpoint, pending in list(self._pending.items()):
            s = self._dealers.get(endpoint)
            while pending:
                deadline, frame = pending[0]
                if now >= deadline or s is None:
                    pending.popleft()
                    logger.warning("control: dropped a message to %s: not connected within "
                                   "%.0fs", endpoint, CONTROL_DELIVERY_S)
                    continue
                try:
                    s.send(frame, zmq.NOBLOCK)
                except zmq.Again:
                    break  # not connected yet: try again on the next turn
                except zmq.ZMQError as e:
                    logger.warning("control: could not send to %s: %s", endpoint, e)
                pending.popleft()
            if not pending:
                del self._pending[endpoint]

    def _dispatch(self, sender: bytes | str, sealed: bytes) -> None:
        logger.debug("control: got %d bytes from %r", len(sealed), sender)
        try:
            frame = self._auth.open(sealed)
        except ValueError as e:  # a frame without this cluster's MAC
            logger.warning("control: refused a message from %r: %s (its cluster_token is "
                           "not this instance's?)", sender, e)
            self._notice(sender, REFUSED_TOKEN)
            return
        try:
            msg = self._codec.decode(frame)
        except ValueError as e:  # BadMessage
            logger.warning("control: refused a message from %r: %s", sender, e)
            self._notice(sender, REFUSED_MALFORMED)
            return
        self._call(self._on_message, sender, msg)

    def _notice(self, sender: bytes | str, reason: str) -> None:
        """Tell a peer that called us that its frame was refused, at most once a second."""
        if not isinstance(sender, bytes):
            return  # a reply on our DEALER: the peer asked nothing of us
        now = time.monotonic()
        if now - self._noticed.get(sender, -_NOTICE_EVERY_S) < _NOTICE_EVERY_S:
            return
        self._noticed[sender] = now
        self._noticed.move_to_end(sender)
        while len(self._noticed) > _MAX_NOTICED:
            self._noticed.popitem(last=False)
        with contextlib.suppress(zmq.ZMQError):
            self._router.send_multipart([sender, NOTICE_PREFIX + reason.encode()],
                                        zmq.NOBLOCK)

    def _call(self, fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        except Exception:  # one bad message or tick must not kill the channel
            logger.exception("control: handler failed")


class NoAnswer(Exception):
    """A blocking question on the control channel got no usable answer; says why."""


class Refused(NoAnswer):
    """The peer refused the question's frame (a REFUSED_* reason): another cluster token,
    or another protocol version."""

    def __init__(self, endpoint: str, reason: str, peer: str = "worker") -> None:
        why = ("its cluster token is not this one" if reason == REFUSED_TOKEN
               else "it cannot read this protocol version, or has no cluster token")
        super().__init__(f"{peer} {endpoint} refused the frame ({reason}): {why}")
        self.reason = reason


def ask(endpoint: str, token: str | None, codec: Codec[Any], question: Any,
        is_answer: Callable[[Any], bool], timeout_s: float, peer: str = "worker") -> Any:
    """Send `question` to the `peer` behind `endpoint` on a socket of its own and return the
    first reply for which `is_answer` holds. Blocking (a caller's thread, never the channel's).
    Raises NoAnswer naming the endpoint: refused endpoint, no answer in time, or a malformed
    reply; Refused when the peer refused the frame (another cluster token)."""
    why = endpoint_refusal(endpoint)
    if why is not None:
        raise NoAnswer(why)
    auth = FrameAuth(token)
    s = zmq.Context.instance().socket(zmq.DEALER)
    try:
        _bound(s, codec.max_bytes)
        s.connect(endpoint)
        s.send(auth.seal(codec.encode(question)))
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not s.poll(int(left * 1000) + 1):
                break
            frame = s.recv()
            if frame.startswith(NOTICE_PREFIX):
                reason = frame[len(NOTICE_PREFIX):][:32].decode("ascii", "replace")
                raise Refused(endpoint, reason, peer)
            try:
                reply = codec.decode(auth.open(frame))
            except ValueError as e:
                raise NoAnswer(f"{peer} {endpoint} answered something unreadable: {e}") from e
            if is_answer(reply):
                return reply
        raise NoAnswer(f"{peer} {endpoint} did not answer a {type(question).__name__} within "
                       f"{timeout_s:.1f}s")
    finally:
        s.close(linger=0)
