"""The server with --trusted-keys: it serves an artifact signed by a trusted key, names the key in the model's
metadata and its log, and refuses at start-up, with exit code 14 and a termination message saying why, an artifact
that is unsigned, changed after signing or signed by a key it does not trust. Real server processes on loopback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.server import ServerProcess, digits_pixels, image_artifact, run_server

import kiln_artifacts as ka
from kiln_artifacts.contract import ExitCode


@pytest.fixture(scope="module")
def signing(root: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The image model, signed by a trusted key and by a stranger; the trusted-keys directory."""
    base = tmp_path_factory.mktemp("server-signing")
    trusted_key, stranger = ka.Signer.generate(), ka.Signer.generate()
    trust = base / "trusted-keys"
    trust.mkdir()
    (trust / "release.pem").write_bytes(trusted_key.public_pem())
    plain = image_artifact(root)[0]

    def signed_copy(name: str, signer: ka.Signer) -> str:
        folder = base / name
        shutil.copytree(plain.removeprefix("file://"), folder)
        doc = json.loads((folder / ka.MANIFEST_NAME).read_text())
        (folder / ka.MANIFEST_NAME).write_text(json.dumps(signer.sign(doc), indent=2))
        return f"file://{folder}"

    return {
        "key": trusted_key,
        "trust": trust,
        "plain": plain,
        "signed": signed_copy("signed", trusted_key),
        "stranger": signed_copy("stranger", stranger),
        "base": base,
    }


def test_serves_a_signed_artifact_and_names_the_key(signing: dict[str, Any], tmp_path: Path) -> None:
    key = signing["key"].key_id
    server = ServerProcess(tmp_path, signing["signed"], "--trusted-keys", str(signing["trust"])).start()
    try:
        server.wait_ready()
        status, _, body = server.request("GET", "/v2/models/m")
        assert status == 200
        params = json.loads(body)["parameters"]
        assert params["signed_by"] == key
        assert params["digest"] == ka.read_manifest(signing["signed"]).digest
        status, doc = server.infer(
            {"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [1, 1, 8, 8],
                         "data": digits_pixels()[0][:1].ravel().tolist()}]}
        )  # fmt: skip
        assert status == 200, doc
        assert np.asarray(doc["outputs"][0]["data"]).shape == (10,)
        assert f"signed by trusted key {key}" in server.log
    finally:
        assert server.terminate() == 0, server.log


@pytest.mark.parametrize("case", ["unsigned", "tampered", "untrusted"])
def test_refuses_an_artifact_its_keys_do_not_vouch_for(signing: dict[str, Any], tmp_path: Path, case: str) -> None:
    uri = {"unsigned": signing["plain"], "tampered": signing["signed"], "untrusted": signing["stranger"]}[case]
    if case == "tampered":  # the signed artifact, with a label the signer never wrote
        folder = tmp_path / "tampered"
        shutil.copytree(uri.removeprefix("file://"), folder)
        doc = json.loads((folder / ka.MANIFEST_NAME).read_text())
        doc["annotations"]["kiln.dev/gates-passed"] = "true"
        (folder / ka.MANIFEST_NAME).write_text(json.dumps(doc))
        uri = f"file://{folder}"
    (tmp_path / "termination-log").write_text("")  # the server writes only into a file that is there
    code, log, term = run_server(tmp_path, uri, "--trusted-keys", str(signing["trust"]))
    assert code == ExitCode.UNTRUSTED == 14, log
    message = json.loads(term)
    assert (message["exitCode"], message["reason"]) == (14, "Untrusted")
    expected = {
        "unsigned": f"artifact {uri}: unsigned: the manifest has no signatures",
        "tampered": f"artifact {uri}: signature invalid: the signature by trusted key {signing['key'].key_id}",
        "untrusted": f"artifact {uri}: untrusted key: signed by ",
    }[case]
    assert message["message"].startswith(expected), message
    assert "cannot serve" in log
    assert "loaded " not in log  # refused before the model was read


def test_trusted_keys_flag_and_variable_are_checked_at_start(signing: dict[str, Any], tmp_path: Path) -> None:
    from kiln_server.config import UsageError, parse_config

    uri = signing["signed"]
    config = parse_config(["--model-uri", uri], {"KILN_SERVER_TRUSTED_KEYS": str(signing["trust"])})
    assert config.trusted_keys == str(signing["trust"])
    assert parse_config(["--model-uri", uri], {}).trusted_keys is None
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "key.pem").write_bytes(ka.Signer.generate().private_pem())
    with pytest.raises(UsageError, match=r"--trusted-keys: key\.pem: holds a private key; trusted keys are public"):
        parse_config(["--model-uri", uri, "--trusted-keys", str(bad)], {})
    with pytest.raises(UsageError, match=rf"KILN_SERVER_TRUSTED_KEYS: does not exist; .* \(got '{tmp_path}/nope'\)"):
        parse_config(["--model-uri", uri], {"KILN_SERVER_TRUSTED_KEYS": str(tmp_path / "nope")})
