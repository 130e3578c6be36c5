"""The access log (docs/server.md "Access log"): a sampled share of inference requests, one JSON object per line
on stderr (logger ``kiln_server.access``), with the request id that the payload log and the client share, so logs,
payload records and metrics can be correlated."""

from __future__ import annotations

import json
import logging
import random
import sys
from collections.abc import Callable
from typing import Any

from .payload import rfc3339

LOGGER = "kiln_server.access"


def _logger() -> logging.Logger:
    """One JSON object per line, whatever the other logs' format and level: the rate decides what is logged."""
    logger = logging.getLogger(LOGGER)
    if not any(getattr(h, "kiln_access", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.kiln_access = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


class AccessLog:
    def __init__(
        self,
        rate: float,
        *,
        model: str,
        digest: Callable[[], str],
        deployment: str | None,
        revision: str | None,
    ) -> None:
        self.rate = rate
        self.model = model
        self._digest = digest
        self.deployment = deployment
        self.revision = revision
        self._log = _logger()
        self._random = random.random

    def sampled(self) -> bool:
        return self.rate >= 1 or (self.rate > 0 and self._random() < self.rate)

    def line(
        self,
        *,
        time: float,
        request_id: str,
        protocol: str,
        latency_s: float,
        status: int,
        batch_size: int,
        samples: int,
        user: str | None = None,
    ) -> dict[str, Any]:
        line: dict[str, Any] = {
            "time": rfc3339(time),
            "request_id": request_id,
            "model": self.model,
            "model_digest": self._digest() or None,
            "deployment": self.deployment,
            "revision": self.revision,
            "protocol": protocol,
            "status": status,
            "latency_ms": round(latency_s * 1000, 3),
            "batch_size": batch_size,
            "samples": samples,
        }
        if user is not None:  # with --auth kubernetes: who called (the TokenReview's username)
            line["user"] = user
        return line

    def emit(self, **fields: Any) -> None:
        self._log.info(json.dumps(self.line(**fields), ensure_ascii=False))
