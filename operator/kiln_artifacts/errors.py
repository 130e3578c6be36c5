"""Errors of kiln_artifacts: each names the URI, field or file at fault and the rule it broke."""

from __future__ import annotations


class ArtifactError(Exception):
    """Base class of every error this library raises on purpose."""


class InvalidURIError(ArtifactError, ValueError):
    """A URI that is not one of the supported schemes or breaks a rule of its scheme."""


class InvalidNameError(ArtifactError, ValueError):
    """A model name, file path or other identifier that breaks its rule."""


class InvalidManifestError(ArtifactError, ValueError):
    """A manifest that is not valid JSON or breaks the manifest schema; lists every problem found."""

    def __init__(self, where: str, problems: list[str]) -> None:
        self.where = where
        self.problems = problems
        super().__init__(f"invalid manifest {where}: " + "; ".join(problems))


class ArtifactNotFoundError(ArtifactError, FileNotFoundError):
    """No complete artifact (no manifest) at the URI."""


class IntegrityError(ArtifactError):
    """A file of an artifact is missing, truncated, changed or unexpected; `path` names it."""

    def __init__(self, uri: str, path: str | None, message: str) -> None:
        self.uri = uri
        self.path = path
        where = f"{uri}: file {path}" if path is not None else uri
        super().__init__(f"{where}: {message}")


class ArtifactExistsError(ArtifactError, FileExistsError):
    """The destination already holds a different complete artifact (artifacts are immutable)."""


class PublishConflictError(ArtifactError):
    """Another publish or delete holds the destination, or the destination holds files that are not an artifact."""


class CredentialsError(ArtifactError):
    """S3 credentials are missing from the environment (they come from a referenced Secret, never from the URI)."""


class ReadOnlyStoreError(ArtifactError):
    """A write to a read-only source such as hf://."""


class NotPromotedError(ArtifactError, LookupError):
    """No promoted version of a model (or not that version) in the registry."""


class KeyFileError(ArtifactError, ValueError):
    """A signing key or trusted key that cannot be used (unreadable, not PEM, not Ed25519); names the file."""


class UntrustedArtifactError(ArtifactError):
    """The artifact's manifest does not carry a valid signature by a trusted key; ``reason`` says which rule failed.

    Raised only when the caller asked for trusted keys; ``uri`` names the artifact."""

    reason = "Untrusted"

    def __init__(self, uri: str, message: str) -> None:
        self.uri = uri
        super().__init__(f"{uri}: {message}")


class UnsignedArtifactError(UntrustedArtifactError):
    """The manifest has no signatures at all."""

    reason = "Unsigned"


class SignatureMismatchError(UntrustedArtifactError):
    """A signature by a trusted key does not verify: the manifest was changed after it was signed."""

    reason = "SignatureInvalid"


class UntrustedKeyError(UntrustedArtifactError):
    """Every signature is by a key outside the trusted set; the message lists the artifact's and the trusted ids."""

    reason = "UntrustedKey"
