"""The real Prometheus Operator for the monitoring tests: its pinned CRDs and binary (hack/build-prometheus-operator.sh
puts both in the cache), Kiln's monitoring objects rendered as users render them, the operator as a process
against the local cluster, and Prometheus' relabeling, to see which targets a generated scrape job would keep."""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import os
import re
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml

from .cluster import REPO, Cluster, bin_dir
from .net import free_port
from .processes import stop
from .waiting import wait_for

GROUP = "monitoring.coreos.com"
MANIFESTS = REPO / "manifests"
# What docs/operations.md ("Alerts and dashboards") tells users to add for the Prometheus Operator.
COMPONENTS = ("servicemonitor", "alerts")


def version() -> str:
    """PROMETHEUS_OPERATOR_VERSION of hack/versions.env (without a leading v)."""
    for line in (REPO / "hack/versions.env").read_text().splitlines():
        if line.startswith("PROMETHEUS_OPERATOR_VERSION="):
            return line.split("=", 1)[1].strip()
    raise AssertionError("PROMETHEUS_OPERATOR_VERSION is not set in hack/versions.env")


def crds_dir() -> Path:
    cache = Path(os.environ.get("KILN_CACHE") or Path.home() / ".cache/kiln")
    return cache / f"prometheus-operator-{version()}" / "crds"


def _missing(what: str) -> NoReturn:
    """Skip without the cached tools, except under CI, where hack/test.sh must have built them."""
    message = f"{what} (hack/build-prometheus-operator.sh)"
    if os.environ.get("CI"):
        pytest.fail(f"not built under CI: {message}")
    pytest.skip(f"not built: {message}")


def require_crds() -> list[Path]:
    files = sorted(crds_dir().glob(f"{GROUP}_*.yaml"))
    if not files:
        _missing(f"Prometheus Operator {version()} CRDs in {crds_dir()}")
    return files


def require_operator() -> Path:
    binary = bin_dir() / "prometheus-operator"
    out = (
        subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False)
        if binary.exists()
        else None
    )
    if out is None or f"version {version()} " not in out.stdout + out.stderr:
        _missing(f"prometheus-operator {version()} in {binary}")
    return binary


def apply_crds(cluster: Cluster) -> list[str]:
    """Server-side apply the pinned CRDs (too large for client-side apply's last-applied annotation) and wait until
    they are Established and served; returns their names."""
    files = require_crds()
    args = [arg for f in files for arg in ("-f", str(f))]
    out = cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", "--field-manager=kiln-tests", "-o", "name", *args
    )
    # customresourcedefinition.apiextensions.k8s.io/<name> (PyYAML cannot load these files: a YAML 1.1 `=` value)
    names = [line.split("/", 1)[1] for line in out.stdout.split()]
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *args)
    # kubectl resolves kinds through its discovery cache, filled before these CRDs may have existed.
    wait_for(
        lambda: (
            len(cluster.kubectl("api-resources", f"--api-group={GROUP}", "-o", "name").stdout.split()) >= len(names)
        ),
        what=f"{GROUP} resources in discovery",
    )
    return names


