"""What the compressor's termination message leaves out first when its report does not fit the kubelet's limit.

Exit codes, failure classes and the message itself are every workload's: kiln_artifacts.contract.
"""

from __future__ import annotations

from typing import Any


def shrink(body: dict[str, Any]) -> bool:
    """Drop the least useful part of the summary in place; False when nothing is left to drop."""
    report = body.get("report")
    if isinstance(report, dict):
        for who in ("source", "candidate"):
            m = report.get(who)
            if isinstance(m, dict) and len(m.get("latency") or []) > 1:
                m["latency"] = m["latency"][:1]  # the reference cell stays
                return True
        if report.get("cpuFallbackNodes"):
            report["cpuFallbackNodes"] = report["cpuFallbackNodes"][: len(report["cpuFallbackNodes"]) // 2]
            return True
        for gate in report.get("gates") or []:
            if len(gate.get("message", "")) > 60:
                gate["message"] = gate["message"][:57] + "..."
                return True
        body.pop("report")
        return True
    return body.pop("candidates", None) is not None
