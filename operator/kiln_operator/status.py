"""Status writing shared by the controllers."""

from typing import Any

import kopf

from kiln_operator.conditions import Condition, now, set_condition


def write(body: kopf.Body, patch: kopf.Patch, *new: Condition) -> None:
    """Record that this generation was seen, with the given conditions merged into status.conditions."""
    generation = body.metadata.get("generation")
    current: list[dict[str, Any]] = list(body.status.get("conditions") or [])
    stamp = now()
    for condition in new:
        current = set_condition(current, condition, generation, stamp)
    patch.status["observedGeneration"] = generation
    patch.status["conditions"] = current


def placeholder(kind: str) -> Condition:
    """What a kind whose controller is not written yet says: seen, but not Ready."""
    return Condition("Ready", "Unknown", "ControllerNotImplemented", f"the {kind} controller is not implemented yet")
