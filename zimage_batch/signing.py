"""Optional C2PA signing of final files, and reading the signature back (``c2pa-python``).

``load_credentials`` checks a PEM certificate chain and its private key up front (readable,
matching, each certificate issued by the next, within their validity dates) and ``C2paSigner``
makes a trial signature, so a bad certificate stops a run before any model loads. Each file is
signed last, after the provenance is embedded, with two assertions: ``c2pa.actions``
(``c2pa.created`` by a trainedAlgorithmicMedia source, software zimage-batch) and
``zimage-batch.generation`` (the job's stamp: prompt, seeds, settings, model). No thumbnail is
embedded (it would add ~100-450 KB per file).

``read_c2pa`` validates a file's manifest: integrity always, the signer's certificate only
against trust anchors when they are given (a run's own CA is not in any public trust list);
``check_trust_anchors`` refuses a trust file without certificates, which would require nothing.
c2pa-python is an optional dependency (``pip install 'zimage-batch[c2pa]'``); without it, asking
for signing raises SigningError and verify reports signed files as not checkable.
"""

from __future__ import annotations

import io
import json
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import SigningError
from .provenance import DIGITAL_SOURCE_TYPE, Stamp, cut_middle, sniff_format

GENERATION_LABEL = "zimage-batch.generation"
MIME_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "AVIF": "image/avif"}
_UNTRUSTED = "signingCredential.untrusted"


def _short(value: object) -> str:
    """A value as JSON for a message, cut in the middle when long."""
    return cut_middle(json.dumps(value, ensure_ascii=False))


def _c2pa():
    try:
        import c2pa
    except ImportError as exc:
        raise SigningError(
            f"C2PA signing needs the optional package c2pa-python, which cannot be imported here ({exc}). "
            "Install it with `pip install 'zimage-batch[c2pa]'` (or `pip install c2pa-python`), or run without "
            "--c2pa-cert/--c2pa-key: every file still carries its XMP and A1111 provenance."
        ) from None
    return c2pa


@dataclass(frozen=True)
class Credentials:
    """A checked certificate chain (leaf first) and its private key, as PEM."""

    chain_pem: bytes
    key_pem: bytes
    alg: str
    subject: str
    not_after: datetime
    fingerprint: str = ""  # "sha256:<hex>" of the signing certificate (DER): what manifest records name


def load_credentials(cert_path: str | Path, key_path: str | Path, now: datetime | None = None) -> Credentials:
    """Read and check --c2pa-cert and --c2pa-key; SigningError naming the file and the fix."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    now = now or datetime.now(timezone.utc)
    chain_pem, key_pem = read_pem(cert_path, "--c2pa-cert"), read_pem(key_path, "--c2pa-key")
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError:
        raise SigningError(f"--c2pa-cert {cert_path} is not a PEM certificate chain. Pass the signing certificate "
                           "first, then its intermediate CA certificate(s), all in PEM.") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise SigningError(f"--c2pa-key {key_path} is encrypted. Pass an unencrypted PEM private key "
                           "(e.g. `openssl pkey -in KEY -out signer.key`).") from None
    except ValueError:
        raise SigningError(f"--c2pa-key {key_path} is not a PEM private key.") from None
    leaf = chain[0]
    spki = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise SigningError(f"--c2pa-key {key_path} does not match the certificate in --c2pa-cert {cert_path} "
                           f"({leaf.subject.rfc4514_string()}). Pass the key the certificate was issued for.")
    if leaf.issuer == leaf.subject:
        raise SigningError(f"The signing certificate {leaf.subject.rfc4514_string()} in --c2pa-cert {cert_path} is "
                           "self-signed. C2PA's certificate profile asks for a signing certificate issued by a CA "
                           "(with the CA certificate after it in the file); get one issued, e.g. by your organisation's CA.")
    for number, (cert, issuer) in enumerate(zip(chain, chain[1:]), start=1):
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            raise SigningError(f"--c2pa-cert {cert_path}: certificate {number} ({cert.subject.rfc4514_string()}) is not "
                               f"issued by certificate {number + 1} ({issuer.subject.rfc4514_string()}): its issuer name "
                               "or signature does not match, so no one could validate the signatures. Put the CA "
                               "certificate that issued each certificate right after it: the signing certificate "
                               "first, then its issuing CA, and so on.") from None
    for cert in chain:
        name = cert.subject.rfc4514_string()
        if cert.not_valid_after_utc < now:
            raise SigningError(f"The certificate {name} in --c2pa-cert {cert_path} expired on "
                               f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC. Renew it and sign again.")
        if cert.not_valid_before_utc > now:
            raise SigningError(f"The certificate {name} in --c2pa-cert {cert_path} is not valid before "
                               f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC. Check the machine's clock or the certificate.")
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in ("secp256r1", "secp384r1", "secp521r1"):
        alg = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}[key.curve.name]
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        alg = "ed25519"
    elif isinstance(key, rsa.RSAPrivateKey):
        alg = "ps256"
    else:
        raise SigningError(f"--c2pa-key {key_path}: C2PA signs with EC P-256/384/521, Ed25519 or RSA keys; "
                           f"this is a {type(key).__name__}.")
    fingerprint = "sha256:" + leaf.fingerprint(hashes.SHA256()).hex()
    return Credentials(chain_pem, key_pem, alg, leaf.subject.rfc4514_string(), leaf.not_valid_after_utc, fingerprint)


def read_pem(path: str | Path, flag: str) -> bytes:
    """A PEM file's bytes; for ``--c2pa-trust`` also checked to hold CA certificates (see ``check_trust_anchors``)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SigningError(f"{flag} {path} cannot be read ({exc.strerror}). Pass the path of a PEM file.") from None
    if flag == "--c2pa-trust":
        check_trust_anchors(data, f"--c2pa-trust {path}")
    return data


