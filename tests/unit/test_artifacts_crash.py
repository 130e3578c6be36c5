"""A publish killed with SIGKILL at any point never leaves a visible partial artifact, and cleanup removes the rest.

Each store gets a publisher subprocess killed (1) at every step it reports (after each file, after the manifest,
after verification, after the commit) and (2) at random moments of its run. After every kill the invariants are
checked: whatever is visible verifies completely and has the expected digest; the destination of a publish
killed before its commit shows nothing. At the end, cleanup() leaves only complete artifacts.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from support.artifacts import local_files, s3_keys

import kiln_artifacts as ka
from kiln_artifacts.storage import resolve

CHILD = r"""
import os, signal, sys
import kiln_artifacts as ka
from kiln_artifacts.storage import resolve

src, dest, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
resolve(dest)  # imports and connects before the clock starts
steps = []

def progress(p):
    steps.append(p.phase)
    if len(steps) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

print("READY", flush=True)
sys.stdin.readline()
ka.publish(src, dest, format="hf-transformers", progress=progress)
print("DONE " + " ".join(steps), flush=True)
"""

FILES = 4
RANDOM_KILLS = 6


def make_source(folder):
    rng = random.Random(7)
    folder.mkdir()
    for i in range(FILES):
        (folder / f"shard-{i}.bin").write_bytes(rng.randbytes(400_000 + 50_000 * i))
    (folder / "config.json").write_text('{"model_type": "bert"}')
    return folder


def run_publisher(src, dest: str, *, kill_at: int = 0, kill_after: float | None = None) -> tuple[int, str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(src), dest, str(kill_at)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=dict(os.environ),
    )
    assert proc.stdout.readline() == b"READY\n"
    proc.stdin.write(b"go\n")
    proc.stdin.flush()
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    out = proc.stdout.read().decode()
    rc = proc.wait(timeout=120)
    proc.stdin.close()
    proc.stdout.close()
    return rc, out


VERIFIED: set[str] = set()


def check_invariants(prefix: str, digest: str, killed_before_commit: str | None) -> set[str]:
    """Everything visible is complete and verifies; a dest whose publish died before committing is invisible."""
    visible = set()
    for info in ka.list_artifacts(prefix):
        if info.uri not in VERIFIED:  # artifacts are immutable: each is hashed in full once
            loaded = ka.load(info.uri, verify="full")
            assert loaded.digest == digest, info.uri
            VERIFIED.add(info.uri)
        visible.add(info.uri)
    if killed_before_commit is not None:
        assert killed_before_commit not in visible
        with pytest.raises(ka.ArtifactNotFoundError):
            ka.load(killed_before_commit)
    return visible


def test_publish_killed_at_any_point(store, tmp_path, cache):
    src = make_source(tmp_path / "src")
    expected = ka.manifest_for_folder(src, kind="model", format="hf-transformers").digest
    is_s3 = store.startswith("s3://")

    # A complete run: its steps, and how long a publish takes here.
    started = time.monotonic()
    rc, out = run_publisher(src, f"{store}/runs/full")
    duration = time.monotonic() - started
    assert rc == 0, out
    steps = out.split()[1:]
    assert steps == (["lock"] if is_s3 else []) + ["file"] * (FILES + 1) + (["manifest"] if not is_s3 else []) + [
        "verify",
        "commit",
    ]
    committed = {f"{store}/runs/full"}
    assert check_invariants(store, expected, None) == committed

    # Killed right after each step.
    for k in range(1, len(steps) + 1):
        dest = f"{store}/runs/step-{k}"
        rc, _ = run_publisher(src, dest, kill_at=k)
        assert rc == -signal.SIGKILL
        if steps[k - 1] == "commit":
            committed.add(dest)  # killed after the commit: the artifact is complete
            assert check_invariants(store, expected, None) == committed
        else:
            assert check_invariants(store, expected, dest) == committed

    # Killed at random moments (seeded, so a failure can be replayed).
    rng = random.Random(int(os.environ.get("KILN_CRASH_SEED", "1234")))
    for i in range(RANDOM_KILLS):
        dest = f"{store}/runs/random-{i}"
        rc, _ = run_publisher(src, dest, kill_after=rng.uniform(0, duration))
        if rc == 0:
            committed.add(dest)
            assert check_invariants(store, expected, None) == committed
            continue
        assert rc == -signal.SIGKILL
        visible = check_invariants(store, expected, None)
        committed |= visible & {dest}  # may have died between its commit and its exit
        assert visible == committed

    # Garbage exists now (staging folders or uploaded files and locks); cleanup leaves only complete artifacts.
    removed = ka.cleanup(store, older_than=timedelta(0))
    assert removed
    assert {a.uri for a in ka.list_artifacts(store)} == committed
    expected_files = {
        f"{uri.removeprefix(store + '/')}/{rel}"
        for uri in committed
        for rel in [*(f"shard-{i}.bin" for i in range(FILES)), "config.json", "kiln-manifest.json"]
    }
    if is_s3:
        assert s3_keys(store) == expected_files
        loc = resolve(store)
        assert not loc.fs.call_s3("list_multipart_uploads", Bucket=loc.path).get("Uploads")
    else:
        root = resolve(store).local
        assert local_files(root) == expected_files
    for uri in committed:
        ka.load(uri, verify="full")


def test_cleanup_respects_the_grace_period_and_unblocks_the_destination(s3_bucket, tmp_path):
    src = make_source(tmp_path / "src")
    dest = f"{s3_bucket}/runs/a"
    rc, _ = run_publisher(src, dest, kill_at=3)  # lock taken, two files uploaded
    assert rc == -signal.SIGKILL
    with pytest.raises(ka.PublishConflictError, match=r"held by a publish started .* \(lock .kiln-lock.json\)"):
        ka.publish(src, dest, format="hf-transformers")
    assert ka.cleanup(s3_bucket) == []  # within the default grace period it may still be running: untouched
    assert ".kiln-lock.json" in {k.rsplit("/", 1)[-1] for k in s3_keys(s3_bucket)}
    assert ka.cleanup(s3_bucket, older_than=timedelta(0))
    assert s3_keys(s3_bucket) == set()
    assert ka.publish(src, dest, format="hf-transformers").uri == dest


def test_cleanup_aborts_abandoned_multipart_uploads(s3_bucket):
    loc = resolve(f"{s3_bucket}/runs/big")
    upload = loc.fs.call_s3("create_multipart_upload", Bucket=loc.path.split("/")[0], Key="runs/big/model.bin")
    # (moto reports a fixed 2010 start time for every upload, so the grace period cannot be shown here.)
    removed = ka.cleanup(s3_bucket, older_than=timedelta(0))
    assert removed == [f"{loc.path.split('/')[0]}/runs/big/model.bin (multipart upload {upload['UploadId']})"]


def test_cleanup_after_a_crash_between_commit_and_unlock_keeps_the_artifact(s3_bucket, tmp_path):
    src = make_source(tmp_path / "src")
    dest = f"{s3_bucket}/runs/a"
    rc, out = run_publisher(src, dest, kill_at=FILES + 4)  # lock, the files and config, verify, commit
    assert rc == -signal.SIGKILL, out
    assert ka.load(dest).manifest.files  # complete and visible
    assert ka.cleanup(s3_bucket) == [f"{dest.removeprefix('s3://')}/.kiln-lock.json"]  # even within the grace
    ka.load(dest, verify="full")


def test_local_staging_is_invisible_and_cleaned(tmp_path):
    src = make_source(tmp_path / "src")
    store = f"file://{tmp_path}/store"
    rc, _ = run_publisher(src, f"{store}/runs/a", kill_at=4)
    assert rc == -signal.SIGKILL
    staging = tmp_path / "store" / "runs" / ".kiln-staging"
    assert len(list(staging.iterdir())) == 1
    assert ka.list_artifacts(store) == []
    assert ka.cleanup(store) == []  # fresh: might be a publish in progress
    assert len(ka.cleanup(store, older_than=timedelta(0))) == 1
    assert list(staging.iterdir()) == []
    assert ka.publish(src, f"{store}/runs/a", format="hf-transformers")
