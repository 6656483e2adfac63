"""Start, stop and restart the real `etcd` binary on free loopback ports: for tests and the demo.

    with EtcdServer(tmp_path) as etcd:                 # plain
        md = open_metadata(etcd.url)
    with EtcdServer(tmp_path, auth=True, tls=True) as etcd:
        md = open_metadata(etcd.url, **etcd.client_options())

The data directory lives under the given work directory and survives `stop()`, so `restart()`
brings back the same cluster (same ports, same keys and leases): that is what "etcd restarted
while instances run" means in production. With `tls=True` a throwaway CA, a server certificate
(for 127.0.0.1 and localhost) and a client certificate are made with the `openssl` CLI; with
`client_cert_auth=True` etcd also demands the client certificate. With `auth=True` the `root`
user is created with `password` and authentication is enabled through `etcdctl`.

etcd runs through `testing.launcher`; its output goes to `etcd.log` in the work directory (every
start appends), and its tail is quoted in every error.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import time
from pathlib import Path
from types import TracebackType

from mooncake_vllm.testing.launcher import Launched, LaunchError
from mooncake_vllm.testing.ports import free_port

_LOG_TAIL_CHARS = 3000


class EtcdServerError(RuntimeError):
    """etcd could not be started, configured or stopped; the message quotes etcd's log."""


