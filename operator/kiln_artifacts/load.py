"""Reading artifacts: manifests, verified loads (eager or lazy), listings, and hf:// as a read-only source."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Literal

from .errors import (
    ArtifactError,
    ArtifactNotFoundError,
    IntegrityError,
    InvalidManifestError,
    InvalidNameError,
    UnsignedArtifactError,
)
from .hashing import hash_file
from .manifest import (
    MANIFEST_NAME,
    RESERVED_PREFIX,
    FileEntry,
    Lineage,
    Manifest,
    parse_manifest,
)
from .publish import STAGING_DIR, scan_source
from .settings import default_cache_dir
from .storage import Location, resolve
from .uri import ArtifactURI, parse_uri

if TYPE_CHECKING:
    from .signing import TrustedKeys

log = logging.getLogger(__name__)

DEFAULT_LAZY_THRESHOLD = 64 << 20
Verify = Literal["full", "lazy"]


@dataclass
class LoadedArtifact:
    """An artifact available as local files. In lazy mode, big files are hashed on first access."""

    uri: str
    root: Path
    manifest: Manifest
    _unverified: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # The trusted key whose signature verified the manifest; None when loaded without trusted keys.
    trusted_key: str | None = None

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def files(self) -> list[str]:
        return [f.path for f in self.manifest.files]

    @property
    def unverified(self) -> frozenset[str]:
        return frozenset(self._unverified)

    def path(self, rel: str) -> Path:
        """The local path of one file of the artifact, verified before it is returned."""
        try:
            entry = self.manifest.file(rel)
        except KeyError:
            raise IntegrityError(self.uri, rel, "not part of this artifact (not in its manifest)") from None
        if rel in self._unverified:
            with self._lock:
                if rel in self._unverified:
                    _verify_file(self.uri, self.root, entry)
                    self._unverified.discard(rel)
        return self.root / rel

    def open(self, rel: str) -> IO[bytes]:
        return open(self.path(rel), "rb")

    def read_bytes(self, rel: str) -> bytes:
        return self.path(rel).read_bytes()

    def verify(self) -> None:
        """Hash every file not yet verified; IntegrityError names the first bad one."""
        for rel in sorted(self._unverified):
            self.path(rel)


def read_manifest(uri: str | ArtifactURI, *, trusted_keys: TrustedKeys | None = None) -> Manifest:
    """The validated manifest of the artifact at ``uri``; ArtifactNotFoundError if it has none (not complete).
    With ``trusted_keys``, its signature is verified first (kiln_artifacts.signing.verify_manifest)."""
    loc = resolve(uri)
    return _read_verified(loc, trusted_keys)[0]


def read_manifest_bytes(uri: str | ArtifactURI) -> tuple[bytes, str]:
    """The manifest exactly as stored, unchecked, and the artifact's canonical URI (what signatures are checked on)."""
    loc = resolve(uri)
    return _manifest_bytes(loc), str(loc.uri)


def _manifest_bytes(loc: Location) -> bytes:
    key = loc.child(MANIFEST_NAME)
    try:
        return bytes(loc.fs.cat_file(key))
    except (FileNotFoundError, NotADirectoryError):
        raise ArtifactNotFoundError(
            f"{loc.uri}: no artifact ({MANIFEST_NAME} missing; an unfinished publish never has one)"
        ) from None


def _read_manifest(loc: Location) -> Manifest:
    return parse_manifest(_manifest_bytes(loc), where=f"{loc.uri}/{MANIFEST_NAME}")


def _read_verified(loc: Location, trusted_keys: TrustedKeys | None) -> tuple[Manifest, str | None, bytes]:
    """(manifest, the trusted key that verified it or None, the stored bytes). The signature is checked on the
    stored bytes before the manifest is even parsed: what was signed is what was stored, fields unknown here too."""
    raw = _manifest_bytes(loc)
    where = f"{loc.uri}/{MANIFEST_NAME}"
    if trusted_keys is None:
        return parse_manifest(raw, where=where), None, raw
    from .signing import manifest_object, verify_manifest

    doc = manifest_object(raw, where)
    key = verify_manifest(doc, trusted_keys, where=str(loc.uri))
    return parse_manifest(doc, where=where), key, raw