def check_trust_anchors(pem: bytes, source: str = "--c2pa-trust") -> None:
    """SigningError unless ``pem`` holds at least one certificate in PEM, all readable.

    An empty or wrong trust file must stop verify: otherwise it would require signatures from no one.
    """
    from cryptography import x509

    try:
        x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise SigningError(f"{source} is not a file of PEM certificates (it is empty, in another format, or has a "
                           "damaged certificate). Pass a PEM file with the CA certificate(s) that signed files must "
                           "chain to, each a block starting -----BEGIN CERTIFICATE----- (e.g. the ca.pem of the CA "
                           "that issued the run's --c2pa-cert).") from None


class C2paSigner:
    """Signs final file bytes with one certificate; made once per process."""

    def __init__(self, credentials: Credentials, software_version: str):
        c2pa = _c2pa()
        self.credentials = credentials
        self.software_version = software_version
        self._lock = threading.Lock()
        info = c2pa.C2paSignerInfo(credentials.alg, credentials.chain_pem, credentials.key_pem, None)
        self._signer = c2pa.Signer.from_info(info)
        self._context = c2pa.Context(c2pa.Settings.from_dict({"builder": {"thumbnail": {"enabled": False}}}))
        self._check()

    def _check(self) -> None:
        """A trial signature, so a certificate the library refuses stops the run before any work."""
        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), "white").save(buffer, "PNG")
        stamp = Stamp(job_id="check", sku="check", catalog="-", row=1, template="-", variant=0, prompt="check",
                      negative_prompt="", seed=0, image_seed=0, width=16, height=16, steps=1, guidance_scale=0.0,
                      max_sequence_length=1, model="-", software="zimage-batch")
        try:
            self.sign(buffer.getvalue(), stamp, "check.png")
        except Exception as exc:  # the library raises its own error types
            raise SigningError(
                f"The C2PA library refused the certificate {self.credentials.subject} ({str(exc)[:300]}). "
                "It needs a certificate issued by a CA (not self-signed) with the emailProtection or "
                "documentSigning extended key usage, and the CA certificate(s) after it in --c2pa-cert."
            ) from None

    def sign(self, data: bytes, stamp: Stamp, title: str) -> bytes:
        """The file with a C2PA manifest embedded, signed."""
        c2pa = _c2pa()
        manifest = {
            "claim_generator_info": [{"name": "zimage-batch", "version": self.software_version}],
            "title": title,
            "assertions": [
                {"label": "c2pa.actions", "data": {"actions": [{
                    "action": "c2pa.created", "digitalSourceType": DIGITAL_SOURCE_TYPE,
                    "softwareAgent": {"name": "zimage-batch", "version": self.software_version},
                }]}},
                {"label": GENERATION_LABEL, "data": stamp.model_dump()},
            ],
        }
        mime = MIME_TYPES[sniff_format(data)]
        with self._lock:
            builder = c2pa.Builder(manifest, context=self._context)
            out = io.BytesIO()
            builder.sign(self._signer, mime, io.BytesIO(data), out)
        return out.getvalue()


@dataclass(frozen=True)
class C2paCheck:
    """What a file's C2PA manifest says: validation state, failures, signer and our assertion."""

    state: str
    failures: tuple[str, ...]
    signer: str
    generation: dict | None


def has_c2pa(data: bytes) -> bool:
    """Whether the bytes look like they carry a C2PA manifest (JUMBF 'c2pa' box), without the library."""
    return b"jumb" in data and b"c2pa" in data


def read_c2pa(data: bytes, trust_anchors: bytes | None = None) -> C2paCheck | None:
    """Validate the file's C2PA manifest; None when it has none. Needs c2pa-python."""
    c2pa = _c2pa()
    settings = ({"verify": {"verify_trust": False}} if trust_anchors is None
                else {"trust": {"trust_anchors": trust_anchors.decode()}})
    context = c2pa.Context(c2pa.Settings.from_dict(settings))
    try:
        reader = c2pa.Reader.try_create(MIME_TYPES[sniff_format(data)], io.BytesIO(data), context=context)
    except c2pa.C2paError as exc:
        return C2paCheck("Invalid", (f"unreadable manifest: {str(exc)[:200]}",), "", None)
    if reader is None:
        return None
    with reader:
        state = reader.get_validation_state() or "Invalid"
        results = reader.get_validation_results() or {}
        manifest = reader.get_active_manifest() or {}
    failures = tuple(item.get("code", "?") for item in results.get("activeManifest", {}).get("failure", []))
    info = manifest.get("signature_info", {})
    signer = ", ".join(str(info[k]) for k in ("common_name", "issuer") if info.get(k))
    generation = next((a.get("data") for a in manifest.get("assertions", []) if a.get("label") == GENERATION_LABEL), None)
    return C2paCheck(state, failures, signer, generation)


def c2pa_problems(check: C2paCheck, stamp: Stamp, trusted_only: bool) -> list[str]:
    """Why a file's C2PA manifest does not hold (empty when it does)."""
    problems = []
    broken = [code for code in check.failures if code != _UNTRUSTED]
    if check.state == "Invalid" or broken:
        problems.append(f"C2PA signature invalid ({', '.join(broken or check.failures) or check.state})")
    elif trusted_only and check.state != "Trusted":
        problems.append(f"C2PA signer {check.signer or '?'} is not trusted by --c2pa-trust")
    if check.generation is None:
        problems.append(f"C2PA manifest has no {GENERATION_LABEL} assertion")
    else:
        for key, value in stamp.model_dump().items():  # the whole stamp the file was signed with
            got = check.generation.get(key)
            if got != value:
                problems.append(f"C2PA {key} is {_short(got)}, the manifest says {_short(value)}")
    return problems
