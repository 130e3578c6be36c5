"""Signed manifests: keys (made here, by the CLI and by openssl), signing at publish, verification at load on
file:// and s3:// (a real S3 server on loopback), every kind of tampering, key rotation, malformed signatures and
what the registry records. Real Ed25519 throughout; the signed bytes are recomputed here from the stored JSON."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support.artifacts import make_model

import kiln_artifacts as ka
from kiln_artifacts.signing import SIGNATURE_CONTEXT, main, signed_bytes
from kiln_artifacts.storage import resolve

LINEAGE = {"producer": {"kind": "TrainingJob", "namespace": "team-a", "name": "tj-1", "uid": "u-1"}, "parents": []}


def stored_manifest(uri: str) -> dict[str, Any]:
    loc = resolve(uri)
    return json.loads(loc.fs.cat_file(loc.child(ka.MANIFEST_NAME)))


def store_manifest(uri: str, doc: dict[str, Any]) -> None:
    """Rewrite an artifact's manifest behind the library's back, as someone with write access to the store could."""
    loc = resolve(uri)
    loc.fs.pipe_file(loc.child(ka.MANIFEST_NAME), json.dumps(doc, indent=2).encode())


def trusted(tmp_path: Path, *signers: ka.Signer, name: str = "trusted") -> ka.TrustedKeys:
    """A trusted-keys directory with the signers' public keys, loaded as a program loads its --trusted-keys."""
    folder = tmp_path / name
    folder.mkdir()
    for i, signer in enumerate(signers):
        (folder / f"key-{i}.pem").write_bytes(signer.public_pem())
    return ka.TrustedKeys.from_dir(folder)


