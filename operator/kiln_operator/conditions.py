"""Status conditions in the shape of Kubernetes' metav1.Condition (what kubectl wait, kstatus, Argo CD and
Flux read). Pure functions: the handlers pass in the current list and write back what these return."""

import datetime
from dataclasses import dataclass
from typing import Any, Literal

Status = Literal["True", "False", "Unknown"]


def now() -> str:
    """RFC 3339 UTC timestamp with second precision, as the API server writes them."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Condition:
    type: str
    status: Status
    reason: str  # CamelCase, machine-readable
    message: str = ""


def set_condition(
    conditions: list[dict[str, Any]] | None,
    new: Condition,
    generation: int | None,
    timestamp: str,
) -> list[dict[str, Any]]:
    """Return `conditions` with `new` merged in. lastTransitionTime moves only when the status changes, so a
    level-based reconcile can set the same condition on every pass without churning the object."""
    result: list[dict[str, Any]] = []
    replaced = False
    for old in conditions or []:
        if old.get("type") != new.type:
            result.append(old)
            continue
        replaced = True
        result.append(
            _render(new, generation, old.get("lastTransitionTime") if old.get("status") == new.status else timestamp)
        )
    if not replaced:
        result.append(_render(new, generation, timestamp))
    return result


def find(conditions: list[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


def _render(c: Condition, generation: int | None, transition: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": c.type,
        "status": c.status,
        "reason": c.reason,
        "message": c.message,
        "lastTransitionTime": transition,
    }
    if generation is not None:
        out["observedGeneration"] = generation
    return out
