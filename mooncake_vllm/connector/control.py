"""Blocking questions to a connector worker on its control channel (the conductor's health
probe, the doctor): a Ping or a Check on a socket of the caller's own."""

from __future__ import annotations

import uuid

from mooncake_vllm.channel.control_channel import NoAnswer, ask
from mooncake_vllm.connector import messages as m


def ask_worker(endpoint: str, token: str | None, question: m.Ping | m.Check,
               timeout_s: float) -> m.Message:
    """The worker's reply echoing `question`'s id; raises NoAnswer (or Refused) naming why."""
    return ask(endpoint, token, m.CODEC, question,
               lambda reply: reply.transfer_id == question.transfer_id, timeout_s)


def ping(endpoint: str, token: str | None, timeout_s: float = 2.0) -> m.Pong:
    """The worker's Pong (its health, segment and scratch region); raises NoAnswer."""
    reply = ask_worker(endpoint, token, m.Ping(m.PROTOCOL_VERSION, uuid.uuid4().hex),
                       timeout_s)
    if not isinstance(reply, m.Pong):
        raise NoAnswer(f"worker {endpoint} answered a Ping with a {type(reply).__name__}")
    return reply


def probe_health(endpoint: str, token: str | None, timeout_s: float = 2.0) -> str | None:
    """Ask the worker behind `endpoint` whether it can serve transfers (Ping/Pong): None when
    it says so, else why not (its own reason, or that it did not answer in time). Blocking:
    the conductor calls it from a thread."""
    try:
        pong = ping(endpoint, token, timeout_s)
    except NoAnswer as e:
        return str(e)
    return None if pong.healthy else f"worker {endpoint} (tp{pong.tp_rank}): {pong.reason}"