def independently_verifies(doc: dict[str, Any], entry: dict[str, Any]) -> bool:
    """The signature format checked without kiln_artifacts.signing: the context line and canonical JSON."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    body = {k: v for k, v in doc.items() if k != "signatures"}
    message = b"kiln-manifest-signature-v1\n" + json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")
    public = base64.b64decode(entry["publicKey"])
    assert entry["keyId"] == "ed25519:" + hashlib.sha256(public).hexdigest()[:16]
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(base64.b64decode(entry["signature"]), message)
    except InvalidSignature:
        return False
    return True


@pytest.fixture(scope="module")
def keys() -> dict[str, ka.Signer]:
    return {name: ka.Signer.generate() for name in ("old", "new", "other")}


# ------------------------------------------------------------------------------------------------------ keys


def test_keygen_cli_and_verify_cli_round_trip(tmp_path):
    out = tmp_path / "keys"
    p = subprocess.run(
        [sys.executable, "-m", "kiln_artifacts.signing", "keygen", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""  # no runpy warning: the module is not imported by the package before it runs
    assert stat.S_IMODE((out / "private-key.pem").stat().st_mode) == 0o600
    signer = ka.Signer.from_file(out / "private-key.pem")
    assert p.stdout.strip() == signer.key_id
    assert re.fullmatch(r"ed25519:[0-9a-f]{16}", signer.key_id)
    # keygen's folder holds the private key too, which a trusted-keys directory refuses: trust the public key alone.
    trust_dir = tmp_path / "public-only"
    trust_dir.mkdir()
    shutil.copy(out / "public-key.pem", trust_dir / "public-key.pem")
    assert ka.TrustedKeys.from_dir(trust_dir).ids == (signer.key_id,)
    with pytest.raises(ka.KeyFileError, match=r"private-key\.pem: holds a private key"):
        ka.TrustedKeys.from_dir(out)

    art = ka.publish(make_model(tmp_path / "src"), f"file://{tmp_path}/a", format="onnx", signer=signer)
    assert main(["verify", art.uri, "--trusted-keys", str(trust_dir)]) == 0
    p = subprocess.run(
        [sys.executable, "-m", "kiln_artifacts.signing", "verify", art.uri, "--trusted-keys", str(trust_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (p.returncode, p.stdout.strip()) == (0, signer.key_id), p.stderr
    doc = stored_manifest(art.uri)
    doc["metrics"]["accuracy"] = 0.99
    store_manifest(art.uri, doc)
    p = subprocess.run(
        [sys.executable, "-m", "kiln_artifacts.signing", "verify", art.uri, "--trusted-keys", str(trust_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2
    assert f"SignatureMismatchError: {art.uri}: signature invalid: the signature by trusted key {signer.key_id}" in (
        p.stderr
    )
    # keygen never overwrites a key
    assert main(["keygen", "--out", str(out)]) == 2
    assert ka.Signer.from_file(out / "private-key.pem").key_id == signer.key_id


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not on PATH")
def test_openssl_made_keys_sign_and_openssl_verifies_the_signature(tmp_path):
    def openssl(*args: str) -> bytes:
        return subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60).stdout

    private, public = tmp_path / "private-key.pem", tmp_path / "trust" / "public-key.pem"
    public.parent.mkdir()
    openssl("genpkey", "-algorithm", "ed25519", "-out", str(private))
    openssl("pkey", "-in", str(private), "-pubout", "-out", str(public))
    signer = ka.Signer.from_file(private)
    trust = ka.TrustedKeys.from_dir(public.parent)
    # The key id from openssl's own encoding: the raw key is the last 32 bytes of the DER SubjectPublicKeyInfo.
    der = openssl("pkey", "-in", str(private), "-pubout", "-outform", "DER")
    assert signer.key_id == trust.ids[0] == "ed25519:" + hashlib.sha256(der[-32:]).hexdigest()[:16]
    assert ka.key_id(der[-32:]) == signer.key_id

    art = ka.publish(make_model(tmp_path / "src"), f"file://{tmp_path}/a", format="onnx", signer=signer)
    assert ka.load(art.uri, trusted_keys=trust).trusted_key == signer.key_id
    doc = stored_manifest(art.uri)
    (entry,) = doc["signatures"]
    body = {k: v for k, v in doc.items() if k != "signatures"}
    (tmp_path / "message").write_bytes(
        SIGNATURE_CONTEXT + json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    )
    (tmp_path / "signature").write_bytes(base64.b64decode(entry["signature"]))
    verified = openssl(
        "pkeyutl", "-verify", "-pubin", "-inkey", str(public), "-rawin",
        "-in", str(tmp_path / "message"), "-sigfile", str(tmp_path / "signature"),
    )  # fmt: skip
    assert b"Signature Verified Successfully" in verified


def test_keys_that_are_not_ed25519_are_refused_naming_the_file(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    pkcs8 = serialization.PrivateFormat.PKCS8
    rsa_pem = rsa_key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption())
    (tmp_path / "rsa.pem").write_bytes(rsa_pem)
    with pytest.raises(
        ka.KeyFileError, match=rf"signing key {tmp_path}/rsa.pem: an RSA-2048 key; Kiln signs with Ed25519"
    ):
        ka.Signer.from_file(tmp_path / "rsa.pem")
    ec_public = ec_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    folder = tmp_path / "trust"
    folder.mkdir()
    (folder / "a.pem").write_bytes(ka.Signer.generate().public_pem())
    (folder / "b.pem").write_bytes(ec_public)
    with pytest.raises(
        ka.KeyFileError,
        match=rf"trusted keys {folder}: b\.pem: an EC key on secp256r1; Kiln verifies Ed25519 signatures only",
    ):
        ka.TrustedKeys.from_dir(folder)
    # A private key where public keys go: refused, it would be readable by whoever reads the ConfigMap.
    (folder / "b.pem").write_bytes(ka.Signer.generate().private_pem())
    with pytest.raises(ka.KeyFileError, match=r"b\.pem: holds a private key; trusted keys are public keys only"):
        ka.TrustedKeys.from_dir(folder)
    (folder / "b.pem").write_bytes(ka.Signer.generate().public_pem() * 2)
    with pytest.raises(ka.KeyFileError, match=r"b\.pem: holds 2 PEM blocks; one key per file"):
        ka.TrustedKeys.from_dir(folder)
    (folder / "b.pem").write_text("not a key")
    with pytest.raises(ka.KeyFileError, match=r"b\.pem: not PEM"):
        ka.TrustedKeys.from_dir(folder)
    # An encrypted private key, a public key given as the signing key.
    encrypted = ka.Signer.generate()._key.private_bytes(
        serialization.Encoding.PEM, pkcs8, serialization.BestAvailableEncryption(b"secret")
    )
    with pytest.raises(ka.KeyFileError, match="the private key is encrypted"):
        ka.Signer.from_pem(encrypted)
    with pytest.raises(ka.KeyFileError, match="holds a public key; signing needs the private key"):
        ka.Signer.from_pem(ka.Signer.generate().public_pem())


def test_trusted_keys_directory_as_a_configmap_mounts_it(tmp_path):
    """The kubelet's layout: a timestamped folder, the ..data symlink to it, and one visible symlink per key."""
    one, two = ka.Signer.generate(), ka.Signer.generate()
    folder = tmp_path / "trusted-keys"
    real = folder / "..2026_01_02_03_04_05.000000001"
    real.mkdir(parents=True)
    (real / "team-a.pem").write_bytes(one.public_pem())
    (real / "team-b.pem").write_bytes(two.public_pem())
    (folder / "..data").symlink_to(real.name)
    for name in ("team-a.pem", "team-b.pem"):
        (folder / name).symlink_to(f"..data/{name}")
    (folder / ".hidden").write_text("not a key, and skipped")
    trust = ka.TrustedKeys.from_dir(folder)
    assert set(trust.ids) == {one.key_id, two.key_id}
    assert trust == ka.TrustedKeys.from_pem(one.public_pem(), two.public_pem(), source=str(folder))

    empty = tmp_path / "empty"
    (empty / "..data").mkdir(parents=True)
    with pytest.raises(ka.KeyFileError, match=rf"trusted keys {empty}: holds no keys; at least one Ed25519 public key"):
        ka.TrustedKeys.from_dir(empty)
    with pytest.raises(ka.KeyFileError, match=rf"--trusted-keys {tmp_path}/nope: does not exist"):
        ka.TrustedKeys.from_dir(tmp_path / "nope", what="--trusted-keys")
    with pytest.raises(ka.KeyFileError, match=r"no keys"):
        ka.TrustedKeys.from_pem()


