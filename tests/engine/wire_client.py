"""The engine's listener protocol (csrc/transports/common/wire.h, auth.h) spoken from Python
with raw sockets, so that tests can send what a well-behaved engine never would: oversized
lengths, half frames, forged proofs. Also a scripted fake server for attacks on clients."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import socket
import struct
import threading
from collections.abc import Callable

MAGIC = 0x4C56434D
VERSION = 2
HELLO = struct.Struct("<IHH32s")  # magic, version, auth_required, server nonce
AUTH = struct.Struct("<IHH32s32s")  # magic, version, has_token, client nonce, mac
VERDICT = struct.Struct("<Ii32s")  # magic, status, server proof
REQUEST = struct.Struct("<IB3sIIQQ")  # magic, op, -, count, -, seq, total_bytes
RESPONSE = struct.Struct("<IiQIIQ")  # magic, status, seq, error_len, -, payload_bytes
ENTRY = struct.Struct("<QQ")
OP_WRITE, OP_READ, OP_CONTROL = 1, 2, 3


def proof(token: str, role: str, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """The handshake MAC of `role` ("client" or "server"), computed independently of C++."""
    label = f"mooncake-vllm/2 {role}".encode() + b"\0"
    return hmac.new(token.encode(), label + server_nonce + client_nonce, hashlib.sha256).digest()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the peer closes (EOF or reset) within `seconds`; data sent meanwhile is
    discarded."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def connect(
    endpoint: tuple[str, int],
    token: str | None = None,
    client_role: str = "client",
    timeout_s: float = 5.0,
) -> tuple[socket.socket, int]:
    """Connects and runs the client side of the handshake. Returns (socket, verdict status);
    with a token and status 0, the server's proof has been checked."""
    sock = socket.create_connection(endpoint, timeout=timeout_s)
    magic, version, auth_required, server_nonce = HELLO.unpack(recv_exact(sock, HELLO.size))
    assert (magic, version) == (MAGIC, VERSION), (hex(magic), version)
    client_nonce = os.urandom(32)
    mac = proof(token, client_role, server_nonce, client_nonce) if token else bytes(32)
    sock.sendall(AUTH.pack(MAGIC, VERSION, 1 if token else 0, client_nonce, mac))
    magic, status, server_mac = VERDICT.unpack(recv_exact(sock, VERDICT.size))
    assert magic == MAGIC
    if token and status == 0:
        assert hmac.compare_digest(server_mac, proof(token, "server", server_nonce, client_nonce))
    return sock, status


def request_header(op: int, count: int = 0, total_bytes: int = 0, seq: int = 1) -> bytes:
    return REQUEST.pack(MAGIC, op, b"\0\0\0", count, 0, seq, total_bytes)


class FakeServer:
    """Accepts connections on 127.0.0.1 and answers each with `script(conn)` (a thread per
    connection). Counts the bytes clients sent after their handshake in `bytes_after_auth`."""

    def __init__(self, script: Callable[[FakeServer, socket.socket], None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.script = script
        self.bytes_after_auth = 0
        self.connections = 0
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def descriptor(self, base: int = 1 << 40, size: int = 1 << 30) -> dict:
        endpoint = f"127.0.0.1:{self.port}"
        return {
            "name": endpoint,
            "protocol": "tcp",
            "endpoint": endpoint,
            "regions": [[base, size]],
        }

    def _accept(self) -> None:
        self.listener.settimeout(0.1)
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            self.script(self, conn)

    def drain(self, conn: socket.socket, seconds: float = 2.0) -> None:
        """Counts whatever the client still sends until it closes (or `seconds` pass)."""
        conn.settimeout(seconds)
        try:
            while chunk := conn.recv(65536):
                self.bytes_after_auth += len(chunk)
        except (TimeoutError, OSError):
            pass

    def close(self) -> None:
        self._stop = True
        self.listener.close()
        self._thread.join(timeout=5)


def hello(conn: socket.socket, auth_required: bool) -> tuple[bytes, bytes]:
    """Server side: sends Hello, reads Auth; returns (server nonce, the client's Auth)."""
    nonce = os.urandom(32)
    conn.sendall(HELLO.pack(MAGIC, VERSION, 1 if auth_required else 0, nonce))
    return nonce, recv_exact(conn, AUTH.size)
