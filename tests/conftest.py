"""Shared fixtures: an isolated model cache, a session Prefect server, catalogs and a recording engine."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "templates"
CATALOGS = ROOT / "catalogs"

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """Build the tiny pipeline into a per-session cache, not the user's."""
    path = tmp_path_factory.mktemp("zimage-cache")
    os.environ["ZIMAGE_BATCH_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server for the session (starting one takes ~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    """Each test runs in its own folder, so relative outputs never land in the repo."""
    monkeypatch.chdir(tmp_path)


def write_csv(path: Path, header: list[str], rows: list[list[str]], *, bom: bool = False) -> Path:
    """Write a small CSV catalog."""
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_template(path: Path, body: str, front: str | None = None) -> Path:
    """Write a template file with optional front matter."""
    text = (f"---\n{front.strip()}\n---\n" if front is not None else "") + body
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def small_catalog(tmp_path) -> Path:
    return write_csv(
        tmp_path / "small.csv",
        ["sku", "title", "color", "kind", "material", "price"],
        [
            ["A-1", "Steel bottle", "navy", "bottle", "steel", "10"],
            ["B/2", "咖啡杯", "white", "mug", "ceramic", "12"],
            ["C 3", "Runner", "coral", "sneaker", "mesh", "80"],
        ],
    )


@pytest.fixture
def scene_template(tmp_path) -> Path:
    return write_template(tmp_path / "scene.j2", "A {{ color }} {{ kind }} called {{ title }} in a sunny kitchen.",
                          "size: 256x256\npresets: [web]\nbackground: scene")


def levels(a: np.ndarray, b: np.ndarray) -> int:
    """The largest difference between two 8-bit images, in levels."""
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def product_on_white(size: int = 256, seed: int = 0) -> np.ndarray:
    """A synthetic product shot: a dark rounded block on an off-white backdrop, float RGB in [0, 1]."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size, 3), 246 / 255, dtype=np.float32)
    a, b = size // 4, size * 3 // 4
    image[a:b, a + size // 8 : b - size // 8] = np.array([0.15, 0.25, 0.5], dtype=np.float32) + rng.uniform(-0.02, 0.02, 3)
    return image


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError, which the engine recognises by name."""


class RecordingEngine:
    """A stand-in for ``generate.Engine`` that records each call and returns images from ``make``.

    ``make(job, seed, call_index)`` returns a float HxWx3 array, or raises.
    """

    def __init__(self, make, device: str = "cpu", max_fitting_batch: int | None = None):
        from zimage_batch.generate import EngineOptions

        self.make = make
        self.max_fitting_batch = max_fitting_batch  # larger calls raise CUDA's out-of-memory error
        self.device = device
        self.load_id = "recording:0"
        self.load_seconds = 0.0
        self.loaded_at = 0.0  # before any run: no run counts it as its load
        self.options = EngineOptions()
        self.calls: list[list[tuple[str, int]]] = []
        self.prepared: list[str] = []

    def prepare(self, jobs):
        self.prepared.extend(j.job_id for j in jobs)

    def prompts_cut(self, jobs):
        return 0

    def release(self, jobs=None):
        pass

    def batch_key(self, job):
        return job.batch_key()

    def caption_tokens(self, job):
        return len(job.prompt)

    def generate(self, jobs, seeds):
        self.calls.append([(j.job_id, s) for j, s in zip(jobs, seeds)])
        if self.max_fitting_batch is not None and len(jobs) > self.max_fitting_batch:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [self.make(j, s, len(self.calls) - 1) for j, s in zip(jobs, seeds)]


def make_certificates(folder: Path, *, days: int = 30, expired: bool = False, self_signed: bool = False,
                      extended_key_usage: bool = True) -> dict[str, Path]:
    """A throwaway CA and an ES256 signing certificate it issued (emailProtection), written as PEM files.

    Returns paths: ``ca`` (the CA certificate), ``chain`` (signing certificate, then the CA), ``key``.
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = (now - datetime.timedelta(days=60), now - datetime.timedelta(days=1)) if expired else (now - datetime.timedelta(days=1), now + datetime.timedelta(days=days))

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "zimage-batch tests")])

    def usage(**kw) -> x509.KeyUsage:
        flags = dict(digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
                     key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False)
        return x509.KeyUsage(**{**flags, **kw})

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("Test CA")).issuer_name(name("Test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=90)).not_valid_after(now + datetime.timedelta(days=365))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(usage(key_cert_sign=True, crl_sign=True), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    issuer, issuer_key = (name("Test Signer"), key) if self_signed else (ca.subject, ca_key)
    leaf = (x509.CertificateBuilder().subject_name(name("Test Signer")).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(digital_signature=True), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False))
    if extended_key_usage:
        leaf = leaf.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
    leaf = leaf.sign(issuer_key, hashes.SHA256())
    folder.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    paths = {"ca": folder / "ca.pem", "chain": folder / "chain.pem", "key": folder / "signer.key"}
    paths["ca"].write_bytes(ca.public_bytes(pem))
    paths["chain"].write_bytes(leaf.public_bytes(pem) + (b"" if self_signed else ca.public_bytes(pem)))
    paths["key"].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths


@pytest.fixture(scope="session")
def certificates(tmp_path_factory) -> dict[str, Path]:
    """A throwaway CA and signing certificate for the session (see make_certificates)."""
    return make_certificates(tmp_path_factory.mktemp("certs"))


S3_ACCESS_KEY = "zb-test-access"
S3_SECRET_KEY = "zb-SECRET-must-never-be-printed-7f3a9c"


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    """A real S3 server (SeaweedFS ``weed mini``) on free loopback ports, stopped even when tests fail."""
    from s3server import SeaweedFS

    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"), S3_ACCESS_KEY, S3_SECRET_KEY)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(seaweedfs, tmp_path, monkeypatch):
    """A fresh bucket, and the standard AWS environment pointing at it (no ~/.aws files, no instance metadata)."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    env = {"AWS_ENDPOINT_URL": seaweedfs.endpoint, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
           "AWS_REGION": "us-east-1", "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"), "AWS_EC2_METADATA_DISABLED": "true"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    bucket = seaweedfs.make_bucket()
    return S3(seaweedfs, bucket, seaweedfs.client())


class S3:
    """The test's bucket on the session's server, with a test-side client."""

    def __init__(self, server, bucket: str, client):
        self.server, self.bucket, self.client = server, bucket, client

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
