"""Pure builders: a custom resource (dict body, CRD defaults applied) -> child objects as plain dicts.

No API calls, no clocks, no randomness: the same input gives an equal output, and the input is never mutated.
Children come back with their namespace set and no ownerReferences; the handler adopts each one with
``kopf.adopt(obj, owner=body, strict=True)`` before it creates it.
"""
