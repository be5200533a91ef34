"""C2PA signing with a throwaway CA (made at test time), read back by verify."""

import hashlib
import io
import json
import sys

import pytest

from conftest import make_certificates
from test_provenance import FORMATS, encoded, stamp
from test_verify import make_run, output_path, verify_cli
from zimage_batch.cli import main
from zimage_batch.errors import SigningError
from zimage_batch.manifest import MANIFEST
from zimage_batch.provenance import DIGITAL_SOURCE_TYPE, Sealer, embed, read_embedded
from zimage_batch.signing import C2paSigner, c2pa_problems, load_credentials, read_c2pa


@pytest.fixture(scope="module")
def signer(certificates):
    return C2paSigner(load_credentials(certificates["chain"], certificates["key"]), "0.1.0")


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_is_signed_and_reads_back_valid(signer, certificates, fmt):
    s = stamp()
    signed = signer.sign(embed(encoded(fmt), s), s, f"x.{fmt.lower()}")
    check = read_c2pa(signed)
    assert check.state == "Valid" and check.failures == () and "Test Signer" in check.signer
    assert check.generation["job_id"] == s.job_id and check.generation["image_seed"] == 42
    assert check.generation["prompt"] == s.prompt and c2pa_problems(check, s, trusted_only=False) == []
    assert read_c2pa(signed, certificates["ca"].read_bytes()).state == "Trusted"
    assert read_embedded(signed).xmp["Iptc4xmpExt:DigitalSourceType"] == DIGITAL_SOURCE_TYPE  # our XMP survives signing
    assert read_c2pa(embed(encoded(fmt), s)) is None


def test_the_actions_assertion_marks_ai_generated_media(signer):
    import c2pa

    s = stamp()
    signed = signer.sign(embed(encoded("JPEG"), s), s, "x.jpg")
    manifest = c2pa.Reader("image/jpeg", io.BytesIO(signed)).get_active_manifest()
    actions = next(a["data"]["actions"] for a in manifest["assertions"] if a["label"].startswith("c2pa.actions"))
    assert actions[0]["action"] == "c2pa.created" and actions[0]["digitalSourceType"] == DIGITAL_SOURCE_TYPE
    assert not any(a["label"].startswith("c2pa.thumbnail") for a in manifest["assertions"])


def test_tampered_pixels_invalidate_the_signature(signer):
    s = stamp()
    signed = bytearray(signer.sign(embed(encoded("JPEG"), s), s, "x.jpg"))
    signed[-10] ^= 0x01  # inside the entropy-coded image data
    check = read_c2pa(bytes(signed))
    assert check.state == "Invalid" and "assertion.dataHash.mismatch" in check.failures
    assert c2pa_problems(check, s, trusted_only=False)[0].startswith("C2PA signature invalid (assertion.dataHash.mismatch")


def test_another_ca_does_not_trust_the_signer(signer, tmp_path):
    s = stamp()
    other = make_certificates(tmp_path / "other")
    check = read_c2pa(signer.sign(embed(encoded("PNG"), s), s, "x.png"), other["ca"].read_bytes())
    assert check.state == "Valid" and c2pa_problems(check, s, trusted_only=True) == [
        "C2PA signer Test Signer, zimage-batch tests is not trusted by --c2pa-trust"]


def test_bad_credentials_are_refused_up_front(certificates, tmp_path):
    other = make_certificates(tmp_path / "other")
    with pytest.raises(SigningError, match="does not match the certificate"):
        load_credentials(certificates["chain"], other["key"])
    expired = make_certificates(tmp_path / "expired", expired=True)
    with pytest.raises(SigningError, match=r"Test Signer.* expired on .* Renew it"):
        load_credentials(expired["chain"], expired["key"])
    with pytest.raises(SigningError, match="is not a PEM certificate chain"):
        load_credentials(certificates["key"], certificates["key"])
    with pytest.raises(SigningError, match="nope.pem cannot be read"):
        load_credentials(tmp_path / "nope.pem", certificates["key"])
    selfsigned = make_certificates(tmp_path / "self", self_signed=True)
    with pytest.raises(SigningError, match="Test Signer in --c2pa-cert .* is self-signed"):
        load_credentials(selfsigned["chain"], selfsigned["key"])
    no_usage = make_certificates(tmp_path / "no-eku", extended_key_usage=False)
    with pytest.raises(SigningError, match=r"The C2PA library refused the certificate .*Test Signer \(.*emailProtection"):
        C2paSigner(load_credentials(no_usage["chain"], no_usage["key"]), "0.1.0")  # the trial signature