def render(
    cluster: Cluster, workdir: Path, namespace: str, components: Sequence[str] = COMPONENTS
) -> list[dict[str, Any]]:
    """The install plus `components` from a user's own kustomization (`namespace` set, as overlays do), rendered
    with kubectl's kustomize: every document, Kiln's monitoring objects among them."""
    workdir.mkdir(parents=True, exist_ok=True)
    here = os.path.relpath(MANIFESTS, workdir)  # kustomize refuses absolute roots
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": namespace,
        "resources": [here],
        "components": [f"{here}/components/{c}" for c in components],
    }
    (workdir / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return [d for d in yaml.safe_load_all(cluster.kubectl("kustomize", str(workdir)).stdout) if d]


def monitoring_objects(docs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [dict(d) for d in docs if d["apiVersion"].startswith(f"{GROUP}/")]


def apply_strict(
    cluster: Cluster, docs: Sequence[Mapping[str, Any]], *, dry_run: bool = False
) -> subprocess.CompletedProcess:
    """Server-side apply with field validation Strict: an unknown or duplicate field fails the request instead of
    being pruned silently by the structural schema. Not checked: the caller reads returncode and stderr."""
    args = ["apply", "--server-side", "--validate=strict", "--field-manager=kiln-tests", "-f", "-"]
    if dry_run:
        args.append("--dry-run=server")
    return cluster.kubectl(*args, stdin=yaml.safe_dump_all(list(docs)), check=False)


def missing_fields(applied: Any, stored: Any, path: str = "") -> list[str]:
    """Paths of `applied` that `stored` lacks or holds with another value (defaults the server adds are fine)."""
    if isinstance(applied, Mapping):
        if not isinstance(stored, Mapping):
            return [path or "."]
        return [p for k, v in applied.items() for p in missing_fields(v, stored.get(k), f"{path}.{k}")] + [
            f"{path}.{k}" for k in applied if k not in stored
        ]
    if isinstance(applied, list):
        if not isinstance(stored, list) or len(stored) != len(applied):
            return [path]
        return [
            p
            for i, (a, s) in enumerate(zip(applied, stored, strict=True))
            for p in missing_fields(a, s, f"{path}[{i}]")
        ]
    return [] if applied == stored else [path]


# --- The operator process.


@dataclass
class PrometheusOperator:
    namespace: str
    log: Path
    url: str
    process: subprocess.Popen[bytes]

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:]) or "(no log)"

    def warnings(self) -> list[str]:
        """The operator's warnings: what it skips or ignores in a monitor or rule ("skipping object", "ignoring
        `keep_firing_for` not supported by ...") is logged at this level only. Its errors are left out: they are
        retried conflicts and, at its stop, cancelled requests."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [line for line in text.splitlines() if "level=warn" in line]


@contextlib.contextmanager
def run_prometheus_operator(cluster: Cluster, namespace: str, workdir: Path) -> Iterator[PrometheusOperator]:
    """The Prometheus Operator as a process on this machine, logged in with the cluster's kubeconfig (KUBECONFIG:
    it has no --kubeconfig flag) and limited to `namespace` (--namespaces: every kind it watches, and what it
    creates). No admission webhook: the CRDs' schemas are the admission under test. The status of every monitor
    and rule says whether a Prometheus accepted it (feature gate StatusForConfigurationResources). Always stopped;
    its log stays in `workdir`."""
    binary = require_operator()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "prometheus-operator.log"
    url = f"http://127.0.0.1:{free_port()}"
    args = [
        str(binary),
        f"--namespaces={namespace}",
        f"--web.listen-address={url.removeprefix('http://')}",
        "--feature-gates=StatusForConfigurationResources=true",
        "--log-level=info",
    ]
    env = {**os.environ, "KUBECONFIG": cluster.kubeconfig}
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    op = PrometheusOperator(namespace, log, url, proc)
    try:

        def healthy() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"prometheus-operator exited with {proc.returncode}; log tail:\n{op.log_tail()}")
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:
                    return r.status == 200
            except (urllib.error.URLError, OSError):  # not listening yet
                return False

        wait_for(healthy, what=f"prometheus-operator on {url}", timeout=60)
        yield op
    finally:
        # With status reporting on, the operator puts a finalizer (monitoring.coreos.com/status-cleanup) on every
        # Prometheus it reconciles: delete them while it still runs to remove it, or the namespace never goes.
        kinds = "prometheuses,prometheusagents,alertmanagers,thanosrulers"
        cluster.kubectl("delete", kinds, "--all", "-n", namespace, "--timeout=60s", check=False)
        for name in cluster.kubectl("get", kinds, "-n", namespace, "-o", "name", check=False).stdout.split():
            # The operator died first: nothing else removes its finalizer.
            cluster.kubectl("patch", name, "-n", namespace, "--type=merge", "-p", '{"metadata":{"finalizers":null}}')
        stop(proc)


def generated_config(cluster: Cluster, namespace: str, prometheus: str) -> dict[str, Any] | None:
    """The configuration the operator generated for Prometheus `prometheus`: Secret prometheus-<name>, key
    prometheus.yaml.gz (pkg/prometheus ConfigSecretName and ConfigFilename); None until it exists."""
    found = cluster.kubectl("get", "secret", f"prometheus-{prometheus}", "-n", namespace, "-o", "json", check=False)
    if found.returncode:
        return None
    data = yaml.safe_load(found.stdout).get("data") or {}
    if "prometheus.yaml.gz" not in data:
        return None
    text = gzip.decompress(base64.b64decode(data["prometheus.yaml.gz"])).decode()
    # The config reloader substitutes these in the Prometheus pod; one shard, shard 0.
    return yaml.safe_load(text.replace("$(SHARD)", "0").replace("$(POD_NAME)", f"prometheus-{prometheus}-0"))


def scrape_job(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    jobs = {j["job_name"]: j for j in config.get("scrape_configs") or []}
    assert name in jobs, f"no scrape job {name}; jobs: {sorted(jobs)}"
    return jobs[name]


# --- Service discovery and relabeling as Prometheus does them, for the targets of a generated scrape job.


def _sanitize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def pod_targets(pod: Mapping[str, Any], ip: str = "10.0.0.7") -> list[dict[str, str]]:
    """The discovered labels of a pod (kubernetes_sd role pod): one target per container port."""
    meta = pod["metadata"]
    common = {
        "__meta_kubernetes_namespace": meta["namespace"],
        "__meta_kubernetes_pod_name": meta["name"],
        "__meta_kubernetes_pod_ip": ip,
        "__meta_kubernetes_pod_phase": "Running",
        **{f"__meta_kubernetes_pod_label_{_sanitize(k)}": v for k, v in (meta.get("labels") or {}).items()},
        **{f"__meta_kubernetes_pod_labelpresent_{_sanitize(k)}": "true" for k in meta.get("labels") or {}},
    }
    return [
        {
            **common,
            "__address__": f"{ip}:{port['containerPort']}",
            "__meta_kubernetes_pod_container_name": container["name"],
            "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
            "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
            "__meta_kubernetes_pod_container_port_protocol": port.get("protocol", "TCP"),
        }
        for container in pod["spec"]["containers"]
        for port in container.get("ports") or []
    ]


def endpoint_targets(service: Mapping[str, Any], pod_name: str, ip: str = "10.0.0.8") -> list[dict[str, str]]:
    """The discovered labels of a Service's endpoints (kubernetes_sd role endpoints) with one ready pod behind it:
    one target per Service port (its name is the endpoint port's)."""
    meta = service["metadata"]
    common = {
        "__meta_kubernetes_namespace": meta["namespace"],
        "__meta_kubernetes_service_name": meta["name"],
        **{f"__meta_kubernetes_service_label_{_sanitize(k)}": v for k, v in (meta.get("labels") or {}).items()},
        **{f"__meta_kubernetes_service_labelpresent_{_sanitize(k)}": "true" for k in meta.get("labels") or {}},
        "__meta_kubernetes_endpoint_ready": "true",
        "__meta_kubernetes_endpoint_address_target_kind": "Pod",
        "__meta_kubernetes_endpoint_address_target_name": pod_name,
        "__meta_kubernetes_pod_name": pod_name,
        "__meta_kubernetes_pod_phase": "Running",
    }
    return [
        {
            **common,
            "__address__": f"{ip}:{port['targetPort'] if isinstance(port['targetPort'], int) else port['port']}",
            "__meta_kubernetes_endpoint_port_name": port.get("name", ""),
            "__meta_kubernetes_endpoint_port_protocol": port.get("protocol", "TCP"),
        }
        for port in service["spec"]["ports"]
    ]


def _expand(template: str, match: re.Match[str]) -> str:
    """Go's Regexp.ExpandString: $1, ${1}, $name, ${name}; $$ is a dollar; an unknown group is empty."""

    def group(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(2)
        try:
            return match.group(int(name) if name.isdigit() else name) or ""
        except IndexError:  # no such group
            return ""

    return re.sub(r"\$\$|\$\{(\w+)\}|\$(\w+)", group, template)


def relabel(labels: Mapping[str, str], rules: Sequence[Mapping[str, Any]]) -> dict[str, str] | None:
    """Prometheus' relabel_configs over one target's labels; None when a rule drops the target."""
    out = dict(labels)
    for rule in rules:
        action = rule.get("action", "replace").lower()
        regex = re.compile(f"^(?:{rule.get('regex', '(.*)')})$")
        value = rule.get("separator", ";").join(out.get(s, "") for s in rule.get("source_labels") or [])
        if action == "replace":
            m = regex.match(value)
            if m:
                target = _expand(rule["target_label"], m)
                result = _expand(str(rule.get("replacement", "$1")), m)
                if result:
                    out[target] = result
                else:
                    out.pop(target, None)
        elif action == "keep":
            if not regex.match(value):
                return None
        elif action == "drop":
            if regex.match(value):
                return None
        elif action == "hashmod":
            digest = hashlib.md5(value.encode(), usedforsecurity=False).digest()  # the hash Prometheus uses
            out[rule["target_label"]] = str(int.from_bytes(digest[8:], "big") % int(rule["modulus"]))
        elif action == "labelmap":
            for name, v in list(out.items()):
                m = regex.match(name)
                if m:
                    out[_expand(str(rule.get("replacement", "$1")), m)] = v
        elif action == "labeldrop":
            out = {k: v for k, v in out.items() if not regex.match(k)}
        elif action == "labelkeep":
            out = {k: v for k, v in out.items() if regex.match(k)}
        else:
            raise NotImplementedError(f"relabel action {action!r} (rule {dict(rule)})")
    return out


def scrape_targets(job: Mapping[str, Any], discovered: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """The targets `job` scrapes out of `discovered`: their labels after relabeling, with __address__ and
    __metrics_path__ kept and the other internal (__) labels removed, as Prometheus stores them."""
    start = {
        "job": job["job_name"],
        "__metrics_path__": job.get("metrics_path", "/metrics"),
        "__scheme__": job.get("scheme", "http"),
    }
    targets = []
    for labels in discovered:
        out = relabel({**start, **labels}, job.get("relabel_configs") or [])
        if out is not None:
            targets.append(
                {k: v for k, v in out.items() if not k.startswith("__") or k in ("__address__", "__metrics_path__")}
            )
    return targets
