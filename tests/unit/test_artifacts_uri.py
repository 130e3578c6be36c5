"""URIs: the one canonical spelling of each scheme, and every rejection naming the field and the rule."""

from __future__ import annotations

import re

import pytest

from kiln_artifacts import InvalidURIError, ReadOnlyStoreError, parse_uri
from kiln_artifacts.errors import InvalidNameError
from kiln_artifacts.k8s import hf_env, pvc_volume, s3_env
from kiln_artifacts.uri import writable


@pytest.mark.parametrize(
    ("value", "scheme", "authority", "path", "canonical"),
    [
        ("file:///var/kiln/run-1", "file", "", "/var/kiln/run-1", "file:///var/kiln/run-1"),
        ("file://localhost/var/kiln/", "file", "", "/var/kiln", "file:///var/kiln"),
        ("pvc://models/runs/tj-1", "pvc", "models", "runs/tj-1", "pvc://models/runs/tj-1"),
        ("pvc://my.claim", "pvc", "my.claim", "", "pvc://my.claim"),
        ("s3://my-bucket/kiln/runs/", "s3", "my-bucket", "kiln/runs", "s3://my-bucket/kiln/runs"),
        ("s3://my-bucket", "s3", "my-bucket", "", "s3://my-bucket"),
        ("hf://sentence-transformers/all-MiniLM-L6-v2", "hf", "", "sentence-transformers/all-MiniLM-L6-v2", None),
    ],
)
def test_valid_uris_parse_to_one_canonical_spelling(value, scheme, authority, path, canonical):
    uri = parse_uri(value)
    assert (uri.scheme, uri.authority, uri.path) == (scheme, authority, path)
    assert str(uri) == (canonical or value)
    assert parse_uri(str(uri)) == uri


def test_hf_revision_and_read_only():
    uri = parse_uri("hf://org/name@v1.0")
    assert (uri.path, uri.revision) == ("org/name", "v1.0")
    assert str(uri) == "hf://org/name@v1.0"
    with pytest.raises(ReadOnlyStoreError, match="read-only"):
        writable(uri)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "spec.output.uri: must not be empty"),
        ("/var/kiln/x", "missing scheme; expected one of file://, pvc://, s3://, hf://"),
        ("http://example.com/x", 'unsupported scheme "http" (supported: file, pvc, s3, hf)'),
        ("gs://bucket/x", 'unsupported scheme "gs"'),
        ("file://relative/path", 'file URIs must not name a host ("relative")'),
        ("file://", "file URIs need an absolute path"),
        ("file:///a/../etc", "path must not contain '..' segments"),
        ("file:///a//b", "path has an empty segment ('//')"),
        ("file:///a/b c", "must not contain whitespace or control characters"),
        ("s3://bucket/key?versionId=1", "must not contain a query string"),
        ("s3://bucket/key#frag", "must not contain a fragment"),
        ("s3://bucket/a%2Fb", "must not contain percent-encoding"),
        ("s3://Bucket_1/x", 'bucket "Bucket_1" must be 3-63 lowercase letters'),
        ("s3://ab/x", 'bucket "ab" must be 3-63'),
        ("s3://192.168.1.1/x", "not look like an IP address"),
        ("s3:///x", "missing bucket"),
        ("s3://key:secret@bucket/x", "credentials and endpoints do not belong in the URI; reference a Secret"),
        ("pvc:///x", "missing claim name: pvc://<claim>/<path>"),
        ("pvc://Models/x", 'claim "Models" must be a DNS-1123 subdomain'),
        ("pvc://models/./x", "path must not contain '.' segments"),
        ("hf://just-a-name", "hf URIs name a repository: hf://<org>/<name>[@<revision>]"),
        ("hf://org/name/extra", "hf URIs name a repository"),
        ("hf://org/bad--name", 'name "bad--name" must be 1-96 letters'),
        ("hf://org/name@../x", 'revision "../x" must be a branch, tag or commit'),
    ],
)
def test_bad_uris_are_rejected_with_the_rule_they_break(value, message):
    with pytest.raises(InvalidURIError) as e:
        parse_uri(value, field="spec.output.uri")
    assert message in str(e.value)
    assert str(e.value).startswith("spec.output.uri: ")


def test_non_string_and_overlong_uris():
    with pytest.raises(InvalidURIError, match="uri: must be a string URI, got int"):
        parse_uri(42)
    with pytest.raises(InvalidURIError, match="longer than 4096 characters"):
        parse_uri("s3://bucket/" + "a" * 5000)
    with pytest.raises(InvalidURIError, match="segment longer than 255 bytes"):
        parse_uri("file:///" + "a" * 300)


def test_join_parent_and_within():
    base = parse_uri("s3://bucket/kiln")
    run = base.join("runs/tj-1")
    assert str(run) == "s3://bucket/kiln/runs/tj-1"
    assert str(run.parent) == "s3://bucket/kiln/runs"
    assert run.is_within(base)
    assert not parse_uri("s3://bucket/kilnx").is_within(base)
    assert str(parse_uri("file:///a").join("b", "c")) == "file:///a/b/c"
    with pytest.raises(InvalidURIError, match=re.escape("'..' segments")):
        base.join("../escape")


def test_pvc_resolves_under_the_mount_root(monkeypatch, tmp_path):
    monkeypatch.setenv("KILN_PVC_ROOT", str(tmp_path))
    assert parse_uri("pvc://models/runs/a").local_path() == tmp_path / "models" / "runs" / "a"
    monkeypatch.delenv("KILN_PVC_ROOT")
    assert str(parse_uri("pvc://models/x").local_path()) == "/mnt/kiln/pvc/models/x"


def test_pvc_volume_for_the_operator():
    spec = pvc_volume("pvc://models/runs/tj-1", read_only=True)
    assert spec["volume"] == {
        "name": "kiln-pvc-models",
        "persistentVolumeClaim": {"claimName": "models", "readOnly": True},
    }
    assert spec["volumeMount"] == {"name": "kiln-pvc-models", "mountPath": "/mnt/kiln/pvc/models", "readOnly": True}
    assert spec["path"] == "/mnt/kiln/pvc/models/runs/tj-1"
    assert spec["env"] == [{"name": "KILN_PVC_ROOT", "value": "/mnt/kiln/pvc"}]
    long = pvc_volume("pvc://" + "a" * 70, read_only=False)["volume"]["name"]
    assert len(long) <= 63
    with pytest.raises(InvalidNameError, match=re.escape('spec.output.uri: "s3://bucket/x" is not a pvc:// URI')):
        pvc_volume("s3://bucket/x", read_only=False, field="spec.output.uri")


def test_s3_credentials_come_from_a_secret_reference():
    env = s3_env("s3-creds", endpoint_url="http://minio:9000", region="eu-west-1")
    assert env[0] == {
        "name": "AWS_ACCESS_KEY_ID",
        "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}},
    }
    assert env[1]["valueFrom"]["secretKeyRef"] == {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}
    assert {"name": "AWS_ENDPOINT_URL_S3", "value": "http://minio:9000"} in env
    assert all("value" not in e for e in env if e["name"].startswith("AWS_") and "KEY" in e["name"])
    assert hf_env(None) == []
    assert hf_env("hf")[0]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "HF_TOKEN"}
    with pytest.raises(InvalidNameError, match="secret name 'Bad_Name': must be a DNS-1123 subdomain"):
        s3_env("Bad_Name")
