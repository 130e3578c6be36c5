"""What the builders give each workload for security, as data: no ServiceAccount token where none is needed, the
servers' own identity and exactly the bindings it needs when callers are checked, TLS, the signing key and the
trusted keys, and a NetworkPolicy per ModelDeployment."""

from __future__ import annotations

import copy
from typing import Any

from kiln_operator.builders import modelcompression as mcb
from kiln_operator.builders import modeldeployment as b
from kiln_operator.builders import trainingjob as tjb
from kiln_operator.config import Config

D1 = "sha256:" + "1" * 64


def md(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "sentiment", "namespace": "ns", "uid": "u-1", "generation": 1},
        "spec": {"source": {"uri": "file:///m"}, "runtime": {"image": "kiln/server:1"}, **spec},
    }


def revision(body: dict[str, Any]) -> dict[str, Any]:
    return b.deployment(body, "1111111111", uri="file:///m", digest=D1, number=1, role="stable", replicas=1, created=0)


def pod(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container["env"]}


def mounts(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in container["volumeMounts"]}


def volumes(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in spec["volumes"]}


def tj(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "train", "namespace": "ns", "uid": "u"},
        "spec": {"image": "kiln/trainer:1", "model": {"uri": "hf://org/m"}, "dataset": {"uri": "hf://org/d"}, **spec},
    }


def compression(**spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "small", "namespace": "ns", "uid": "u"}, "spec": {"image": "kiln/c:1", **spec}}


def test_batch_workloads_get_no_service_account_token():
    job = tjb.indexed_job(tj(), 1)
    assert pod(job)["automountServiceAccountToken"] is False
    cjob = mcb.compressor_job(compression(), {"uri": "file:///src"}, 1, "file:///out")
    assert pod(cjob)["automountServiceAccountToken"] is False
    # The pod template escape hatch may say otherwise; the default is no token.
    job = tjb.indexed_job(tj(podTemplate={"spec": {"automountServiceAccountToken": True}}), 1)
    assert pod(job)["automountServiceAccountToken"] is True


def test_signing_key_reaches_the_trainer_as_one_read_only_file():
    spec = pod(tjb.indexed_job(tj(signing={"secretName": "kiln-signing"}), 1))
    (trainer,) = spec["containers"]
    assert env(trainer)["KILN_SIGNING_KEY"] == "/etc/kiln/signing/private-key.pem"
    assert mounts(trainer)["/etc/kiln/signing"]["readOnly"] is True
    secret = volumes(spec)["kiln-signing-key"]["secret"]
    assert secret["secretName"] == "kiln-signing"
    assert secret["items"] == [{"key": "private-key.pem", "path": "private-key.pem"}]  # no other key of the Secret
    assert secret["defaultMode"] == 0o440
    unsigned = pod(tjb.indexed_job(tj(), 1))
    assert "KILN_SIGNING_KEY" not in env(unsigned["containers"][0])
    assert "kiln-signing-key" not in volumes(unsigned)


def test_compressor_signs_and_verifies_even_under_a_pod_template():
    body = compression(
        signing={"secretName": "sign"},
        verification={"trustedKeysConfigMap": "trusted"},
        podTemplate={"spec": {"volumes": [{"name": "extra", "emptyDir": {}}]}},
    )
    spec = pod(mcb.compressor_job(body, {"uri": "file:///src"}, 1, "file:///out"))
    ours = next(c for c in spec["containers"] if c["name"] == mcb.CONTAINER)
    assert env(ours)["KILN_SIGNING_KEY"] == "/etc/kiln/signing/private-key.pem"
    assert env(ours)["KILN_TRUSTED_KEYS"] == "/etc/kiln/trusted-keys"
    assert {"/etc/kiln/signing", "/etc/kiln/trusted-keys", "/tmp"} <= set(mounts(ours))
    assert volumes(spec)["kiln-trusted-keys"]["configMap"] == {"name": "trusted"}
    assert "extra" in volumes(spec)