def test_key_id_is_the_sha256_of_the_raw_public_key(keys):
    signer = keys["old"]
    assert signer.key_id == "ed25519:" + hashlib.sha256(signer.public_key).hexdigest()[:16]
    from cryptography.hazmat.primitives import serialization

    public = serialization.load_pem_public_key(signer.public_pem())
    assert ka.key_id(public) == ka.key_id(signer.public_key) == signer.key_id


# ------------------------------------------------------------------------------------------ publish and load


@pytest.mark.parametrize("store", ["file", "s3"], indirect=True)
def test_signed_publish_loads_with_trusted_keys(store, tmp_path, cache, keys):
    signer = keys["old"]
    dest = f"{store}/runs/tj-1"
    art = ka.publish(
        make_model(tmp_path / "src"), dest, format="onnx", metrics={"accuracy": 0.9}, lineage=LINEAGE, signer=signer
    )
    assert [s.key_id for s in art.manifest.signatures] == [signer.key_id]
    doc = stored_manifest(dest)
    (entry,) = doc["signatures"]
    assert entry["algorithm"] == "ed25519"
    assert base64.b64decode(entry["publicKey"]) == signer.public_key
    assert independently_verifies(doc, entry)
    assert (
        signed_bytes(doc)
        == SIGNATURE_CONTEXT
        + json.dumps(
            {k: v for k, v in doc.items() if k != "signatures"}, sort_keys=True, separators=(",", ":")
        ).encode()
    )

    trust = trusted(tmp_path, signer)
    loaded = ka.load(dest, trusted_keys=trust)
    assert loaded.trusted_key == signer.key_id
    assert loaded.digest == art.digest
    assert loaded.read_bytes("config.json") == (tmp_path / "src/config.json").read_bytes()
    assert ka.read_manifest(dest, trusted_keys=trust).signatures == art.manifest.signatures
    assert ka.verify_manifest(json.dumps(doc).encode(), trust, where=dest) == signer.key_id
    assert ka.signers(doc) == [signer.key_id]
    assert ka.load(dest).trusted_key is None  # without trusted keys nothing is checked or claimed
    if store.startswith("s3://"):
        # the cache keeps the manifest as stored, signatures and all
        assert independently_verifies(json.loads((loaded.root / ka.MANIFEST_NAME).read_text()), entry)
    # An identical re-publish returns the artifact as it is, whoever (if anyone) signs the second time.
    assert ka.publish(tmp_path / "src", dest, format="onnx").manifest.signatures == art.manifest.signatures
    assert ka.publish(tmp_path / "src", dest, format="onnx", signer=keys["new"]).digest == art.digest
    assert ka.load(dest, trusted_keys=trust).trusted_key == signer.key_id


