"""kiln_artifacts: one store and one manifest shared by the trainer, compressor, server and operator.

See README "Artifacts". Heavy or optional dependencies (s3fs, huggingface_hub, numpy, moto) are imported
lazily, where they are needed.
"""

from .errors import (
    ArtifactError,
    ArtifactExistsError,
    ArtifactNotFoundError,
    CredentialsError,
    IntegrityError,
    InvalidManifestError,
    InvalidNameError,
    InvalidURIError,
    NotPromotedError,
    PublishConflictError,
    ReadOnlyStoreError,
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
    "apply_retention",
    "cleanup",
    "compute_digest",
    "delete",
    "library_versions",
    "list_artifacts",
    "load",
    "manifest_for_folder",
    "parse_manifest",
    "parse_uri",
    "plan_retention",
    "publish",
    "read_manifest",
]