def test_server_without_auth_has_no_token_and_no_identity_of_its_own():
    spec = pod(revision(md()))
    assert spec["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in spec
    assert "KILN_SERVER_AUTH" not in env(spec["containers"][0])


def test_server_with_auth_runs_as_its_own_service_account_bound_to_the_two_reviews():
    body = md(service={"auth": "Kubernetes"})
    spec = pod(revision(body))
    assert spec["serviceAccountName"] == "sentiment-server"
    assert spec["automountServiceAccountToken"] is True
    e = env(spec["containers"][0])
    assert (e["KILN_SERVER_AUTH"], e["KILN_SERVER_NAMESPACE"], e["KILN_SERVER_DEPLOYMENT"]) == (
        "kubernetes",
        "ns",
        "sentiment",
    )
    sa = b.service_account(body)
    assert (sa["metadata"]["name"], sa["metadata"]["namespace"]) == ("sentiment-server", "ns")
    assert sa["automountServiceAccountToken"] is False  # only the pods that ask for a token get one
    subject = [{"kind": "ServiceAccount", "name": "sentiment-server", "namespace": "ns"}]
    rb = b.access_review_binding(body)
    assert rb["metadata"]["namespace"] == "ns"
    assert rb["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": b.ACCESS_REVIEW_ROLE,
    }
    assert rb["subjects"] == subject
    crb = b.token_review_binding(body)
    assert "namespace" not in crb["metadata"]
    assert crb["roleRef"]["name"] == b.TOKEN_REVIEW_ROLE
    assert crb["subjects"] == subject
    assert crb["metadata"]["labels"]["kiln.dev/owner-namespace"] == "ns"
    assert crb["metadata"]["labels"]["app.kubernetes.io/instance"] == "sentiment"
    assert crb["metadata"]["annotations"]["kiln.dev/owner-uid"] == "u-1"


def test_token_review_binding_names_never_collide():
    names = {
        b.token_review_binding_name(ns, name)
        for ns, name in [("a", "b-c"), ("a-b", "c"), ("a", "b.c"), ("x" * 63, "y" * 48), ("x" * 63, "y" * 47 + "z")]
    }
    assert len(names) == 5
    assert all(len(n) <= 253 for n in names)


def test_tls_mounts_the_secret_probes_over_https_and_says_so_in_the_urls():
    body = md(service={"tls": {"secretName": "sentiment-tls"}})
    spec = pod(revision(body))
    (server,) = spec["containers"]
    e = env(server)
    assert (e["KILN_SERVER_TLS_CERT_FILE"], e["KILN_SERVER_TLS_KEY_FILE"]) == (
        "/etc/kiln/tls/tls.crt",
        "/etc/kiln/tls/tls.key",
    )
    # The whole Secret (no items): the kubelet swaps both files at once on renewal.
    assert volumes(spec)["kiln-tls"]["secret"] == {"secretName": "sentiment-tls", "defaultMode": 0o440}
    assert mounts(server)["/etc/kiln/tls"]["readOnly"] is True
    for probe in ("livenessProbe", "readinessProbe"):
        assert server[probe]["httpGet"]["scheme"] == "HTTPS"
    assert b.service_url(body) == "https://sentiment.ns.svc.cluster.local:8080"
    http, grpc = b.service_ports(body["spec"])
    assert http["appProtocol"] == "https"
    assert "appProtocol" not in grpc  # not h2c: the bytes on the wire are TLS
    plain = pod(revision(md()))["containers"][0]
    assert plain["readinessProbe"]["httpGet"]["scheme"] == "HTTP"
    assert b.service_ports(md()["spec"])[1]["appProtocol"] == "kubernetes.io/h2c"


def test_verification_gives_the_server_the_trusted_keys():
    spec = pod(revision(md(verification={"trustedKeysConfigMap": "keys"})))
    (server,) = spec["containers"]
    assert env(server)["KILN_SERVER_TRUSTED_KEYS"] == "/etc/kiln/trusted-keys"
    assert volumes(spec)["kiln-trusted-keys"]["configMap"] == {"name": "keys"}


def test_security_settings_roll_the_pods_only_when_set():
    plain = md()
    assert b.template_hash(plain, None) == b.template_hash(md(service={"auth": "None"}), None)
    changed = {
        b.template_hash(md(service={"auth": "Kubernetes"}), None),
        b.template_hash(md(service={"tls": {"secretName": "t"}}), None),
        b.template_hash(md(verification={"trustedKeysConfigMap": "k"}), None),
    }
    assert b.template_hash(plain, None) not in changed
    assert len(changed) == 3


def test_network_policy_defaults_to_this_namespace_and_the_gateways():
    body = md(service={"gateway": {"parentRefs": [{"name": "gw", "namespace": "edge"}, {"name": "local"}]}})
    policy = b.network_policy(body, "kiln-system", ["monitoring"])
    assert policy["metadata"] == {"name": "sentiment", "namespace": "ns", "labels": b.child_labels("sentiment")}
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": b.selector("sentiment")}
    assert spec["policyTypes"] == ["Ingress"]
    serving, metrics = spec["ingress"]
    assert serving["from"] == [
        {"podSelector": {}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "edge"}}},
    ]
    assert serving["ports"] == [{"port": "http", "protocol": "TCP"}, {"port": "grpc", "protocol": "TCP"}]
    assert metrics["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert metrics["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}
        for ns in ("kiln-system", "monitoring")
    ]


def test_network_policy_allow_from_replaces_the_default():
    peers = [
        {"namespaceSelector": {"matchLabels": {"team": "web"}}, "podSelector": {"matchLabels": {"app": "shop"}}},
        {"podSelector": {"matchExpressions": [{"key": "role", "operator": "In", "values": ["client"]}]}},
    ]
    body = md(service={"allowFrom": copy.deepcopy(peers)})
    serving, _ = b.network_policy(body, "kiln-system", ["monitoring"])["spec"]["ingress"]
    assert serving["from"] == peers


def test_the_operator_reads_who_may_scrape_from_its_environment():
    default = Config.from_env({})
    assert (default.namespace, default.monitoring_namespaces) == ("kiln-system", ("monitoring",))
    config = Config.from_env({"POD_NAMESPACE": "team-a", "KILN_MONITORING_NAMESPACES": " obs , prometheus ,"})
    assert (config.namespace, config.monitoring_namespaces) == ("team-a", ("obs", "prometheus"))
    _, metrics = b.network_policy(md(), config.namespace, config.monitoring_namespaces)["spec"]["ingress"]
    names = [p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for p in metrics["from"]]
    assert names == ["obs", "prometheus", "team-a"]