def _set_parent(doc: dict[str, Any]) -> None:
    doc["lineage"]["parents"] = ["sha256:" + "ab" * 32]


def _set_producer(doc: dict[str, Any]) -> None:
    doc["lineage"]["producer"]["name"] = "someone-else"


def _set_metric(doc: dict[str, Any]) -> None:
    doc["metrics"]["accuracy"] = 0.99


def _add_field(doc: dict[str, Any]) -> None:
    doc["approvedBy"] = "security"


def _add_annotation(doc: dict[str, Any]) -> None:
    doc["annotations"]["kiln.dev/gates-passed"] = "true"


@pytest.mark.parametrize("store", ["file", "s3"], indirect=True)
@pytest.mark.parametrize("tamper", [_set_parent, _set_producer, _set_metric, _add_field, _add_annotation])
def test_a_changed_manifest_is_refused_before_any_file_is_read(store, tmp_path, cache, keys, tamper):
    signer = keys["old"]
    dest = f"{store}/runs/tj-1"
    ka.publish(
        make_model(tmp_path / "src"), dest, format="onnx", metrics={"accuracy": 0.5}, lineage=LINEAGE, signer=signer
    )
    doc = stored_manifest(dest)
    tamper(doc)
    store_manifest(dest, doc)
    # A file is gone too: refusing on the signature first means no file was looked at.
    resolve(dest).fs.rm_file(resolve(dest).child("config.json"))
    trust = trusted(tmp_path, signer)
    with pytest.raises(ka.SignatureMismatchError) as e:
        ka.load(dest, trusted_keys=trust)
    assert str(e.value) == (
        f"{dest}: signature invalid: the signature by trusted key {signer.key_id} does not verify; the manifest was "
        "changed after it was signed"
    )
    assert e.value.reason == "SignatureInvalid"
    assert e.value.uri == dest
    assert not cache.exists() or not any(cache.rglob("*.safetensors"))  # nothing downloaded
    with pytest.raises(ka.SignatureMismatchError):
        ka.read_manifest(dest, trusted_keys=trust)
    assert ka.signers(doc) == []  # not even its own embedded key vouches for it now


