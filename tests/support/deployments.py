"""The ModelDeployment state machine's children as the API server and the Deployment controller would keep them, for
tests that drive ``lifecycle.modeldeployment.decide`` pass after pass without a cluster."""

from __future__ import annotations

from typing import Any

Obj = dict[str, Any]


def carry_out(deployments: dict[str, Obj], plan: Any) -> None:
    """Apply a Plan's Deployments to ``deployments`` (by name): applied ones keep the status they had (readiness is
    the test's to set), deleted ones go."""
    for obj in plan.apply:
        if obj["kind"] != "Deployment":
            continue
        meta = obj["metadata"]
        old = deployments.get(meta["name"], {})
        deployments[meta["name"]] = {
            "metadata": {k: meta[k] for k in ("name", "labels", "annotations")},
            "spec": {"replicas": obj["spec"]["replicas"]},
            "status": old.get("status", {}),
        }
    for _, kind, name in plan.delete:
        if kind == "Deployment":
            deployments.pop(name, None)
