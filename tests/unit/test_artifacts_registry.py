"""Promotion registry (names, versions, history, latest; concurrent promotions) and retention."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta

import pytest
from support.artifacts import make_model

import kiln_artifacts as ka
from kiln_artifacts.storage import resolve


def publish_n(store: str, tmp_path, n: int, folder: str = "runs", kind: str = "model") -> list[ka.Artifact]:
    return [
        ka.publish(
            make_model(tmp_path / f"{folder}-src-{i}", seed=i), f"{store}/{folder}/r{i}", format="onnx", kind=kind
        )
        for i in range(n)
    ]


def test_promote_history_latest_without_copying(store, tmp_path, cache):
    a, b = publish_n(store, tmp_path, 2)
    reg = ka.Registry(f"{store}/registry")
    with pytest.raises(ka.NotPromotedError, match="model 'bert' has no promoted version in"):
        reg.latest("bert")
    v1 = reg.promote(a.uri, "bert", promoted_by="ModelCompression/team-a/bert", note="first")
    v2 = reg.promote(b.uri, "bert")
    v3 = reg.promote(a.uri, "bert", note="rollback")  # promoting an older artifact again is a new version
    assert [v.version for v in (v1, v2, v3)] == [1, 2, 3]
    assert reg.latest("bert").digest == a.digest
    assert [(v.version, v.digest) for v in reg.versions("bert")] == [(1, a.digest), (2, b.digest), (3, a.digest)]
    assert reg.get("bert", 1).promoted_by == "ModelCompression/team-a/bert"
    assert reg.models() == ["bert"]
    assert reg.referenced_digests() == {a.digest, b.digest}
    # The record points at the artifact: no bytes were copied into the registry.
    loc = resolve(f"{store}/registry")
    assert sorted(p.rsplit("/", 1)[-1] for p in loc.fs.find(loc.path)) == ["1.json", "2.json", "3.json"]
    record = json.loads(loc.fs.cat_file(loc.child("models/bert/versions/3.json")))
    assert record["uri"] == a.uri
    assert record["digest"] == a.digest
    assert record["note"] == "rollback"
    # Loading a promoted version pins its digest.
    assert reg.load("bert").digest == a.digest
    assert reg.load("bert", 2).digest == b.digest
    # A retried promotion can be idempotent.
    assert reg.promote(a.uri, "bert", unless_latest=True).version == 3


def test_versions_sort_numerically(tmp_path):
    art = publish_n(f"file://{tmp_path}/s", tmp_path, 1)[0]
    reg = ka.Registry(f"file://{tmp_path}/s/registry")
    for _ in range(11):
        reg.promote(art.uri, "m")
    assert [v.version for v in reg.versions("m")] == list(range(1, 12))
    assert reg.latest("m").version == 11


def test_promotion_input_is_checked(tmp_path):
    art = publish_n(f"file://{tmp_path}/s", tmp_path, 1)[0]
    reg = ka.Registry(f"file://{tmp_path}/s/registry")
    with pytest.raises(ka.InvalidNameError, match="model name 'Bert Base': must be 1-128 lowercase letters"):
        reg.promote(art.uri, "Bert Base")
    with pytest.raises(ka.ArtifactNotFoundError, match="no artifact"):
        reg.promote(f"file://{tmp_path}/s/runs/missing", "bert")
    with pytest.raises(ka.IntegrityError, match=r"expected sha256:0+"):
        reg.promote(art.uri, "bert", expected_digest="sha256:" + "0" * 64)
    with pytest.raises(ka.InvalidURIError, match='registry: invalid URI "ftp://x"'):
        ka.Registry("ftp://x")
    with pytest.raises(ka.NotPromotedError, match="has no version 7"):
        reg.get("bert", 7)
    assert reg.versions("bert") == []


PROMOTER = r"""
import sys
import kiln_artifacts as ka
registry, artifact, who, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
reg = ka.Registry(registry)
print(" ".join(str(reg.promote(artifact, "bert", note=f"{who}-{i}").version) for i in range(n)), flush=True)
"""


def test_concurrent_promotions_lose_no_version_across_processes(tmp_path):
    art = publish_n(f"file://{tmp_path}/s", tmp_path, 1)[0]
    registry = f"file://{tmp_path}/s/registry"
    procs = [
        subprocess.Popen([sys.executable, "-c", PROMOTER, registry, art.uri, f"p{i}", "8"], stdout=subprocess.PIPE)
        for i in range(4)
    ]
    got = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        got += [int(v) for v in out.split()]
    assert sorted(got) == list(range(1, 33))  # every promotion got its own number, none lost
    notes = sorted(v.note for v in ka.Registry(registry).versions("bert"))
    assert notes == sorted(f"p{i}-{j}" for i in range(4) for j in range(8))


def test_concurrent_promotions_on_s3_use_conditional_writes(s3_bucket, tmp_path):
    art = publish_n(s3_bucket, tmp_path, 1)[0]
    reg = ka.Registry(f"{s3_bucket}/registry")
    barrier = threading.Barrier(4)
    got: list[int] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        barrier.wait()
        for j in range(5):
            v = reg.promote(art.uri, "bert", note=f"t{i}-{j}")
            with lock:
                got.append(v.version)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 21))
    assert sorted(v.note for v in reg.versions("bert")) == sorted(f"t{i}-{j}" for i in range(4) for j in range(5))


def test_s3_exclusive_create_refuses_an_existing_version(s3_bucket):
    reg = ka.Registry(f"{s3_bucket}/registry")
    key = f"{reg.loc.path}/models/bert/versions/1.json"
    assert reg._create(key, b"{}") is True
    assert reg._create(key, b"{}") is False  # If-None-Match: * on a real S3 API
    assert reg.loc.fs.cat_file(key) == b"{}"


# --- retention ------------------------------------------------------------------------------------------------


def aged(store: str, tmp_path, ages_days: list[int], folder: str, kind: str = "model") -> list[ka.Artifact]:
    """Artifacts created ``ages_days`` ago (newest last in the list is not assumed)."""
    out = []
    for i, days in enumerate(ages_days):
        src = make_model(tmp_path / f"{folder}-{i}", seed=hash((folder, i)) % 10_000)
        out.append(ka.publish(src, f"{store}/{folder}/v{i}", format="onnx", kind=kind))
        # Rewrite the creation time as if published long ago (the digest covers files only).
        loc = resolve(f"{store}/{folder}/v{i}")
        data = json.loads(loc.fs.cat_file(loc.child("kiln-manifest.json")))
        data["createdAt"] = (datetime.now(UTC) - timedelta(days=days)).isoformat().replace("+00:00", "Z")
        if loc.local is not None:
            (loc.local / "kiln-manifest.json").write_text(json.dumps(data))
        else:
            loc.fs.pipe_file(loc.child("kiln-manifest.json"), json.dumps(data).encode())
    return out


def test_retention_never_deletes_referenced_or_promoted(store, tmp_path, cache):
    ckpts = aged(store, tmp_path, [50, 40, 30, 20, 10, 1], "ckpt/tj-1", kind="checkpoint")
    data = aged(store, tmp_path, [90], "data", kind="dataset")
    reg = ka.Registry(f"{store}/registry")
    reg.promote(ckpts[0].uri, "bert")  # the oldest checkpoint was promoted
    live = ckpts[1].digest  # a ModelDeployment serves the second oldest
    policy = ka.RetentionPolicy(keep_last=2, max_age=timedelta(days=15))

    plan = ka.plan_retention(store, policy, referenced_digests={live}, registries=[reg])
    why = {d.uri: d for d in plan.decisions}
    assert why[ckpts[0].uri].reason == "promoted as bert version 1"
    assert why[ckpts[1].uri].reason == "referenced by a live resource"
    assert {d.uri for d in plan.to_delete} == {ckpts[2].uri, ckpts[3].uri}
    assert why[ckpts[2].uri].reason == f"not among the 2 newest in {store}/ckpt/tj-1 and older than 15 days, 0:00:00"
    assert why[ckpts[4].uri].reason == f"among the 2 newest in {store}/ckpt/tj-1"
    assert why[data[0].uri].reason == "kind dataset is not covered by the policy"
    assert data[0].uri in {d.uri for d in plan.to_keep}  # datasets are not covered by this policy

    deleted = ka.apply_retention(plan, referenced_digests={live}, registries=[reg])
    assert sorted(deleted) == sorted([ckpts[2].uri, ckpts[3].uri])
    remaining = {a.uri for a in ka.list_artifacts(store)}
    assert remaining == {ckpts[0].uri, ckpts[1].uri, ckpts[4].uri, ckpts[5].uri, data[0].uri}
    for uri in remaining:
        ka.load(uri, verify="full")
    assert reg.load("bert").digest == ckpts[0].digest


def test_retention_rechecks_promotions_made_after_planning(tmp_path):
    store = f"file://{tmp_path}/s"
    arts = aged(store, tmp_path, [30, 20, 10], "runs")
    plan = ka.plan_retention(store, ka.RetentionPolicy(keep_last=1))
    assert len(plan.to_delete) == 2
    reg = ka.Registry(f"{store}/registry")
    reg.promote(arts[0].uri, "late")  # promoted between planning and applying
    assert ka.apply_retention(plan, registries=[reg]) == [arts[1].uri]
    ka.load(arts[0].uri, verify="full")


def test_retention_by_age_only_and_groups(tmp_path):
    store = f"file://{tmp_path}/s"
    a = aged(store, tmp_path, [10, 1], "ckpt/a", kind="checkpoint")
    b = aged(store, tmp_path, [10], "ckpt/b", kind="checkpoint")
    plan = ka.plan_retention(store, ka.RetentionPolicy(max_age=timedelta(days=5)))
    assert {d.uri for d in plan.to_delete} == {a[0].uri, b[0].uri}
    plan = ka.plan_retention(store, ka.RetentionPolicy(keep_last=1))  # per folder: a keeps its newest, b its only
    assert {d.uri for d in plan.to_delete} == {a[0].uri}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "retention policy: set keep_last, max_age or both"),
        ({"keep_last": -1}, "keep_last must be an integer >= 0, got -1"),
        ({"max_age": timedelta(0)}, "max_age must be a positive timedelta"),
        ({"keep_last": 1, "kinds": ("weights",)}, "kinds ['weights'] are not among model, checkpoint, dataset"),
    ],
)
def test_bad_retention_policies(kwargs, message):
    with pytest.raises(ka.InvalidNameError) as e:
        ka.RetentionPolicy(**kwargs)
    assert message in str(e.value)