def load(
    uri: str | ArtifactURI,
    *,
    verify: Verify = "full",
    expected_digest: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    lazy_threshold: int = DEFAULT_LAZY_THRESHOLD,
    trusted_keys: TrustedKeys | None = None,
) -> LoadedArtifact:
    """Load and verify an artifact. Local stores are read in place; s3:// is downloaded into a cache keyed by
    digest; hf:// is fetched with huggingface_hub and gets a manifest computed from its files.

    verify="full" hashes every file now; "lazy" checks presence and sizes now, hashes files up to
    ``lazy_threshold`` bytes now and bigger ones on first ``path()``/``open()`` or ``verify()``.
    With ``trusted_keys``, the manifest's signature is verified before anything else (no file is read or
    downloaded for an artifact that fails): UnsignedArtifactError, SignatureMismatchError or UntrustedKeyError.
    """
    if verify not in ("full", "lazy"):
        raise ValueError(f'verify: must be "full" or "lazy", got {verify!r}')
    parsed = parse_uri(uri)
    if parsed.scheme == "hf":
        if trusted_keys is not None:
            raise UnsignedArtifactError(
                str(parsed), "unsigned: an hf:// source has no Kiln manifest to sign; publish it as an artifact first"
            )
        loaded = _load_hf(parsed, cache_dir)
        _check_expected(loaded.uri, loaded.manifest, expected_digest)
        return loaded
    loc = resolve(parsed)
    manifest, key, raw = _read_verified(loc, trusted_keys)
    _check_expected(str(loc.uri), manifest, expected_digest)
    if loc.local is not None:
        loaded = _verified(str(loc.uri), loc.local, manifest, verify, lazy_threshold)
    else:
        cache = Path(cache_dir) if cache_dir else default_cache_dir()
        loaded = _load_remote(loc, manifest, raw, verify, cache, lazy_threshold)
    loaded.trusted_key = key
    return loaded


def _check_expected(uri: str, manifest: Manifest, expected: str | None) -> None:
    if expected is not None and manifest.digest != expected:
        raise IntegrityError(uri, None, f"holds artifact {manifest.digest}, expected {expected} (pinned digest)")


def _verify_file(uri: str, root: Path, entry: FileEntry) -> None:
    path = root / entry.path
    try:
        sha, size = hash_file(path)
    except FileNotFoundError:
        raise IntegrityError(uri, entry.path, "missing") from None
    if size != entry.size:
        raise IntegrityError(
            uri, entry.path, f"has {size} bytes, the manifest says {entry.size} (truncated or changed)"
        )
    if sha != entry.sha256:
        raise IntegrityError(
            uri,
            entry.path,
            f"sha256 mismatch: manifest {entry.sha256}, file {sha} (corrupted or changed after publish)",
        )


def _check_tree(uri: str, root: Path, manifest: Manifest) -> None:
    """Cheap checks first: every file present with its size, and nothing unlisted."""
    expected = {f.path: f for f in manifest.files}
    for entry in manifest.files:
        try:
            st = (root / entry.path).stat()
        except (FileNotFoundError, NotADirectoryError):
            raise IntegrityError(uri, entry.path, "missing") from None
        if st.st_size != entry.size:
            raise IntegrityError(
                uri, entry.path, f"has {st.st_size} bytes, the manifest says {entry.size} (truncated or changed)"
            )
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not (folder == str(root) and d.startswith(RESERVED_PREFIX))]
        for name in names:
            rel = (Path(folder) / name).relative_to(root).as_posix()
            if rel != MANIFEST_NAME and rel not in expected and not rel.startswith(RESERVED_PREFIX):
                raise IntegrityError(uri, rel, "present but not listed in the manifest (added after publish?)")


def _verified(uri: str, root: Path, manifest: Manifest, verify: Verify, lazy_threshold: int) -> LoadedArtifact:
    _check_tree(uri, root, manifest)
    now = [f for f in manifest.files if verify == "full" or f.size <= lazy_threshold]
    later = {f.path for f in manifest.files if f not in now}
    # Largest first so two big files hash on both cores; hashlib releases the GIL.
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="kiln-verify") as pool:
        list(pool.map(lambda e: _verify_file(uri, root, e), sorted(now, key=lambda f: -f.size)))
    return LoadedArtifact(uri, root, manifest, later)