class EtcdServer:
    """One single-member etcd cluster on 127.0.0.1. Context manager, or start()/stop()."""

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        auth: bool = False,
        password: str = "mooncake-test-pw",
        tls: bool = False,
        client_cert_auth: bool = False,
        name: str = "mooncake-vllm-etcd",
        etcd_binary: str = "etcd",
        start_timeout_s: float = 20.0,
    ) -> None:
        if client_cert_auth and not tls:
            raise ValueError("client_cert_auth=True needs tls=True")
        binary = shutil.which(etcd_binary)
        if binary is None:
            raise EtcdServerError(
                f"the etcd binary {etcd_binary!r} is not on PATH; install it "
                "(Debian/Ubuntu: apt-get install etcd-server etcd-client)"
            )
        self._binary = binary
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.workdir / "etcd-data"
        self.log_path = self.workdir / "etcd.log"
        self.name = name
        self.auth = auth
        self.user: str | None = "root" if auth else None
        self.password: str | None = password if auth else None
        self.tls = tls
        self.client_cert_auth = client_cert_auth
        self.start_timeout_s = start_timeout_s
        self.client_port = free_port()
        self.peer_port = free_port()
        self.ca_cert: Path | None = None
        self.client_cert: Path | None = None
        self.client_key: Path | None = None
        self._server_cert: Path | None = None
        self._server_key: Path | None = None
        self._process: Launched | None = None
        self._auth_done = False
        if tls:
            self._make_certificates()

    # ----------------------------------------------------------------- addresses
    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def url(self) -> str:
        """The metadata URL `open_metadata` takes: etcd:// or, with TLS, etcds://."""
        return f"{'etcds' if self.tls else 'etcd'}://{self.endpoint}"

    @property
    def client_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.endpoint}"

    def client_options(self) -> dict[str, str]:
        """The keyword arguments of `open_metadata` a client of this server needs."""
        opts: dict[str, str] = {}
        if self.auth:
            assert self.user is not None and self.password is not None
            opts.update(user=self.user, password=self.password)
        if self.tls:
            assert self.ca_cert is not None
            opts["ca_cert"] = str(self.ca_cert)
            if self.client_cert_auth:
                opts.update(cert=str(self.client_cert), key=str(self.client_key))
        return opts

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.running

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> EtcdServer:
        if self.running:
            return self
        peer = f"http://127.0.0.1:{self.peer_port}"
        cmd = [
            self._binary,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}",
            "--initial-cluster-state", "new",
            "--logger", "zap",
            "--log-outputs", "stderr",
        ]
        if self.tls:
            cmd += ["--cert-file", str(self._server_cert), "--key-file", str(self._server_key)]
            # etcd turns client-certificate checking on whenever it is given a trusted CA.
            if self.client_cert_auth:
                cmd += ["--client-cert-auth", "--trusted-ca-file", str(self.ca_cert)]
        # One log for every start: a restart appends to it.
        self._process = Launched(cmd, name=f"etcd on {self.client_url}",
                                 log_path=self.log_path, append_log=True).start()
        try:
            self._wait_healthy()
            if self.auth and not self._auth_done:
                self._enable_auth()
        except BaseException:
            self.kill()
            raise
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (etcd flushes and exits), SIGKILL after `timeout_s`. Keeps the data dir."""
        process, self._process = self._process, None
        if process is not None:
            process.stop(timeout_s)

    def kill(self) -> None:
        """SIGKILL: a crash. Keeps the data dir."""
        process, self._process = self._process, None
        if process is not None:
            process.kill()

    def restart(self, down_s: float = 0.0, wipe_data: bool = False) -> None:
        """Stop, stay down `down_s` seconds, start again on the same ports and data dir.

        `wipe_data=True` starts from an empty data dir instead: a rebuilt etcd that knows
        none of the old keys or leases (auth, if enabled, is set up again)."""
        self.stop()
        if wipe_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self._auth_done = False
        if down_s > 0:
            time.sleep(down_s)
        self.start()

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def etcdctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `etcdctl` (v3 API) against this server with its TLS and root credentials."""
        cmd = ["etcdctl", f"--endpoints={self.client_url}", "--dial-timeout=3s"]
        if self.tls:
            cmd.append(f"--cacert={self.ca_cert}")
            if self.client_cert_auth:
                cmd += [f"--cert={self.client_cert}", f"--key={self.client_key}"]
        if self.auth and self._auth_done:
            cmd.append(f"--user={self.user}:{self.password}")
        cmd += list(args)
        env = {**os.environ, "ETCDCTL_API": "3"}
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=env)
        if check and res.returncode != 0:
            raise EtcdServerError(
                f"`etcdctl {' '.join(args)}` failed ({res.returncode}): {res.stderr.strip()}"
            )
        return res

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-_LOG_TAIL_CHARS:]
        except OSError:
            return "(no etcd log)"

    # ----------------------------------------------------------------- internals
    def _wait_healthy(self) -> None:
        """Until /health answers 200 (etcd has a leader and serves reads: else 503), or fail
        with the log tail."""
        ctx: ssl.SSLContext | None = None
        if self.tls:
            ctx = ssl.create_default_context(cafile=str(self.ca_cert))
            if self.client_cert_auth:
                ctx.load_cert_chain(str(self.client_cert), str(self.client_key))
        assert self._process is not None
        try:
            self._process.wait_http(f"{self.client_url}/health", self.start_timeout_s,
                                    ssl_context=ctx)
        except LaunchError as e:
            raise EtcdServerError(str(e)) from None

    def _enable_auth(self) -> None:
        self.etcdctl("user", "add", f"{self.user}:{self.password}", "--interactive=false")
        self.etcdctl("auth", "enable")
        self._auth_done = True

    def _make_certificates(self) -> None:
        """A throwaway CA, a server certificate for 127.0.0.1/localhost, a client certificate."""
        if shutil.which("openssl") is None:
            raise EtcdServerError("tls=True needs the `openssl` command-line tool")
        d = self.workdir / "tls"
        d.mkdir(exist_ok=True)
        self.ca_cert, ca_key = d / "ca.pem", d / "ca.key"
        _openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", ca_key, "-out", self.ca_cert, "-days", "2",
            "-subj", "/CN=mooncake-vllm test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )
        self._server_cert, self._server_key = self._issue(
            d, "server", "localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
            "extendedKeyUsage=serverAuth,clientAuth\n"
        )
        self.client_cert, self.client_key = self._issue(
            d, "client", "mooncake-vllm-client", "extendedKeyUsage=clientAuth\n"
        )

    def _issue(self, d: Path, stem: str, cn: str, extensions: str) -> tuple[Path, Path]:
        assert self.ca_cert is not None
        key, csr, cert, ext = (d / f"{stem}{s}" for s in (".key", ".csr", ".pem", ".ext"))
        ext.write_text("basicConstraints=CA:FALSE\n" + extensions)
        _openssl(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={cn}",
        )
        _openssl(
            "x509", "-req", "-in", csr, "-CA", self.ca_cert, "-CAkey", d / "ca.key",
            "-CAcreateserial", "-days", "2", "-out", cert, "-extfile", ext,
        )
        return cert, key


def _openssl(*args: str | Path) -> None:
    res = subprocess.run(
        ["openssl", *map(str, args)], capture_output=True, text=True, timeout=30
    )
    if res.returncode != 0:
        raise EtcdServerError(f"openssl {args[0]} failed: {res.stderr.strip()}")
