"""The custom resources Kiln serves: one place for group, version, kinds and plurals."""

from dataclasses import dataclass

GROUP = "kiln.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


@dataclass(frozen=True)
class Kind:
    kind: str
    plural: str

    api_version: str = API_VERSION

    @property
    def resource(self) -> tuple[str, str, str]:
        """(group, version, plural): what kopf's decorators take."""
        return (GROUP, VERSION, self.plural)


TRAINING_JOB = Kind("TrainingJob", "trainingjobs")
MODEL_COMPRESSION = Kind("ModelCompression", "modelcompressions")
MODEL_DEPLOYMENT = Kind("ModelDeployment", "modeldeployments")
ALL = (TRAINING_JOB, MODEL_COMPRESSION, MODEL_DEPLOYMENT)
