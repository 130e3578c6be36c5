"""What one reconcile pass decided: the output of every controller's pure state machine.

Children are named by reference (apiVersion, kind, name) in the kind's namespace; the controller carries the
actions out in this order: create, apply, delete, patch, the status, Events, and last the object itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Obj = dict[str, Any]
Ref = tuple[str, str, str]  # (apiVersion, kind, name) of a child
KUEUE_API = "kueue.x-k8s.io/v1beta2"


def job(name: str) -> Ref:
    return ("batch/v1", "Job", name)


def service(name: str) -> Ref:
    return ("v1", "Service", name)


def workload_ref(name: str) -> Ref:
    """A Kueue Workload: not Kiln's child (Kueue makes one per queued Job), but Kiln patches spec.active."""
    return (KUEUE_API, "Workload", name)


@dataclass
class Plan:
    status: Obj
    create: list[Obj] = field(default_factory=list)  # children created (or got, when they exist), in order
    apply: list[Obj] = field(default_factory=list)  # children server-side applied, in order
    delete: list[Ref] = field(default_factory=list)  # children deleted (background propagation)
    patch: list[tuple[Ref, Obj]] = field(default_factory=list)  # merge patches of children
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    requeue_after: float | None = None  # seconds until a deadline or TTL needs a look
    want_log_tail: str | None = None  # pod whose log tail goes into status.failure.logTail
    promote: tuple[str, str] | None = None  # (artifact URI, registry model name): record status.promoted
    delete_self: bool = False

    def delete_once(self, ref: Ref) -> None:
        if ref not in self.delete:
            self.delete.append(ref)

    def deleted(self, kind: str) -> list[str]:
        """The names of the children of ``kind`` this pass deletes, sorted."""
        return sorted(name for _, k, name in self.delete if k == kind)

    def patched(self, kind: str) -> list[tuple[str, Obj]]:
        """(name, patch) of the children of ``kind`` this pass patches."""
        return [(name, body) for (_, k, name), body in self.patch if k == kind]