def test_swapped_weights_with_a_fixed_up_manifest_are_refused(tmp_path, keys):
    """The attack the signature is for: new weights, and the manifest's sha256, size and digest made to match."""
    signer = keys["old"]
    dest = f"file://{tmp_path}/a"
    ka.publish(make_model(tmp_path / "src"), dest, format="onnx", signer=signer)
    evil = b"\x00" * 1000
    (tmp_path / "a/model.safetensors").write_bytes(evil)
    doc = stored_manifest(dest)
    entry = next(f for f in doc["files"] if f["path"] == "model.safetensors")
    entry.update(size=len(evil), sha256=hashlib.sha256(evil).hexdigest())
    doc["digest"] = ka.compute_digest(ka.FileEntry(f["path"], f["size"], f["sha256"]) for f in doc["files"])
    store_manifest(dest, doc)
    assert ka.load(dest).read_bytes("model.safetensors") == evil  # consistent: the digest alone cannot tell
    with pytest.raises(ka.SignatureMismatchError, match="the manifest was changed after it was signed"):
        ka.load(dest, trusted_keys=trusted(tmp_path, signer))


@pytest.mark.parametrize("store", ["file", "s3"], indirect=True)
@pytest.mark.parametrize("rel", ["model.safetensors", "kiln-profile.json"])
def test_a_changed_file_is_caught_by_the_digest_with_a_valid_signature(store, tmp_path, cache, keys, rel):
    signer = keys["old"]
    src = make_model(tmp_path / "src")
    (src / "kiln-profile.json").write_text(json.dumps({"schema": "kiln.dev/profile/v1", "samples": 10}))
    dest = f"{store}/runs/tj-1"
    ka.publish(src, dest, format="onnx", signer=signer)
    size = len((src / rel).read_bytes())
    resolve(dest).fs.pipe_file(resolve(dest).child(rel), b"x" * size)  # same size, other bytes
    trust = trusted(tmp_path, signer)
    assert ka.read_manifest(dest, trusted_keys=trust).digest  # the manifest itself is intact and signed
    with pytest.raises(ka.IntegrityError, match=rf"file {re.escape(rel)}: sha256 mismatch"):
        ka.load(dest, trusted_keys=trust)


def test_unsigned_and_wrongly_signed_artifacts_are_refused(tmp_path, keys):
    unsigned = ka.publish(make_model(tmp_path / "src"), f"file://{tmp_path}/u", format="onnx")
    assert "signatures" not in stored_manifest(unsigned.uri)  # unsigned manifests read as they always have
    trust = trusted(tmp_path, keys["new"])
    with pytest.raises(ka.UnsignedArtifactError) as e:
        ka.load(unsigned.uri, trusted_keys=trust)
    assert str(e.value) == (
        f"{unsigned.uri}: unsigned: the manifest has no signatures; a signature by one of {keys['new'].key_id} is "
        "required"
    )
    assert e.value.reason == "Unsigned"
    assert ka.load(unsigned.uri).digest == unsigned.digest  # without trusted keys: as before

    other = ka.publish(tmp_path / "src", f"file://{tmp_path}/o", format="onnx", signer=keys["other"])
    with pytest.raises(ka.UntrustedKeyError) as e:
        ka.load(other.uri, trusted_keys=trust)
    assert str(e.value) == (
        f"{other.uri}: untrusted key: signed by {keys['other'].key_id}, none of them trusted "
        f"(trusted: {keys['new'].key_id})"
    )
    assert e.value.reason == "UntrustedKey"
    assert isinstance(e.value, ka.UntrustedArtifactError)
    with pytest.raises(ka.UnsignedArtifactError, match="hf://org/model: unsigned: an hf:// source has no Kiln"):
        ka.load("hf://org/model", trusted_keys=trust)  # refused before any download


