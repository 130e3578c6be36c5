"""The operator's configuration: every setting it reads from its environment (the Deployment's env), read once at
startup into one immutable object. Nothing else in the operator reads the environment."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kiln_artifacts.k8s import s3_env
from kiln_artifacts.settings import DEFAULT_PVC_ROOT, PVC_ROOT_ENV
from kiln_operator.lifecycle import modelcompression, modeldeployment, trainingjob

METRICS_ADDRESS_ENV = "KILN_METRICS_ADDRESS"
DEFAULT_METRICS_ADDRESS = "0.0.0.0:9090"


@dataclass(frozen=True)
class Config:
    # The artifact store: where trained models, checkpoints and candidates go (absent: only explicit URIs).
    artifact_root: str | None = None
    # The model registry ModelCompressions promote into; defaults to <artifact_root>/registry.
    registry_root: str | None = None
    # A Secret with S3 credentials, passed to workload pods by reference (never copied), and the S3 endpoint.
    artifact_s3_secret: str | None = None
    artifact_s3_endpoint: str | None = None
    # Where claims of pvc:// URIs are mounted in the operator's own pod (it reads progress files there).
    pvc_root: str = DEFAULT_PVC_ROOT
    # Images used when a spec names none.
    trainer_image: str | None = None
    compressor_image: str | None = None
    server_image: str | None = None
    # How often the trainer's progress is read (a log tail or a file): the cost per running TrainingJob.
    progress_poll_seconds: float = 15.0
    # Reconcile passes in parallel per kind; one key never runs twice at once.
    workers: int = 32
    # Prometheus' HTTP API for the canary analysis; absent: the operator scrapes the serving pods itself.
    prometheus_url: str | None = None
    # The operator's own /metrics endpoint.
    metrics_address: str = DEFAULT_METRICS_ADDRESS
    # This replica's name in Events (the Downward API's pod name; the host name outside a pod).
    pod_name: str = "kiln-operator"
    # The operator's namespace (Downward API): its direct scrapes of the servers' metrics come from there, so each
    # ModelDeployment's NetworkPolicy lets it in.
    namespace: str = "kiln-system"
    # Namespaces whose pods may scrape the servers' metrics port (where Prometheus runs).
    monitoring_namespaces: tuple[str, ...] = ("monitoring",)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            return env.get(name) or None

        root = get("KILN_ARTIFACT_ROOT")
        return cls(
            artifact_root=root,
            registry_root=get("KILN_REGISTRY_ROOT") or (f"{root.rstrip('/')}/registry" if root else None),
            artifact_s3_secret=get("KILN_ARTIFACT_S3_SECRET"),
            artifact_s3_endpoint=get("KILN_ARTIFACT_S3_ENDPOINT"),
            pvc_root=get(PVC_ROOT_ENV) or DEFAULT_PVC_ROOT,
            trainer_image=get("KILN_TRAINER_IMAGE"),
            compressor_image=get("KILN_COMPRESSOR_IMAGE"),
            server_image=get("KILN_SERVER_IMAGE"),
            progress_poll_seconds=float(get("KILN_PROGRESS_POLL_SECONDS") or 15),
            workers=int(get("KILN_WORKERS") or 32),
            prometheus_url=get("KILN_PROMETHEUS_URL"),
            metrics_address=get(METRICS_ADDRESS_ENV) or DEFAULT_METRICS_ADDRESS,
            pod_name=get("POD_NAME") or socket.gethostname(),
            namespace=get("POD_NAMESPACE") or "kiln-system",
            monitoring_namespaces=tuple(
                n.strip() for n in (get("KILN_MONITORING_NAMESPACES") or "monitoring").split(",") if n.strip()
            ),
        )

    @property
    def artifact_env(self) -> tuple[dict[str, Any], ...]:
        """The store's credentials as workload env (Secret references)."""
        if not self.artifact_s3_secret:
            return ()
        return tuple(s3_env(self.artifact_s3_secret, endpoint_url=self.artifact_s3_endpoint))

    def trainingjob(self) -> trainingjob.Config:
        return trainingjob.Config(
            image_default=self.trainer_image,
            artifact_root=self.artifact_root,
            artifact_env=self.artifact_env,
            progress_poll_seconds=self.progress_poll_seconds,
        )

    def modelcompression(self) -> modelcompression.Config:
        return modelcompression.Config(
            image_default=self.compressor_image,
            artifact_root=self.artifact_root,
            registry_root=self.registry_root,
            artifact_env=self.artifact_env,
        )

    def modeldeployment(self) -> modeldeployment.Config:
        return modeldeployment.Config(image_default=self.server_image, artifact_env=self.artifact_env)
