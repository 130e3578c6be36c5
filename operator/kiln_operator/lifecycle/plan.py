"""What one reconcile pass decided: the output of every controller's pure state machine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Obj = dict[str, Any]


@dataclass
class Plan:
    status: Obj
    create: list[Obj] = field(default_factory=list)  # built children (not yet adopted), created in order
    delete_jobs: list[str] = field(default_factory=list)
    delete_service: bool = False  # the kind's one Service (Controller.service_name)
    delete_self: bool = False
    patch_job: tuple[str, Obj] | None = None  # (job name, merge patch)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    requeue_after: float | None = None  # seconds until a deadline or TTL needs a look
    want_log_tail: str | None = None  # pod whose log tail goes into status.failure.logTail
    promote: tuple[str, str] | None = None  # (artifact URI, registry model name): record status.promoted
    apply: list[Obj] = field(default_factory=list)  # children server-side applied (adopted first), in order
    delete: list[tuple[str, str, str]] = field(default_factory=list)  # (apiVersion, kind, name) of children
