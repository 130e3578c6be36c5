"""The trainer signs the model it publishes with --signing-key ($KILN_SIGNING_KEY); a bad key is a usage error
before any training. A real, short training run on the packaged digits; the signature is checked with the public
key alone."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")

from support.trainer import run_trainer

import kiln_artifacts as ka
from kiln_artifacts import samples
from kiln_artifacts.contract import ExitCode

SHORT = ["--learning-rate", "0.003", "--batch-size", "32", "--max-steps", "4", "--precision", "fp32"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> str:
    dest = tmp_path_factory.mktemp("data") / "digits"
    return samples.publish_dataset("digits", f"file://{dest}").uri


def test_the_published_model_carries_a_signature_that_verifies(tmp_path: Path, digits: str) -> None:
    signer = ka.Signer.generate()
    key = tmp_path / "secret" / "private-key.pem"
    key.parent.mkdir()
    key.write_bytes(signer.private_pem())
    (tmp_path / "trusted").mkdir()
    (tmp_path / "trusted" / "public-key.pem").write_bytes(signer.public_pem())
    out, ck = tmp_path / "model", tmp_path / "ck"
    code, message, log = run_trainer(
        tmp_path, *SHORT, "--dataset-uri", digits, "--output-uri", f"file://{out}",
        "--checkpoint-uri", f"file://{ck}", "--checkpoint-every-steps", "2", "--signing-key", str(key),
    )  # fmt: skip
    assert code == ExitCode.SUCCEEDED, log
    trusted = ka.TrustedKeys.from_dir(tmp_path / "trusted")
    art = ka.load(f"file://{out}", trusted_keys=trusted)
    assert art.trusted_key == signer.key_id
    assert message["artifact"] == {"uri": art.uri, "digest": art.digest, "signedBy": [signer.key_id]}
    assert f"published {art.uri} ({art.digest}; signed by {signer.key_id})" in log
    # The signature covers what the trainer recorded: its lineage names the data set it trained on.
    assert art.manifest.lineage.dataset.uri == digits
    # Checkpoints are the trainer's own resume points: not signed.
    checkpoint = ka.read_manifest(f"file://{ck}/step-00000004")
    assert checkpoint.kind == "checkpoint"
    assert checkpoint.signatures == ()


def test_a_bad_signing_key_is_a_usage_error_naming_the_flag(tmp_path: Path, digits: str) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ec_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    bad = tmp_path / "ec.pem"
    bad.write_bytes(ec_key)
    out = tmp_path / "model"
    code, message, _ = run_trainer(
        tmp_path, *SHORT, "--dataset-uri", digits, "--output-uri", f"file://{out}", "--signing-key", str(bad)
    )
    assert code == ExitCode.USER_ERROR
    assert message["reason"] == "UserError"
    assert message["message"].startswith(f"--signing-key {bad}: an EC key on secp256r1; Kiln signs with Ed25519 only")
    assert not out.exists()  # refused before any training
    code, message, _ = run_trainer(
        tmp_path, *SHORT, "--dataset-uri", digits, "--signing-key", str(tmp_path / "missing.pem")
    )
    assert code == ExitCode.USER_ERROR
    assert message["message"].startswith(f"--signing-key {tmp_path}/missing.pem: cannot read:")


def test_the_signing_key_from_the_environment_is_named_by_its_variable(tmp_path: Path, digits: str) -> None:
    from kiln_artifacts.contract import UserError
    from kiln_trainer.config import parse_config

    key = tmp_path / "private-key.pem"
    signer = ka.Signer.generate()
    key.write_bytes(signer.private_pem())
    cfg = parse_config(["--dataset-uri", digits], {"KILN_SIGNING_KEY": str(key)})
    assert cfg.signer is not None
    assert cfg.signer.key_id == signer.key_id
    assert parse_config(["--dataset-uri", digits], {}).signer is None
    key.write_bytes(signer.public_pem())
    with pytest.raises(UserError, match=f"KILN_SIGNING_KEY {key}: holds a public key; signing needs the private key"):
        parse_config(["--dataset-uri", digits], {"KILN_SIGNING_KEY": str(key)})
