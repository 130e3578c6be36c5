"""Kueue's controller manager (built by hack/build-kueue.sh from the Go module proxy) run on this machine against a
test cluster, with the release's own CRDs and webhooks.

How it is wired, and why:
- Webhooks: the API server runs on this machine, so the webhook configurations call Kueue by URL
  (``https://127.0.0.1:<port>/...``, the supported alternative to a Service), with a certificate for 127.0.0.1 made
  here. Kueue's internal certificate management is therefore off: it can only issue certificates for the name of an
  in-cluster Service, which the API server on this machine cannot resolve.
- With internal certificates off, the manager reads its metrics certificate from the fixed path
  /etc/kueue/metrics/certs (what a Secret volume would provide in a pod). It runs in a mount namespace of its own
  with an overlay on /etc that holds that folder, so this machine's /etc is never written.
- Only the batch/v1 Job integration is on (the one Kiln uses), and only the webhooks of Jobs and of Kueue's own
  kinds are registered; Jobs in kube-system and kueue-system are left alone, as upstream's kustomization does.
- It logs in with the cluster's admin kubeconfig: Kueue's RBAC is Kueue's business, Kiln's is tested elsewhere.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from .cluster import Cluster, bin_dir
from .net import free_port
from .pki import make_ca, make_leaf
from .processes import stop
from .waiting import wait_for

NAMESPACE = "kueue-system"
API = "kueue.x-k8s.io/v1beta2"
WEBHOOKS = ("kueue-mutating-webhook-configuration", "kueue-validating-webhook-configuration")
# The groups whose webhooks are registered: Jobs (the integration on) and Kueue's own kinds.
WEBHOOK_GROUPS = {"batch", "kueue.x-k8s.io"}
LEFT_ALONE = {
    "matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": [NAMESPACE, "kube-system"]}
    ]
}


def version() -> str:
    return next(
        line.split("=", 1)[1].strip()
        for line in (Path(__file__).parents[2] / "hack/versions.env").read_text().splitlines()
        if line.startswith("KUEUE_VERSION=")
    )


def manifests() -> Path:
    return Path(os.environ.get("KILN_CACHE", Path.home() / ".cache/kiln")) / f"kueue-{version()}"


def binary() -> Path:
    """The manager; the test skips without it (hack/build-kueue.sh not run), except under CI, where it fails."""
    path = bin_dir() / "kueue-manager"
    if not path.exists() or not (manifests() / "webhook/manifests.yaml").exists():
        why = f"Kueue {version()} is not built ({path}, {manifests()}): run hack/build-kueue.sh"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    if os.geteuid() != 0:
        pytest.skip("Kueue runs in a mount namespace of its own, which takes root (as the real node does)")
    return path


def webhook_configurations(port: int, ca_pem: bytes) -> list[dict[str, Any]]:
    """The release's webhook configurations for Jobs and Kueue's kinds, calling 127.0.0.1:<port> by URL."""
    out = []
    for doc in yaml.safe_load_all((manifests() / "webhook/manifests.yaml").read_text()):
        if not doc:
            continue
        kept = []
        for hook in doc.get("webhooks") or []:
            groups = {g for rule in hook.get("rules") or [] for g in rule.get("apiGroups") or []}
            if not groups or not groups <= WEBHOOK_GROUPS:
                continue
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {
                "url": f"https://127.0.0.1:{port}{path}",
                "caBundle": base64.b64encode(ca_pem).decode(),
            }
            if groups == {"batch"}:
                hook["namespaceSelector"] = LEFT_ALONE
            kept.append(hook)
        kind = doc["kind"]
        doc["metadata"] = {"name": WEBHOOKS[0] if kind.startswith("Mutating") else WEBHOOKS[1]}
        doc["webhooks"] = kept
        out.append(doc)
    return out


class Kueue:
    """One running manager: ``apply`` queues and flavors, ``workloads`` reads what Kueue decided."""

    def __init__(self, cluster: Cluster, workdir: Path) -> None:
        self.cluster, self.workdir = cluster, workdir
        self.log = workdir / "kueue.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        manager = binary()
        self.cluster.kubectl(
            "apply", "--server-side", "--force-conflicts", "-f", str(manifests() / "crds"), "-o", "name"
        )
        self.cluster.kubectl(
            "wait", "--for=condition=Established", "--timeout=60s", "-f", str(manifests() / "crds"), "-o", "name"
        )
        self.cluster.kubectl("create", "namespace", NAMESPACE, check=False)  # kept between runs: it holds nothing

        ca = make_ca("kueue-webhook-ca")
        leaf = make_leaf(ca, dns=("localhost",), ips=("127.0.0.1",))
        certs = self.workdir / "webhook-certs"
        certs.mkdir(parents=True, exist_ok=True)
        (certs / "tls.crt").write_bytes(leaf.cert_pem)
        (certs / "tls.key").write_bytes(leaf.key_pem)
        port, health = free_port(), free_port()
        self.health = f"http://127.0.0.1:{health}"
        config = {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2",
            "kind": "Configuration",
            "namespace": NAMESPACE,
            "health": {"healthProbeBindAddress": f"127.0.0.1:{health}"},
            "metrics": {"bindAddress": "0"},
            "webhook": {"host": "127.0.0.1", "port": port, "certDir": str(certs)},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "integrations": {"frameworks": ["batch/job"]},
            "featureGates": {"VisibilityOnDemand": False},
        }
        (self.workdir / "config.yaml").write_text(yaml.safe_dump(config))
        upper, work = self.workdir / "etc-upper", self.workdir / "etc-work"
        (upper / "kueue/metrics/certs").mkdir(parents=True, exist_ok=True)
        work.mkdir(exist_ok=True)
        metrics = make_leaf(ca, dns=("localhost",), ips=("127.0.0.1",))
        (upper / "kueue/metrics/certs/tls.crt").write_bytes(metrics.cert_pem)
        (upper / "kueue/metrics/certs/tls.key").write_bytes(metrics.key_pem)
        script = (
            f"mount -t overlay overlay -o lowerdir=/etc,upperdir={shlex.quote(str(upper))},"
            f"workdir={shlex.quote(str(work))} /etc && exec {shlex.quote(str(manager))} "
            f"--config={shlex.quote(str(self.workdir / 'config.yaml'))} --zap-log-level=2"
        )
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "KUBECONFIG": self.cluster.kubeconfig},
                start_new_session=True,
            )
        wait_for(self._ready, what=f"Kueue's manager ready (log: {self.log})", timeout=120)
        hooks = webhook_configurations(port, ca.pem)
        self.cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=yaml.safe_dump_all(hooks))

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"Kueue's manager exited {self.process.returncode}: {self.tail()}")
        try:
            with urllib.request.urlopen(f"{self.health}/readyz", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""

    def stop(self) -> None:
        # The webhooks go first: with failurePolicy Fail, a webhook nobody answers would refuse every Job.
        for name in WEBHOOKS:
            kind = "mutatingwebhookconfiguration" if "mutating" in name else "validatingwebhookconfiguration"
            self.cluster.kubectl("delete", kind, name, "--ignore-not-found", check=False)
        if self.process is not None:
            stop(self.process, grace=30, group=True)

    def apply(self, *objs: dict[str, Any]) -> None:
        self.cluster.kubectl("apply", "--server-side", "-f", "-", stdin=yaml.safe_dump_all(objs))

    def workloads(self, namespace: str) -> list[dict[str, Any]]:
        return json.loads(
            self.cluster.kubectl("get", "workloads.kueue.x-k8s.io", "-n", namespace, "-o", "json").stdout
        )["items"]


@contextmanager
def running_kueue(cluster: Cluster, workdir: Path) -> Iterator[Kueue]:
    kueue = Kueue(cluster, workdir)
    try:
        kueue.start()
        yield kueue
    finally:
        kueue.stop()


def flavor(name: str) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "ResourceFlavor", "metadata": {"name": name}}


def cluster_queue(name: str, flavor_name: str, quota: dict[str, str], **spec: Any) -> dict[str, Any]:
    """A ClusterQueue with ``quota`` (resource -> nominal quota) in one flavor, for the namespaces labelled
    kiln.dev/queue=<name>."""
    return {
        "apiVersion": API,
        "kind": "ClusterQueue",
        "metadata": {"name": name},
        "spec": {
            "namespaceSelector": {"matchLabels": {"kiln.dev/queue": name}},
            "resourceGroups": [
                {
                    "coveredResources": sorted(quota),
                    "flavors": [
                        {
                            "name": flavor_name,
                            "resources": [{"name": r, "nominalQuota": q} for r, q in sorted(quota.items())],
                        }
                    ],
                }
            ],
            **spec,
        },
    }


def local_queue(name: str, namespace: str, cluster_queue_name: str) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "LocalQueue",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"clusterQueue": cluster_queue_name},
    }
