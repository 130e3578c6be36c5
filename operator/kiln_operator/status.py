"""Status helpers shared by every kind: conditions in the shape of Kubernetes' metav1.Condition (what kubectl
wait, kstatus, Argo CD and Flux read), the kstatus trio Ready/Reconciling/Stalled, and RFC 3339 time.

Pure functions: the state machines pass in the current list and the time, and write back what these return.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Status = Literal["True", "False", "Unknown"]
KSTATUS = ("Ready", "Reconciling", "Stalled")


def rfc3339(ts: float) -> str:
    """RFC 3339 UTC timestamp with second precision, as the API server writes them."""
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Any) -> float | None:
    """Epoch seconds of an RFC 3339 timestamp (any precision and offset); None when absent or not one."""
    if not value or not isinstance(value, str):
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True)
class Condition:
    type: str
    status: Status
    reason: str  # CamelCase, machine-readable
    message: str = ""


def flag(on: bool) -> Status:
    return "True" if on else "False"


def kstatus(
    reason: str,
    message: str,
    *,
    ready: bool = False,
    reconciling: bool = False,
    stalled: bool = False,
    own: Mapping[str, tuple[str, str]] | None = None,
) -> list[Condition]:
    """Ready / Reconciling / Stalled, the conditions kstatus (and the GitOps tools built on it) read to tell
    Current, InProgress and Failed apart. All three say ``reason`` and ``message`` unless ``own`` gives one of
    them (by type) a reason and message of its own.

    kstatus (sigs.k8s.io/cli-utils) reads, in order: an unobserved generation as InProgress, Reconciling=True as
    InProgress, Stalled=True as Failed, and only then Ready: True is Current, False InProgress. So a state the spec
    asks for that is not converging (suspended, held for a person) needs Ready=True to read Current, and a state
    that only a spec change or a new artifact can move on needs Stalled=True (Reconciling=False) to read Failed,
    whatever Ready says (tests/unit/test_kstatus.py runs kstatus on every phase)."""
    own = own or {}
    on = {"Ready": ready, "Reconciling": reconciling, "Stalled": stalled}
    return [Condition(t, flag(on[t]), *own.get(t, (reason, message))) for t in KSTATUS]


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


def merge_conditions(
    old: Sequence[dict[str, Any]] | None, new: Sequence[Condition], generation: int | None, now: float
) -> list[dict[str, Any]]:
    """`old` with every condition of `new` set (in order), stamped `now` where a status changes."""
    stamp = rfc3339(now)
    conditions: list[dict[str, Any]] = list(old or [])
    for c in new:
        conditions = set_condition(conditions, c, generation, stamp)
    return conditions


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
