"""vLLM's --api-key behind the conductor: a real `vllm serve` with a key; the client's
Authorization header reaches it (vLLM, not the conductor, checks the client), and the
conductor's own calls use --upstream-api-key."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from proxy_http import instance, post, wait_for

from mooncake_vllm.proxy.discovery import static_id
from mooncake_vllm.testing.conductor_process import ConductorProcess
from mooncake_vllm.testing.vllm_server import VllmServer

pytestmark = pytest.mark.vllm

KEY = "vllm-api-key"


def _models(url: str, headers: dict[str, str]) -> int:
    req = urllib.request.Request(url + "/v1/models", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_client_key_checked_by_vllm_behind_the_conductor(tiny_model: Path,
                                                        tmp_path: Path) -> None:
    server = VllmServer(tiny_model, name="keyed", extra_args=["--api-key", KEY],
                        log_path=tmp_path / "keyed.log")
    with server, ConductorProcess(["--both", server.url, "--upstream-api-key", KEY,
                               "--health-interval-s", "0.5"]) as proxy:
        # The health check's /v1/models needs the key: models known means it was sent.
        wait_for(lambda: instance(proxy.url, static_id("both", server.url))["models"], 30,
                 "the conductor read the instance's models with --upstream-api-key")
        body = {"model": str(tiny_model), "prompt": "Keys open doors", "max_tokens": 4,
                "temperature": 0}
        url = proxy.url + "/v1/completions"
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            status, _, raw = post(url, body, headers=headers)
            assert status == 401, raw  # vLLM's refusal, relayed
        good = {"Authorization": f"Bearer {KEY}"}
        status, _, raw = post(url, body, headers=good)
        assert status == 200, raw
        assert json.loads(raw)["usage"]["completion_tokens"] == 4
        status, _, raw = post(url, {**body, "stream": True}, headers=good)
        assert status == 200 and raw.rstrip().endswith(b"data: [DONE]"), raw[-200:]
        assert _models(proxy.url, good) == 200
        assert _models(proxy.url, {}) == 503  # no instance answered this client