def test_a_chain_whose_ca_did_not_issue_the_signing_certificate_is_refused(certificates, tmp_path):
    other = make_certificates(tmp_path / "other")
    leaf = certificates["chain"].read_text().split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
    wrong_ca = tmp_path / "wrong-ca.pem"
    wrong_ca.write_text(leaf + other["ca"].read_text())  # the right signing certificate, then another CA
    with pytest.raises(SigningError, match=rf"--c2pa-cert {wrong_ca}: certificate 1 \(.*CN=Test Signer\) is not issued by "
                                           r"certificate 2 \(.*CN=Test CA\).* Put the CA certificate that issued each"):
        load_credentials(wrong_ca, certificates["key"])
    assert load_credentials(certificates["chain"], certificates["key"]).subject.endswith("CN=Test Signer")


@pytest.mark.parametrize("field, value", [("prompt", "another prompt"), ("negative_prompt", "x"), ("seed", 1), ("steps", 50),
                                          ("width", 2048), ("guidance_scale", 3.5), ("max_sequence_length", 64),
                                          ("sku", "OTHER"), ("template", "studio"), ("variant", 7)])
def test_every_field_of_the_signed_generation_assertion_is_compared(signer, field, value):
    s = stamp()
    check = read_c2pa(signer.sign(embed(encoded("JPEG"), s), s, "x.jpg"))
    assert c2pa_problems(check, s, trusted_only=False) == []
    problems = c2pa_problems(check, stamp(**{field: value}), trusted_only=False)
    assert problems == [f"C2PA {field} is {json.dumps(getattr(s, field), ensure_ascii=False)}, the manifest says {json.dumps(value)}"]


def test_without_c2pa_python_signing_is_a_clear_error(certificates, monkeypatch):
    monkeypatch.setitem(sys.modules, "c2pa", None)
    with pytest.raises(SigningError, match=r"needs the optional package c2pa-python.*pip install 'zimage-batch\[c2pa\]'"):
        C2paSigner(load_credentials(certificates["chain"], certificates["key"]), "0.1.0")


@pytest.fixture
def signed_run(tmp_path, signer):
    out = tmp_path / "out"
    return out, make_run(out, Sealer("zimage-batch 0.1.0", signer))


def test_verify_checks_signatures_of_a_signed_run(signed_run, certificates, tmp_path, capsys):
    out, records = signed_run
    code, stdout, _ = verify_cli(capsys, out)
    assert code == 0 and "4 C2PA-signed: all present" in stdout
    code, stdout, _ = verify_cli(capsys, out, "--c2pa-trust", certificates["ca"])
    assert code == 0 and "4 C2PA-signed" in stdout
    other = make_certificates(tmp_path / "other")
    code, stdout, _ = verify_cli(capsys, out, "--c2pa-trust", other["ca"])
    assert code == 1 and stdout.count("is not trusted by --c2pa-trust") == 4


def test_verify_names_a_broken_signature_even_when_the_manifest_was_edited_to_match(signed_run, capsys):
    out, records = signed_run
    path = output_path(records, "web")
    data = bytearray((out / path).read_bytes())
    data[-10] ^= 0x01
    (out / path).write_bytes(bytes(data))
    for record in records:  # someone "fixed" the manifest's hash too
        for output in record["outputs"]:
            if output["path"] == path:
                output["sha256"] = hashlib.sha256(data).hexdigest()
    (out / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in records))
    code, stdout, _ = verify_cli(capsys, out)
    assert code == 1 and stdout.startswith(f"SIGNATURE  {path}: C2PA signature invalid (assertion.dataHash.mismatch")


def test_a_rewritten_record_of_a_signed_run_fails_even_against_a_trusted_ca(signed_run, certificates, capsys):
    out, records = signed_run
    records[0].update(prompt="a photo made by a human photographer", steps=50)
    (out / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in records))
    code, stdout, _ = verify_cli(capsys, out, "--c2pa-trust", certificates["ca"])
    assert code == 1 and "OK" not in stdout
    bad = [line for line in stdout.splitlines() if line.startswith("METADATA")]
    assert len(bad) == 3 and all("zb:prompt is 'a mug', the manifest says 'a photo made by a human photographer'" in line
                                 and "zb:steps is '8', the manifest says '50'" in line for line in bad)


def test_an_unsigned_run_fails_when_signatures_are_required(tmp_path, certificates, capsys):
    make_run(tmp_path / "out")
    code, stdout, _ = verify_cli(capsys, tmp_path / "out", "--c2pa-trust", certificates["ca"])
    assert code == 1 and stdout.count("no C2PA signature, but --c2pa-trust asks for signed files") == 4


@pytest.mark.parametrize("case", ["empty", "csv", "key only", "damaged certificate"])
def test_a_trust_file_without_certificates_is_refused(tmp_path, certificates, capsys, case):
    make_run(tmp_path / "out")  # unsigned: an empty trust file used to let it pass
    trust = tmp_path / "trust.pem"
    ca = certificates["ca"].read_text()
    trust.write_text({"empty": "", "csv": "sku,title\nS1,Mug\n", "key only": certificates["key"].read_text(),
                      "damaged certificate": ca + ca.replace("M", "Q", 3)}[case])
    code, stdout, stderr = verify_cli(capsys, tmp_path / "out", "--c2pa-trust", trust)
    assert code == 2 and stdout == "" and "Traceback" not in stderr
    assert stderr.startswith(f"error: --c2pa-trust {trust} is not a file of PEM certificates"), stderr
    assert "-----BEGIN CERTIFICATE-----" in stderr