def test_key_rotation(tmp_path, keys):
    old, new = keys["old"], keys["new"]
    art = ka.publish(make_model(tmp_path / "src"), f"file://{tmp_path}/a", format="onnx", signer=old)
    both, only_new = trusted(tmp_path, old, new, name="both"), trusted(tmp_path, new, name="new")
    # During the rotation both keys are trusted: artifacts signed with either verify.
    assert ka.load(art.uri, trusted_keys=both).trusted_key == old.key_id
    fresh = ka.publish(make_model(tmp_path / "src2", seed=1), f"file://{tmp_path}/b", format="onnx", signer=new)
    assert ka.load(fresh.uri, trusted_keys=both).trusted_key == new.key_id
    # Once only the new key is trusted, what the old key alone signed is refused...
    with pytest.raises(ka.UntrustedKeyError, match=f"signed by {old.key_id}, none of them trusted"):
        ka.load(art.uri, trusted_keys=only_new)
    # ...until it is signed with the new key too (the old signature stays, and is still checked where trusted).
    doc = new.sign(stored_manifest(art.uri))
    assert [s["keyId"] for s in doc["signatures"]] == [old.key_id, new.key_id]
    store_manifest(art.uri, doc)
    assert ka.load(art.uri, trusted_keys=only_new).trusted_key == new.key_id
    assert ka.load(art.uri, trusted_keys=both).trusted_key == old.key_id
    assert ka.signers(doc) == [old.key_id, new.key_id]
    assert new.sign(doc)["signatures"] == doc["signatures"]  # signing again replaces, never duplicates

    # A bad signature by a trusted key is an error even when another trusted key's signature is good, whichever
    # comes first.
    only_old = trusted(tmp_path, old, name="old")
    good = [dict(s) for s in doc["signatures"]]
    for broken, fine, trust_fine in ((0, 1, only_new), (1, 0, only_old)):
        doc["signatures"] = [dict(s) for s in good]
        doc["signatures"][broken]["signature"] = base64.b64encode(bytes(64)).decode()
        store_manifest(art.uri, doc)
        assert ka.load(art.uri, trusted_keys=trust_fine).trusted_key == good[fine]["keyId"]  # the broken one: untrusted
        with pytest.raises(ka.SignatureMismatchError, match=f"by trusted key {good[broken]['keyId']} does not verify"):
            ka.load(art.uri, trusted_keys=both)
        assert ka.signers(doc) == [good[fine]["keyId"]]


# ------------------------------------------------------------------------------------- malformed signatures


def _signed_doc(keys: dict[str, ka.Signer]) -> dict[str, Any]:
    manifest = ka.Manifest.build([ka.FileEntry("model.onnx", 3, "a" * 64)], kind="model", format="onnx")
    return keys["old"].sign(manifest.to_dict())


SIG = "signatures[0]"
KEY_RULE = f"{SIG}.publicKey: must be the base64 of a raw 32-byte Ed25519 public key"
SIGNATURE_RULE = f"{SIG}.signature: must be the base64 of a 64-byte Ed25519 signature"


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda s: s.update(algorithm="rsa"), f"{SIG}.algorithm: must be \"ed25519\", got 'rsa'"),
        (lambda s: s.update(keyId="ed25519:XYZ"), f'{SIG}.keyId: must be "ed25519:" followed by 16 lowercase hex'),
        (lambda s: s.update(keyId="ed25519:" + "0" * 16), f'{SIG}.keyId: "ed25519:{"0" * 16}" is not the id of'),
        (lambda s: s.update(publicKey="AAAA"), KEY_RULE),
        (lambda s: s.update(signature="not base64!"), SIGNATURE_RULE),
        (lambda s: s.pop("signature"), SIGNATURE_RULE + ", got None"),
        (lambda s: s.update(comment="x"), f"{SIG}: unknown field(s) comment"),
    ],
)
def test_malformed_signatures_are_named_by_field(keys, mutate, expected):
    doc = _signed_doc(keys)
    mutate(doc["signatures"][0])
    with pytest.raises(ka.InvalidManifestError) as e:
        ka.parse_manifest(doc, where="m.json")
    assert expected in str(e.value)
    # A reader that requires signatures refuses it as an invalid signature (no signer writes one), naming the field.
    with pytest.raises(ka.SignatureMismatchError) as e:
        ka.verify_manifest(doc, ka.TrustedKeys.from_pem(keys["old"].public_pem()), where="file:///a")
    assert str(e.value).startswith("file:///a: signature invalid: the signatures cannot be checked: ")
    assert expected in str(e.value)


