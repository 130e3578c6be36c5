"""Handlers for one kind. A placeholder until its controller issue: records the observed generation."""

from typing import Any

import kopf

from kiln_operator import metrics, status
from kiln_operator.resources import TRAINING_JOB as KIND


@kopf.on.resume(*KIND.resource)
@kopf.on.create(*KIND.resource)
@kopf.on.update(*KIND.resource, field="spec")
@metrics.instrumented(KIND.kind)
async def reconcile(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    status.write(body, patch, status.placeholder(KIND.kind))
