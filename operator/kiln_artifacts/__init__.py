"""kiln_artifacts: one store and one manifest shared by the trainer, compressor, server and operator.

See README "Artifacts". Heavy or optional dependencies (s3fs, huggingface_hub, numpy, moto, cryptography) are
imported lazily, where they are needed.
"""

from typing import TYPE_CHECKING, Any

from .errors import (
    ArtifactError,
    ArtifactExistsError,
    ArtifactNotFoundError,
    CredentialsError,
    IntegrityError,
    InvalidManifestError,
    InvalidNameError,
    InvalidURIError,
    KeyFileError,
    NotPromotedError,
    PublishConflictError,
    ReadOnlyStoreError,
    SignatureMismatchError,
    UnsignedArtifactError,
    UntrustedArtifactError,
    UntrustedKeyError,
)
from .load import ArtifactInfo, LoadedArtifact, list_artifacts, load, manifest_for_folder, read_manifest
from .manifest import (
    MANIFEST_NAME,
    DatasetRef,
    FileEntry,
    Lineage,
    Manifest,
    Producer,
    compute_digest,
    library_versions,
    parse_manifest,
)
from .publish import Artifact, Progress, delete, publish
from .registry import ModelVersion, Registry
from .retention import Decision, RetentionPlan, RetentionPolicy, apply_retention, cleanup, plan_retention
from .uri import ArtifactURI, parse_uri

if TYPE_CHECKING:
    from .signing import Signer, TrustedKeys, key_id, signers, verify_manifest

# The signing names are resolved on first use: `python -m kiln_artifacts.signing` must find that module not yet
# imported (runpy warns otherwise), and programs that never sign skip it.
_SIGNING = ("Signer", "TrustedKeys", "key_id", "signers", "verify_manifest")


def __getattr__(name: str) -> Any:
    if name in _SIGNING:
        from . import signing

        return getattr(signing, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MANIFEST_NAME",
    "Artifact",
    "ArtifactError",
    "ArtifactExistsError",
    "ArtifactInfo",
    "ArtifactNotFoundError",
    "ArtifactURI",
    "CredentialsError",
    "DatasetRef",
    "Decision",
    "FileEntry",
    "IntegrityError",
    "InvalidManifestError",
    "InvalidNameError",
    "InvalidURIError",
    "KeyFileError",
    "Lineage",
    "LoadedArtifact",
    "Manifest",
    "ModelVersion",
    "NotPromotedError",
    "Producer",
    "Progress",
    "PublishConflictError",
    "ReadOnlyStoreError",
    "Registry",
    "RetentionPlan",
    "RetentionPolicy",
    "SignatureMismatchError",
    "Signer",
    "TrustedKeys",
    "UnsignedArtifactError",
    "UntrustedArtifactError",
    "UntrustedKeyError",
    "apply_retention",
    "cleanup",
    "compute_digest",
    "delete",
    "key_id",
    "library_versions",
    "list_artifacts",
    "load",
    "manifest_for_folder",
    "parse_manifest",
    "parse_uri",
    "plan_retention",
    "publish",
    "read_manifest",
    "signers",
    "verify_manifest",
]