def test_signatures_list_rules(keys):
    doc = _signed_doc(keys)
    for value, expected in (
        ({}, "signatures: must be a list"),
        (["x"], "signatures[0]: must be an object"),
        ([doc["signatures"][0]] * 2, 'signatures[1].keyId: "' + keys["old"].key_id + '" signs twice'),
        ([doc["signatures"][0]] * 17, "signatures: at most 16 signatures, got 17"),
    ):
        with pytest.raises(ka.InvalidManifestError, match=re.escape(expected)):
            ka.parse_manifest({**doc, "signatures": value})
    parsed = ka.parse_manifest(doc)
    assert parsed.to_dict() == doc  # round trip: the signature survives parse and serialise
    assert ka.parse_manifest({**doc, "signatures": []}).signatures == ()


# ------------------------------------------------------------------------------------------------- registry


def test_registry_records_who_signed(tmp_path, keys):
    reg = ka.Registry(f"file://{tmp_path}/registry")
    signed = ka.publish(make_model(tmp_path / "s"), f"file://{tmp_path}/signed", format="onnx", signer=keys["old"])
    v1 = reg.promote(signed.uri, "m")
    assert v1.signed_by == [keys["old"].key_id]
    record_file = tmp_path / "registry/models/m/versions/1.json"
    assert json.loads(record_file.read_text())["signedBy"] == [keys["old"].key_id]
    assert reg.get("m", 1).signed_by == [keys["old"].key_id]
    # Loading through the registry checks the signature too.
    assert reg.load("m", trusted_keys=trusted(tmp_path, keys["old"])).trusted_key == keys["old"].key_id
    with pytest.raises(ka.UntrustedKeyError):
        reg.load("m", trusted_keys=trusted(tmp_path, keys["new"], name="new"))

    unsigned = ka.publish(make_model(tmp_path / "u", seed=1), f"file://{tmp_path}/unsigned", format="onnx")
    v2 = reg.promote(unsigned.uri, "m")
    assert v2.signed_by == []
    assert "signedBy" not in json.loads((tmp_path / "registry/models/m/versions/2.json").read_text())
    # A signature that no longer verifies (the manifest changed) is not recorded as a signer.
    doc = stored_manifest(signed.uri)
    doc["metrics"] = {"accuracy": 1.0}
    store_manifest(signed.uri, doc)
    assert reg.promote(signed.uri, "m").signed_by == []

    # Records written before signatures existed still load; a broken signedBy is named.
    old = json.loads(record_file.read_text())
    del old["signedBy"]
    record_file.write_text(json.dumps(old))
    assert reg.get("m", 1).signed_by == []
    old["signedBy"] = "ed25519:0"
    record_file.write_text(json.dumps(old))
    with pytest.raises(ka.InvalidManifestError, match='signedBy: must be a list of key ids "ed25519:<16 hex>"'):
        reg.get("m", 1)


def test_verify_cli_names_an_unsigned_artifact(tmp_path, keys, capsys):
    art = ka.publish(make_model(tmp_path / "src"), f"file://{tmp_path}/a", format="onnx")
    folder = tmp_path / "trust"
    folder.mkdir()
    (folder / "k.pem").write_bytes(keys["new"].public_pem())
    assert main(["verify", art.uri, "--trusted-keys", str(folder)]) == 2
    assert f"UnsignedArtifactError: {art.uri}: unsigned" in capsys.readouterr().err
    assert main(["verify", art.uri, "--trusted-keys", str(tmp_path / "nope")]) == 2
    assert f"trusted keys {tmp_path}/nope: does not exist" in capsys.readouterr().err
