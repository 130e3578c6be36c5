"""Pure builders: a custom resource (dict body, CRD defaults applied) -> child objects as plain dicts.

No API calls, no clocks, no randomness: the same input gives an equal output, and the input is never mutated.
Children come back with their namespace set and no ownerReferences; the handler adopts each one with
``kopf.adopt(obj, owner=body, strict=True)`` before it creates it.
"""

from typing import Any


def quantity(value: Any) -> float:
    """A plain or milli Kubernetes quantity as a number ("2" -> 2.0, "500m" -> 0.5): CPU counts and metric targets."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
