"""Atomic publish and delete of artifacts.

Local stores (file://, pvc://): files are copied into ``<parent>/.kiln-staging/<name>.<id>/``, hashed as
written, fsynced; the manifest is written last; the staging folder is checked against the manifest and then
renamed onto the destination in one rename(2). Readers see nothing or a complete artifact; a crash leaves only
a staging folder, which readers never look at and ``cleanup`` removes.

S3 has no rename. The publisher first claims the destination by creating ``<dest>/.kiln-lock.json`` with a
conditional write (If-None-Match: *), so one publisher at a time writes there; it uploads the files, checks
them against the manifest it built, and writes ``<dest>/kiln-manifest.json`` last, again conditionally. An
artifact exists only once its manifest does, so a crash leaves files without a manifest (ignored by readers)
and a lock that ``cleanup`` uses to remove them after a grace period.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import (
    ArtifactExistsError,
    ArtifactNotFoundError,
    IntegrityError,
    InvalidNameError,
    PublishConflictError,
)
from .hashing import copy_and_hash, fsync_dir, hash_file
from .manifest import (
    MANIFEST_NAME,
    RESERVED_PREFIX,
    FileEntry,
    Lineage,
    Manifest,
    check_relative_path,
    compute_digest,
    format_time,
    manifest_json,
    parse_manifest,
)
from .storage import Location, resolve
from .uri import ArtifactURI, parse_uri, writable

if TYPE_CHECKING:
    from .signing import Signer

STAGING_DIR = ".kiln-staging"
LOCK_NAME = ".kiln-lock.json"


@dataclass(frozen=True)
class Artifact:
    """A complete, published artifact."""

    uri: str
    digest: str
    manifest: Manifest


@dataclass(frozen=True)
class Progress:
    """A step of a publish or load: phase is one of lock, file, manifest, verify, commit, done."""

    phase: str
    path: str | None = None
    done: int = 0
    total: int = 0


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class _SourceFile:
    rel: str
    path: Path
    size: int
    mtime_ns: int


def scan_source(source: str | os.PathLike[str]) -> list[_SourceFile]:
    """The regular files under a local folder (a path, file:// or pvc:// URI; file symlinks followed)."""
    if isinstance(source, str) and "://" in source:
        local = parse_uri(source, field="source").local_path()
        if local is None:
            raise InvalidNameError(f'source "{source}": must be a local folder (a path, file:// or pvc://)')
        source = local
    root = Path(source)
    if not root.is_dir():
        raise InvalidNameError(f'source "{root}": not a directory')
    out: list[_SourceFile] = []
    for folder, dirs, names in os.walk(root):
        for d in dirs:
            if (Path(folder) / d).is_symlink():
                raise InvalidNameError(
                    f'source file "{Path(folder, d).relative_to(root)}": symlinked folders are not followed'
                )
        for name in names:
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            check_relative_path(rel, "source file")
            st = path.stat()
            if not stat.S_ISREG(st.st_mode):
                raise InvalidNameError(f'source file "{rel}": not a regular file')
            out.append(_SourceFile(rel, path, st.st_size, st.st_mtime_ns))
    if not out:
        raise InvalidNameError(f'source "{root}": has no files')
    return sorted(out, key=lambda f: f.rel)


def publish(
    source: str | os.PathLike[str],
    dest: str | ArtifactURI,
    *,
    format: str,
    kind: str = "model",
    task: str | None = None,
    metrics: Mapping[str, float] | None = None,
    lineage: Lineage | Mapping[str, Any] | None = None,
    annotations: Mapping[str, str] | None = None,
    durable: bool = True,
    progress: ProgressCallback | None = None,
    signer: Signer | None = None,
) -> Artifact:
    """Publish the local folder ``source`` as an artifact at ``dest`` (file://, pvc:// or s3://), atomically.

    Artifacts are immutable: publishing different files to a destination that holds an artifact raises
    ArtifactExistsError; publishing the same files again returns the existing artifact (as it is, signed or not).
    With ``signer``, the manifest is signed before it is written, so the manifest write stays the one commit point.
    """
    uri = writable(parse_uri(dest, field="dest"))
    _check_dest_name(uri)
    files = scan_source(source)
    meta = {
        "kind": kind,
        "format": format,
        "task": task,
        "metrics": metrics,
        "lineage": lineage,
        "annotations": annotations,
    }
    # Validate the metadata before any byte moves (a placeholder file list; the real one replaces it).
    Manifest.build([FileEntry("x", 0, "0" * 64)], **meta)  # type: ignore[arg-type]
    report = progress or (lambda _p: None)
    loc = resolve(uri, field="dest")
    if loc.local is not None:
        return _publish_local(files, loc, meta, durable, report, signer)
    return _publish_s3(files, loc, meta, report, signer)


def _check_dest_name(uri: ArtifactURI) -> None:
    segments = uri.path.strip("/").split("/")
    if not uri.path.strip("/"):
        raise InvalidNameError(f'dest "{uri}": an artifact needs a folder of its own, not the root of the store')
    if any(s.startswith(RESERVED_PREFIX) or s == MANIFEST_NAME for s in segments):
        raise InvalidNameError(f'dest "{uri}": names starting with "{RESERVED_PREFIX}" are reserved')


def _final_manifest(manifest: Manifest, signer: Signer | None) -> tuple[Manifest, bytes]:
    """The manifest as it will be committed, and its bytes: signed over exactly the object that is written."""
    if signer is None:
        return manifest, manifest.to_json()
    doc = signer.sign(manifest.to_dict())
    return parse_manifest(doc, where="(new)"), manifest_json(doc)


def _source_digest(files: list[_SourceFile]) -> str:
    return compute_digest(FileEntry(f.rel, f.size, hash_file(f.path)[0]) for f in files)


def _check_unchanged(files: list[_SourceFile], entries: Mapping[str, FileEntry]) -> None:
    for f in files:
        st = f.path.stat()
        if st.st_size != f.size or st.st_mtime_ns != f.mtime_ns or entries[f.rel].size != f.size:
            raise IntegrityError(str(f.path.parent), f.rel, "the source file changed while it was being published")


def _existing_manifest_local(path: Path) -> Manifest | None:
    try:
        data = (path / MANIFEST_NAME).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return parse_manifest(data, where=str(path / MANIFEST_NAME))


def _same_or_conflict(dest: str, existing: Manifest, files: list[_SourceFile]) -> Artifact:
    digest = _source_digest(files)
    if digest == existing.digest:
        return Artifact(dest, digest, existing)
    raise ArtifactExistsError(
        f"{dest}: already holds artifact {existing.digest}; artifacts are immutable, so these files "
        f"({digest}) need a new destination"
    )


def _publish_local(
    files: list[_SourceFile],
    loc: Location,
    meta: dict[str, Any],
    durable: bool,
    report: ProgressCallback,
    signer: Signer | None,
) -> Artifact:
    dest = Path(loc.path)
    uri = str(loc.uri)
    existing = _existing_manifest_local(dest)
    if existing is not None:
        return _same_or_conflict(uri, existing, files)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise PublishConflictError(f"{uri}: exists and is not an artifact (no {MANIFEST_NAME}); remove it first")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / STAGING_DIR / f"{dest.name}.{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    try:
        entries = _copy_files(files, staging, durable, report)
        _check_unchanged(files, entries)
        manifest, body = _final_manifest(Manifest.build(entries.values(), **meta), signer)
        tmp = staging / f"{RESERVED_PREFIX}-manifest.tmp"
        with open(tmp, "xb") as f:
            f.write(body)
            if durable:
                os.fsync(f.fileno())
        os.rename(tmp, staging / MANIFEST_NAME)
        report(Progress("manifest", MANIFEST_NAME))
        _verify_staged(uri, staging, manifest)
        if durable:
            for folder in {staging, *(staging / e.path for e in manifest.files)}:
                if folder.is_dir():
                    fsync_dir(folder)
        report(Progress("verify"))
        try:
            os.rename(staging, dest)  # the commit: one atomic rename; fails if dest holds anything
        except OSError as e:
            raced = _existing_manifest_local(dest)
            if raced is not None and raced.digest == manifest.digest:
                return Artifact(uri, raced.digest, raced)
            if raced is not None:
                raise ArtifactExistsError(
                    f"{uri}: a concurrent publish created artifact {raced.digest} first; artifacts are immutable, "
                    f"so these files ({manifest.digest}) need a new destination"
                ) from e
            raise PublishConflictError(f"{uri}: cannot rename the staged artifact into place: {e}") from e
        if durable:
            fsync_dir(dest.parent)
        report(Progress("commit"))
        return Artifact(uri, manifest.digest, manifest)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _copy_files(
    files: list[_SourceFile], staging: Path, durable: bool, report: ProgressCallback
) -> dict[str, FileEntry]:
    for folder in {(staging / f.rel).parent for f in files}:
        folder.mkdir(parents=True, exist_ok=True)

    def one(f: _SourceFile) -> FileEntry:
        sha, size = copy_and_hash(f.path, staging / f.rel, durable=durable)
        return FileEntry(f.rel, size, sha)

    entries: dict[str, FileEntry] = {}
    # Largest first, so one big file does not start last; each copy already uses two threads.
    order = sorted(files, key=lambda f: -f.size)
    with ThreadPoolExecutor(max_workers=min(4, len(files)), thread_name_prefix="kiln-copy") as pool:
        for i, entry in enumerate(pool.map(one, order), 1):
            entries[entry.path] = entry
            report(Progress("file", entry.path, i, len(files)))
    return entries


def _walk_files(root: Path) -> Iterator[tuple[str, int]]:
    for folder, _dirs, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            yield path.relative_to(root).as_posix(), path.stat().st_size


def _verify_staged(uri: str, staging: Path, manifest: Manifest) -> None:
    found = dict(_walk_files(staging))
    found.pop(MANIFEST_NAME, None)
    expected = {f.path: f.size for f in manifest.files}
    for path, size in expected.items():
        if path not in found:
            raise IntegrityError(uri, path, "missing from the staged copy")
        if found[path] != size:
            raise IntegrityError(uri, path, f"staged copy has {found[path]} bytes, manifest says {size}")
    for path in found.keys() - expected.keys():
        raise IntegrityError(uri, path, "in the staged copy but not in the manifest")
    if parse_manifest((staging / MANIFEST_NAME).read_bytes(), where=uri).digest != manifest.digest:
        raise IntegrityError(uri, MANIFEST_NAME, "the manifest written differs from the one built")


# --- S3 -----------------------------------------------------------------------------------------------------


def _lock_body(op: str, token: str) -> bytes:
    body = {"op": op, "token": token, "host": socket.gethostname(), "pid": os.getpid()}
    body["startedAt"] = format_time(datetime.now(UTC))
    return json.dumps(body).encode()


def acquire_s3_lock(loc: Location, op: str) -> str:
    """Create ``<dest>/.kiln-lock.json`` if absent (conditional write); returns its token."""
    token = uuid.uuid4().hex
    lock = loc.child(LOCK_NAME)
    try:
        loc.fs.pipe_file(lock, _lock_body(op, token), mode="create")
    except FileExistsError:
        try:
            held = json.loads(loc.fs.cat_file(lock))
            who = f"a {held.get('op')} started {held.get('startedAt')} by {held.get('host')} pid {held.get('pid')}"
        except (FileNotFoundError, ValueError):
            who = "another process"
        raise PublishConflictError(
            f"{loc.uri}: held by {who} (lock {LOCK_NAME}); if that process died, cleanup() removes the lock "
            "after its grace period"
        ) from None
    return token


def lock_token(loc: Location) -> str | None:
    try:
        return str(json.loads(loc.fs.cat_file(loc.child(LOCK_NAME))).get("token"))
    except (FileNotFoundError, ValueError):
        return None


def _publish_s3(
    files: list[_SourceFile], loc: Location, meta: dict[str, Any], report: ProgressCallback, signer: Signer | None
) -> Artifact:
    fs = loc.fs
    uri = str(loc.uri)
    manifest_key = loc.child(MANIFEST_NAME)
    if fs.exists(manifest_key):
        return _same_or_conflict(uri, parse_manifest(fs.cat_file(manifest_key), where=uri), files)
    token = acquire_s3_lock(loc, "publish")
    report(Progress("lock"))
    wrote = committed = False
    try:
        present = [p for p in _s3_keys(loc) if p != LOCK_NAME]
        if present:
            raise PublishConflictError(
                f"{uri}: holds {len(present)} object(s) but no {MANIFEST_NAME} (e.g. {present[0]}); it is not an "
                "artifact: remove them or publish elsewhere"
            )
        wrote = True
        entries = _upload_files(files, loc, report)
        _check_unchanged(files, entries)
        manifest, body = _final_manifest(Manifest.build(entries.values(), **meta), signer)
        _verify_uploaded(loc, manifest)
        if lock_token(loc) != token:  # our lock was broken by a cleanup: someone else may be writing here
            raise PublishConflictError(f"{uri}: the publish lock was taken over while uploading; nothing was published")
        report(Progress("verify"))
        try:
            fs.pipe_file(manifest_key, body, mode="create")  # the commit
        except FileExistsError:
            raced = parse_manifest(fs.cat_file(manifest_key), where=uri)
            if raced.digest == manifest.digest:
                return Artifact(uri, raced.digest, raced)
            raise ArtifactExistsError(f"{uri}: a concurrent publish created artifact {raced.digest} first") from None
        committed = True
        report(Progress("commit"))
        return Artifact(uri, manifest.digest, manifest)
    finally:
        # Only the lock holder touches the files: a lock taken over by cleanup() means another writer now.
        if lock_token(loc) == token:
            if wrote and not committed:
                _s3_remove_all_but_lock(loc)  # no files left behind on an ordinary failure (a crash: cleanup())
            fs.rm_file(loc.child(LOCK_NAME))


def _s3_keys(loc: Location) -> list[str]:
    """Relative keys of every object under the location."""
    base = loc.path.rstrip("/") + "/"
    try:
        found = loc.fs.find(base)
    except FileNotFoundError:
        return []
    return [p[len(base) :] for p in found if p.startswith(base)]


def _s3_remove_all_but_lock(loc: Location) -> None:
    keys = [loc.child(k) for k in _s3_keys(loc) if k != LOCK_NAME]
    if keys:
        loc.fs.rm(keys)


def _upload_files(files: list[_SourceFile], loc: Location, report: ProgressCallback) -> dict[str, FileEntry]:
    def hash_one(f: _SourceFile) -> FileEntry:
        sha, size = hash_file(f.path)
        return FileEntry(f.rel, size, sha)

    def upload_one(f: _SourceFile) -> None:
        loc.fs.put_file(str(f.path), loc.child(f.rel))

    entries: dict[str, FileEntry] = {}
    order = sorted(files, key=lambda f: -f.size)
    # Hashing (local CPU) overlaps the uploads (network); s3fs itself uploads the parts of a big file in parallel.
    with (
        ThreadPoolExecutor(max_workers=2, thread_name_prefix="kiln-hash") as hashers,
        ThreadPoolExecutor(max_workers=4, thread_name_prefix="kiln-put") as uploaders,
    ):
        hashed = [hashers.submit(hash_one, f) for f in order]
        uploaded = [uploaders.submit(upload_one, f) for f in order]
        for i, (h, u) in enumerate(zip(hashed, uploaded, strict=True), 1):
            u.result()
            entry = h.result()
            entries[entry.path] = entry
            report(Progress("file", entry.path, i, len(files)))
    return entries


def _verify_uploaded(loc: Location, manifest: Manifest) -> None:
    base = loc.path.rstrip("/") + "/"
    sizes = {p[len(base) :]: int(info["size"]) for p, info in loc.fs.find(base, detail=True).items()}
    sizes.pop(LOCK_NAME, None)
    for entry in manifest.files:
        if entry.path not in sizes:
            raise IntegrityError(str(loc.uri), entry.path, "missing after upload")
        if sizes[entry.path] != entry.size:
            raise IntegrityError(
                str(loc.uri), entry.path, f"uploaded {sizes[entry.path]} bytes, manifest says {entry.size}"
            )
    for extra in sizes.keys() - {e.path for e in manifest.files}:
        raise IntegrityError(str(loc.uri), extra, "uploaded but not in the manifest")


# --- delete -------------------------------------------------------------------------------------------------


def delete(uri: str | ArtifactURI, *, expected_digest: str | None = None) -> None:
    """Delete a complete artifact so that it disappears at once (its manifest goes first, or one rename)."""
    loc = resolve(writable(parse_uri(uri)))
    if loc.local is not None:
        path = Path(loc.path)
        existing = _existing_manifest_local(path)
        if existing is None:
            raise ArtifactNotFoundError(f"{loc.uri}: no artifact ({MANIFEST_NAME} missing)")
        if expected_digest and existing.digest != expected_digest:
            raise ArtifactExistsError(f"{loc.uri}: holds {existing.digest}, not {expected_digest}; not deleted")
        trash = path.parent / STAGING_DIR / f"{path.name}.{uuid.uuid4().hex}.deleted"
        trash.parent.mkdir(exist_ok=True)
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        return
    fs = loc.fs
    manifest_key = loc.child(MANIFEST_NAME)
    try:
        existing = parse_manifest(fs.cat_file(manifest_key), where=str(loc.uri))
    except FileNotFoundError:
        raise ArtifactNotFoundError(f"{loc.uri}: no artifact ({MANIFEST_NAME} missing)") from None
    if expected_digest and existing.digest != expected_digest:
        raise ArtifactExistsError(f"{loc.uri}: holds {existing.digest}, not {expected_digest}; not deleted")
    acquire_s3_lock(loc, "delete")
    fs.rm_file(manifest_key)  # invisible from here on; a crash below leaves garbage that cleanup() removes
    _s3_remove_all_but_lock(loc)
    fs.rm_file(loc.child(LOCK_NAME))
