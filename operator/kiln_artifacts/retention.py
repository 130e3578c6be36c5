"""Retention (old artifacts and checkpoints) and cleanup (garbage left by crashed publishes and deletes).

Retention never deletes an artifact whose digest is referenced: the caller passes the digests that live
resources use (e.g. every ModelDeployment's current and candidate artifact), and every digest a promoted version
of the given registries points at is added. Protection is by digest, so every copy of a referenced artifact stays.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from .errors import ArtifactError, InvalidNameError
from .load import ArtifactInfo, list_artifacts
from .manifest import KINDS, MANIFEST_NAME, RESERVED_PREFIX
from .publish import LOCK_NAME, STAGING_DIR, delete
from .registry import Registry
from .storage import Location, resolve
from .uri import ArtifactURI, parse_uri, writable

log = logging.getLogger(__name__)
DEFAULT_GRACE = timedelta(hours=24)


@dataclass(frozen=True)
class RetentionPolicy:
    """Keep the ``keep_last`` newest artifacts of each folder, and every artifact younger than ``max_age``;
    the rest of the kinds in ``kinds`` may go. With only one of the two set, that one alone decides."""

    keep_last: int | None = None
    max_age: timedelta | None = None
    kinds: tuple[str, ...] = ("model", "checkpoint")

    def __post_init__(self) -> None:
        if self.keep_last is None and self.max_age is None:
            raise InvalidNameError("retention policy: set keep_last, max_age or both")
        if self.keep_last is not None and (
            isinstance(self.keep_last, bool) or not isinstance(self.keep_last, int) or self.keep_last < 0
        ):
            raise InvalidNameError(f"retention policy: keep_last must be an integer >= 0, got {self.keep_last!r}")
        if self.max_age is not None and (not isinstance(self.max_age, timedelta) or self.max_age <= timedelta(0)):
            raise InvalidNameError(f"retention policy: max_age must be a positive timedelta, got {self.max_age!r}")
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise InvalidNameError(f"retention policy: kinds {sorted(unknown)} are not among {', '.join(KINDS)}")


@dataclass(frozen=True)
class Decision:
    uri: str
    digest: str
    delete: bool
    reason: str


@dataclass(frozen=True)
class RetentionPlan:
    prefix: str
    decisions: tuple[Decision, ...]

    @property
    def to_delete(self) -> list[Decision]:
        return [d for d in self.decisions if d.delete]

    @property
    def to_keep(self) -> list[Decision]:
        return [d for d in self.decisions if not d.delete]


def protected_digests(referenced_digests: Iterable[str], registries: Iterable[Registry | str]) -> dict[str, str]:
    """digest -> why it is protected."""
    out = {d: "referenced by a live resource" for d in referenced_digests}
    for reg in registries:
        registry = reg if isinstance(reg, Registry) else Registry(reg)
        for name in registry.models():
            for v in registry.versions(name):
                out.setdefault(v.digest, f"promoted as {name} version {v.version}")
    return out


def plan_retention(
    prefix: str | ArtifactURI,
    policy: RetentionPolicy,
    *,
    referenced_digests: Iterable[str] = (),
    registries: Iterable[Registry | str] = (),
    now: datetime | None = None,
) -> RetentionPlan:
    """Decide, for every artifact under ``prefix``, whether it stays (and why) or goes. Deletes nothing."""
    now = now or datetime.now(UTC)
    protected = protected_digests(referenced_digests, registries)
    groups: dict[str, list[ArtifactInfo]] = defaultdict(list)
    for info in list_artifacts(prefix):
        groups[str(parse_uri(info.uri).parent)].append(info)
    decisions = []
    for group, infos in sorted(groups.items()):
        infos.sort(key=lambda a: (a.manifest.created_at, a.uri), reverse=True)
        for rank, info in enumerate(infos):
            m = info.manifest
            age = now - m.created_at
            if m.digest in protected:
                keep, reason = True, protected[m.digest]
            elif m.kind not in policy.kinds:
                keep, reason = True, f"kind {m.kind} is not covered by the policy"
            elif policy.keep_last is not None and rank < policy.keep_last:
                keep, reason = True, f"among the {policy.keep_last} newest in {group}"
            elif policy.max_age is not None and age < policy.max_age:
                keep, reason = True, f"younger than {policy.max_age}"
            else:
                parts = []
                if policy.keep_last is not None:
                    parts.append(f"not among the {policy.keep_last} newest in {group}")
                if policy.max_age is not None:
                    parts.append(f"older than {policy.max_age}")
                keep, reason = False, " and ".join(parts)
            decisions.append(Decision(info.uri, m.digest, not keep, reason))
    return RetentionPlan(str(parse_uri(prefix, field="prefix")), tuple(decisions))


def apply_retention(
    plan: RetentionPlan,
    *,
    referenced_digests: Iterable[str] = (),
    registries: Iterable[Registry | str] = (),
) -> list[str]:
    """Delete what the plan marks, re-reading the registries first so a promotion made since planning wins."""
    protected = protected_digests(referenced_digests, registries)
    deleted = []
    for d in plan.to_delete:
        if d.digest in protected:
            log.info("keeping %s: %s since the plan was made", d.uri, protected[d.digest])
            continue
        try:
            delete(d.uri, expected_digest=d.digest)
        except ArtifactError as e:
            log.warning("retention could not delete %s: %s", d.uri, e)
            continue
        deleted.append(d.uri)
    return deleted


# --- cleanup ------------------------------------------------------------------------------------------------


def cleanup(
    prefix: str | ArtifactURI, *, older_than: timedelta = DEFAULT_GRACE, now: datetime | None = None
) -> list[str]:
    """Remove garbage under ``prefix`` untouched for ``older_than``: staging folders and temporary registry files
    (local stores); objects of unfinished publishes and deletes, their locks and stale multipart uploads (S3).
    Complete artifacts are never touched. Returns what was removed."""
    loc = resolve(writable(parse_uri(prefix, field="prefix")), field="prefix")
    now = now or datetime.now(UTC)
    if loc.local is not None:
        return _cleanup_local(loc.local, now - older_than)
    return _cleanup_s3(loc, now - older_than)


def _newest_mtime(path: Path) -> datetime:
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for folder, _dirs, names in os.walk(path):
            for name in [*names, *_dirs]:
                try:
                    newest = max(newest, (Path(folder) / name).lstat().st_mtime)
                except FileNotFoundError:
                    continue
    return datetime.fromtimestamp(newest, UTC)


def _cleanup_local(root: Path, cutoff: datetime) -> list[str]:
    removed = []
    if not root.exists():
        return removed
    for folder, dirs, names in os.walk(root):
        here = Path(folder)
        if STAGING_DIR in dirs:
            # An in-progress copy keeps writing (fresh mtimes), so only abandoned entries are old.
            for entry in (here / STAGING_DIR).iterdir():
                if _newest_mtime(entry) < cutoff:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                    removed.append(str(entry))
        dirs[:] = [d for d in dirs if not d.startswith(RESERVED_PREFIX)]
        if MANIFEST_NAME in names:
            dirs[:] = []  # inside an artifact there is nothing of ours to clean
        for name in names:
            if name.startswith(f"{RESERVED_PREFIX}-tmp-") and _newest_mtime(here / name) < cutoff:
                (here / name).unlink(missing_ok=True)
                removed.append(str(here / name))
    return removed


def _cleanup_s3(loc: Location, cutoff: datetime) -> list[str]:
    fs = loc.fs
    base = loc.path.rstrip("/") + "/"
    try:
        objects = fs.find(base, detail=True)
    except FileNotFoundError:
        objects = {}
    removed: list[str] = []
    locks = [k for k in objects if k.rsplit("/", 1)[-1] == LOCK_NAME]
    for lock in locks:
        folder = lock[: -len(LOCK_NAME)]
        under = {k: v for k, v in objects.items() if k.startswith(folder)}
        newest = max(_modified(v) for v in under.values())
        try:
            op = json.loads(fs.cat_file(lock)).get("op")
        except (FileNotFoundError, ValueError):
            op = None
        has_manifest = folder + MANIFEST_NAME in under
        if has_manifest and op != "delete":
            # The publish committed and died before removing its lock: the artifact is complete; keep it.
            fs.rm_file(lock)
            removed.append(lock)
            continue
        if newest >= cutoff:
            continue  # possibly still running
        if has_manifest:
            fs.rm_file(folder + MANIFEST_NAME)  # an interrupted delete: finish it, manifest first
        rest = [k for k in under if k != lock and k != folder + MANIFEST_NAME]
        if rest:
            fs.rm(rest)
        fs.rm_file(lock)
        removed.extend([*rest, lock])
    removed.extend(_abort_stale_uploads(loc, cutoff))
    return removed


def _modified(info: dict[str, object]) -> datetime:
    value = info.get("LastModified")
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.now(UTC)  # unknown: treat as fresh, never as garbage


def _abort_stale_uploads(loc: Location, cutoff: datetime) -> list[str]:
    """Multipart uploads a killed publisher never completed: invisible to listings but they cost storage."""
    bucket, _, key_prefix = loc.path.partition("/")
    removed = []
    try:
        uploads = loc.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key_prefix).get("Uploads", [])
    except Exception as e:  # a store without this call still gets the rest of the cleanup
        log.warning("cannot list multipart uploads in %s: %s", bucket, e)
        return removed
    for upload in uploads:
        initiated = upload.get("Initiated")
        if isinstance(initiated, datetime) and initiated.replace(tzinfo=initiated.tzinfo or UTC) < cutoff:
            loc.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            removed.append(f"{bucket}/{upload['Key']} (multipart upload {upload['UploadId']})")
    return removed