def _load_remote(
    loc: Location, manifest: Manifest, raw: bytes, verify: Verify, cache: Path, threshold: int
) -> LoadedArtifact:
    uri = str(loc.uri)
    entry = cache / manifest.digest.removeprefix("sha256:")
    if (entry / MANIFEST_NAME).is_file():
        cached = parse_manifest((entry / MANIFEST_NAME).read_bytes(), where=str(entry))
        if cached.digest == manifest.digest:
            return _verified(uri, entry, manifest, verify, threshold)
    staging = cache / STAGING_DIR / f"{entry.name}.{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    try:
        for folder in {(staging / f.path).parent for f in manifest.files}:
            folder.mkdir(parents=True, exist_ok=True)
        remote = [loc.child(f.path) for f in manifest.files]
        try:
            loc.fs.get(remote, [str(staging / f.path) for f in manifest.files])
        except FileNotFoundError as e:
            missing = next((f.path for f in manifest.files if not loc.fs.exists(loc.child(f.path))), None)
            raise IntegrityError(uri, missing, "missing") from e
        (staging / MANIFEST_NAME).write_bytes(raw)  # the stored bytes, signatures and all
        loaded = _verified(uri, staging, manifest, verify, threshold)  # only verified copies enter the cache
        try:
            os.rename(staging, entry)
        except OSError:
            if not (entry / MANIFEST_NAME).is_file():  # not a concurrent loader that got there first
                raise
        return LoadedArtifact(uri, entry, manifest, set(loaded.unverified))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _load_hf(uri: ArtifactURI, cache_dir: str | os.PathLike[str] | None) -> LoadedArtifact:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled
    except ImportError as e:
        raise ArtifactError("hf:// needs huggingface_hub: install kiln[artifacts]") from e
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    # The token, if any, comes from HF_TOKEN in the environment (a Secret), read by huggingface_hub itself.
    try:
        path = Path(
            snapshot_download(
                repo_id=uri.path,
                revision=uri.revision,
                cache_dir=os.environ.get("HF_HUB_CACHE") if cache_dir is None else cache_dir,
                local_files_only=offline,
            )
        )
    except (EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled) as e:
        where = "in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "on the Hugging Face Hub"
        raise ArtifactNotFoundError(f"{uri}: not found {where}: {type(e).__name__}: {e}") from e
    commit = path.name  # snapshots/<commit sha>
    manifest = manifest_for_folder(
        path,
        kind="model",
        format=guess_format(path),
        lineage=Lineage(source=f"hf://{uri.path}@{commit}"),
    )
    return LoadedArtifact(f"hf://{uri.path}@{commit}", path, manifest, set())


def manifest_for_folder(folder: str | os.PathLike[str], **meta: object) -> Manifest:
    """A manifest for the files of a local folder as they are now (hashes every file)."""
    files = scan_source(folder)
    with ThreadPoolExecutor(max_workers=2) as pool:
        hashes = list(pool.map(lambda f: hash_file(f.path), files))
    entries = [FileEntry(f.rel, size, sha) for f, (sha, size) in zip(files, hashes, strict=True)]
    return Manifest.build(entries, **meta)  # type: ignore[arg-type]


def guess_format(folder: Path) -> str:
    if (folder / "modules.json").is_file():
        return "sentence-transformers"
    if (folder / "config.json").is_file():
        return "hf-transformers"
    if any(folder.glob("*.onnx")):
        return "onnx"
    return "files"


@dataclass(frozen=True)
class ArtifactInfo:
    uri: str
    manifest: Manifest


def list_artifacts(prefix: str | ArtifactURI) -> list[ArtifactInfo]:
    """Every complete artifact under ``prefix`` (newest first). Staging folders, locks and folders without a
    manifest are not artifacts; an invalid manifest is logged and skipped."""
    loc = resolve(prefix, field="prefix")
    found: list[ArtifactInfo] = []
    for rel in _manifest_dirs(loc):
        uri = loc.uri.join(rel) if rel else loc.uri
        try:
            found.append(ArtifactInfo(str(uri), _read_manifest(resolve(uri))))
        except (InvalidManifestError, ArtifactNotFoundError, InvalidNameError) as e:
            log.warning("skipping %s: %s", uri, e)
    return sorted(found, key=lambda a: (a.manifest.created_at, a.uri), reverse=True)


def _manifest_dirs(loc: Location) -> Iterable[str]:
    if loc.local is not None:
        root = loc.local
        for folder, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith(RESERVED_PREFIX))
            if MANIFEST_NAME in names:
                dirs[:] = []  # artifacts do not nest
                rel = Path(folder).relative_to(root).as_posix()
                yield "" if rel == "." else rel
        return
    base = loc.path.rstrip("/") + "/"
    try:
        keys = loc.fs.find(base)
    except FileNotFoundError:
        return
    for key in keys:
        rel = key[len(base) :]
        if rel.rsplit("/", 1)[-1] != MANIFEST_NAME:
            continue
        folder = rel[: -len(MANIFEST_NAME)].rstrip("/")
        if any(s.startswith(RESERVED_PREFIX) for s in folder.split("/")):
            continue
        yield folder