def test_verify_refuses_empty_trust_anchors_given_directly(tmp_path):
    from zimage_batch.verify import LocalFolder, verify

    make_run(tmp_path / "out")
    with pytest.raises(SigningError, match="--c2pa-trust is not a file of PEM certificates"):
        verify(LocalFolder(tmp_path / "out"), b"")


@pytest.mark.parametrize("case, phrase", [
    ("wrong CA in the chain", "is not issued by certificate 2"),
    ("mismatched key", "does not match the certificate"),
    ("expired", "expired on"),
    ("cert without key", "needs both --c2pa-cert"),
])
def test_run_with_bad_credentials_stops_before_anything(case, phrase, certificates, tmp_path, capsys):
    from conftest import CATALOGS, TEMPLATES

    if case == "wrong CA in the chain":
        chain = tmp_path / "chain.pem"
        chain.write_text(certificates["chain"].read_text().split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
                         + make_certificates(tmp_path / "o")["ca"].read_text())
        flags = ["--c2pa-cert", chain, "--c2pa-key", certificates["key"]]
    elif case == "mismatched key":
        flags = ["--c2pa-cert", certificates["chain"], "--c2pa-key", make_certificates(tmp_path / "o")["key"]]
    elif case == "expired":
        expired = make_certificates(tmp_path / "e", expired=True)
        flags = ["--c2pa-cert", expired["chain"], "--c2pa-key", expired["key"]]
    else:
        flags = ["--c2pa-cert", certificates["chain"]]
    out = tmp_path / "out"
    code = main(["run", str(CATALOGS / "demo.csv"), "-t", str(TEMPLATES / "poster_text.j2"), "--model", "tiny-random",
                 "--out", str(out), "-q", *map(str, flags)])
    stderr = capsys.readouterr().err
    assert code == 2 and stderr.startswith("error: ") and phrase in stderr and "Traceback" not in stderr
    assert not out.exists()


@pytest.mark.usefixtures("prefect_server")
def test_a_rerun_with_other_signing_makes_the_images_again_signed_as_it_asks(tmp_path, certificates, capsys,
                                                                               small_catalog, scene_template):
    """Finished jobs used to be skipped whatever the signing: a folder then mixed unsigned files into a signed run."""
    out = tmp_path / "out"
    unsigned = ["run", str(small_catalog), "-t", str(scene_template), "--model", "simulated:0", "--out", str(out), "-q"]
    signed = [*unsigned, "--c2pa-cert", str(certificates["chain"]), "--c2pa-key", str(certificates["key"])]
    fingerprint = load_credentials(certificates["chain"], certificates["key"]).fingerprint
    assert fingerprint.startswith("sha256:") and len(fingerprint) == 7 + 64

    def signers() -> set:
        return {json.loads(line)["c2pa_signer"] for line in (out / MANIFEST).read_text().splitlines()}

    assert main(unsigned) == 0 and signers() == {None}
    capsys.readouterr()
    assert main(signed) == 0
    stdout = capsys.readouterr().out
    assert "Re-signed: 3 job(s)" in stdout and json.loads((out / "run.json").read_text())["generated"] == 3
    assert signers() == {fingerprint}
    assert verify_cli(capsys, out, "--c2pa-trust", certificates["ca"])[0] == 0
    assert main(signed) == 0 and "Re-signed" not in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["skipped"] == 3
    assert main(unsigned) == 0 and signers() == {None}  # and back: the run asked for unsigned files
    old = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
    for record in old:  # as zimage-batch wrote them before records named their signer
        record["schema_version"] = 4
        del record["c2pa_signer"]
    (out / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in old))
    capsys.readouterr()
    assert main(signed) == 0 and "Re-signed" not in capsys.readouterr().out  # an upgrade makes nothing again
    assert json.loads((out / "run.json").read_text())["skipped"] == 3


def test_a_file_signed_otherwise_than_its_record_says_is_named(signed_run, tmp_path, capsys):
    """A signed file swapped for an unsigned one (hash edited to match) passed when verify had no trust anchors."""
    out, records = signed_run
    assert all(r["c2pa_signer"].startswith("sha256:") for r in records)
    for record in records:
        record["c2pa_signer"] = None
    (out / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in records))
    code, stdout, _ = verify_cli(capsys, out)
    assert code == 1 and stdout.count("carries a C2PA signature, but the manifest says the run did not sign it") == 4

    unsigned = tmp_path / "unsigned"
    plain = make_run(unsigned)
    for record in plain:
        record["c2pa_signer"] = "sha256:" + "ab" * 32
    (unsigned / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in plain))
    code, stdout, _ = verify_cli(capsys, unsigned)
    assert code == 1 and stdout.count("no C2PA signature, but the manifest says the run signed it") == 4
