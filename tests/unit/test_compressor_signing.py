"""The compressor and signatures: with --trusted-keys the source must be signed by a trusted key or the run exits
14 (Untrusted) before any work; with --signing-key the published candidate is signed. The source is KilnCNN
trained by the trainer on the packaged digits (shared with the other compressor tests), signed here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from support.compressor import compress, image_model, shared_root, spec

import kiln_artifacts as ka
from kiln_artifacts.contract import ExitCode, UserError


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The trained model, unsigned as the trainer published it and as a signed copy; the keys and a trust dir."""
    model, data = image_model(tmp_path_factory)
    root = tmp_path_factory.mktemp("signing")
    source_key, compressor_key, stranger = ka.Signer.generate(), ka.Signer.generate(), ka.Signer.generate()
    trust = root / "trusted-keys"
    trust.mkdir()
    (trust / "training.pem").write_bytes(source_key.public_pem())
    (trust / "compression.pem").write_bytes(compressor_key.public_pem())
    private = root / "compressor-key" / "private-key.pem"
    private.parent.mkdir()
    private.write_bytes(compressor_key.private_pem())

    def signed_copy(name: str, signer: ka.Signer) -> str:
        folder = root / name
        shutil.copytree(ka.load(model).root, folder)
        doc = json.loads((folder / ka.MANIFEST_NAME).read_text())
        (folder / ka.MANIFEST_NAME).write_text(json.dumps(signer.sign(doc), indent=2))
        return f"file://{folder}"

    return {
        "model": model,
        "data": data,
        "cache": shared_root(tmp_path_factory) / "cache",
        "signed": signed_copy("signed-model", source_key),
        "stranger": signed_copy("stranger-model", stranger),
        "trust": trust,
        "private": private,
        "source_key": source_key,
        "compressor_key": compressor_key,
    }


def test_a_trusted_source_is_compressed_and_the_candidate_signed(setup: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "candidate"
    s = spec(setup["signed"], setup["data"], [{"export": {}}])
    code, message = compress(
        tmp_path, s, "--output-uri", f"file://{out}", "--trusted-keys", str(setup["trust"]),
        "--signing-key", str(setup["private"]), cache=setup["cache"],
    )  # fmt: skip
    assert code == ExitCode.SUCCEEDED, message
    key = setup["compressor_key"].key_id
    only_compressor = ka.TrustedKeys.from_pem(setup["compressor_key"].public_pem())
    art = ka.load(f"file://{out}", trusted_keys=only_compressor)
    assert art.trusted_key == key
    assert message["artifact"] == {"uri": art.uri, "digest": art.digest, "signedBy": [key]}
    assert art.manifest.lineage.parents == (ka.load(setup["signed"]).digest,)
    assert art.manifest.format == "onnx"


@pytest.mark.parametrize("case", ["unsigned", "tampered", "untrusted", "plain-folder"])
def test_an_unverified_source_exits_untrusted_before_any_work(setup: dict[str, Any], tmp_path: Path, case: str) -> None:
    source = {"unsigned": setup["model"], "tampered": setup["signed"], "untrusted": setup["stranger"]}.get(case)
    if case == "tampered":  # a copy of the signed source whose metrics were raised after signing
        folder = tmp_path / "tampered"
        shutil.copytree(setup["signed"].removeprefix("file://"), folder)
        doc = json.loads((folder / ka.MANIFEST_NAME).read_text())
        doc["metrics"]["eval_accuracy"] = 1.0
        (folder / ka.MANIFEST_NAME).write_text(json.dumps(doc))
        source = f"file://{folder}"
    if case == "plain-folder":  # the model's files without any manifest, which the compressor otherwise accepts
        folder = tmp_path / "plain"
        shutil.copytree(ka.load(setup["model"]).root, folder, ignore=shutil.ignore_patterns(ka.MANIFEST_NAME))
        source = f"file://{folder}"
    assert source is not None
    out, cache = tmp_path / "candidate", tmp_path / "cache"
    s = spec(source, setup["data"], [{"export": {}}])
    code, message = compress(
        tmp_path, s, "--output-uri", f"file://{out}", "--trusted-keys", str(setup["trust"]), cache=cache
    )
    assert code == ExitCode.UNTRUSTED == 14
    assert message["exitCode"] == 14
    assert message["reason"] == "Untrusted"
    expected = {
        "unsigned": f"source.uri: {source}: unsigned: the manifest has no signatures",
        "tampered": f"source.uri: {source}: signature invalid: the signature by trusted key "
        f"{setup['source_key'].key_id} does not verify",
        "untrusted": f"source.uri: {source}: untrusted key: signed by ",
        "plain-folder": f"source.uri: {source}: unsigned: a plain folder without kiln-manifest.json has no signature",
    }[case]
    assert message["message"].startswith(expected), message
    assert not cache.exists()  # no step ran
    assert not out.exists()


def test_keys_from_the_environment_and_bad_key_directories(setup: dict[str, Any], tmp_path: Path) -> None:
    from kiln_compressor.config import parse_config

    env = {"KILN_COMPRESSION_SPEC": json.dumps(spec(setup["signed"], setup["data"]))}
    cfg = parse_config([], {**env, "KILN_TRUSTED_KEYS": str(setup["trust"]), "KILN_SIGNING_KEY": str(setup["private"])})
    assert cfg.trusted_keys is not None
    assert set(cfg.trusted_keys.ids) == {setup["source_key"].key_id, setup["compressor_key"].key_id}
    assert cfg.signer is not None
    assert cfg.signer.key_id == setup["compressor_key"].key_id
    cfg = parse_config([], env)
    assert (cfg.trusted_keys, cfg.signer) == (None, None)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=f"--trusted-keys {empty}: holds no keys"):
        parse_config(["--trusted-keys", str(empty)], env)
    with pytest.raises(UserError, match=f"KILN_TRUSTED_KEYS {tmp_path}/nope: does not exist"):
        parse_config([], {**env, "KILN_TRUSTED_KEYS": str(tmp_path / "nope")})
    with pytest.raises(UserError, match=rf"--signing-key {setup['trust']}/training\.pem: holds a public key"):
        parse_config(["--signing-key", str(setup["trust"] / "training.pem")], env)
