"""A small vocabulary for structural OpenAPI v3 schemas with CEL rules, so the CRDs read like the API they are.
Every constructor takes the description first: `kubectl explain` is the reference, so nothing goes without one."""

from typing import Any

Schema = dict[str, Any]

NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"  # a DNS-1123 label
DIGEST = r"^sha256:[a-f0-9]{64}$"
QUANTITY = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


def rule(expr: str, message: str, *, field: str | None = None, reason: str | None = None) -> Schema:
    """A CEL rule. `field` points the error at a child field (JSONPath from this node, e.g. '.maxReplicas')."""
    r: Schema = {"rule": expr, "message": message}
    if field:
        r["fieldPath"] = field
    if reason:
        r["reason"] = reason
    return r


def immutable(name: str) -> Schema:
    return rule("self == oldSelf", f"{name} is immutable", reason="FieldValueForbidden")


def _with(schema: Schema, rules: list[Schema] | None, extra: dict[str, Any]) -> Schema:
    schema.update({k: v for k, v in extra.items() if v is not None})
    if rules:
        schema["x-kubernetes-validations"] = rules
    return schema


def string(
    description: str,
    *,
    enum: list[str] | None = None,
    pattern: str | None = None,
    max_length: int = 253,
    min_length: int | None = None,
    default: str | None = None,
    fmt: str | None = None,
    rules: list[Schema] | None = None,
) -> Schema:
    s: Schema = {"type": "string", "description": description}
    if enum:
        s["enum"] = enum
    else:
        s["maxLength"] = max_length
    return _with(s, rules, {"pattern": pattern, "minLength": min_length, "default": default, "format": fmt})


def integer(
    description: str,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    default: int | None = None,
    rules: list[Schema] | None = None,
) -> Schema:
    s: Schema = {"type": "integer", "format": "int64", "description": description}
    return _with(s, rules, {"minimum": minimum, "maximum": maximum, "default": default})


def number(
    description: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    default: float | None = None,
) -> Schema:
    s: Schema = {"type": "number", "description": description}
    if exclusive_minimum:
        s["exclusiveMinimum"] = True
    return _with(s, None, {"minimum": minimum, "maximum": maximum, "default": default})


def boolean(description: str, *, default: bool | None = None) -> Schema:
    return _with({"type": "boolean", "description": description}, None, {"default": default})


def timestamp(description: str) -> Schema:
    return {"type": "string", "format": "date-time", "description": description}


def quantity(description: str) -> Schema:
    """A resource quantity ('500m', '4Gi', 2), as Kubernetes writes them."""
    return {
        "description": description,
        "x-kubernetes-int-or-string": True,
        "anyOf": [{"type": "integer"}, {"type": "string"}],  # exactly this shape, or it is not structural
        "pattern": QUANTITY,
    }


def obj(
    description: str,
    properties: dict[str, Schema],
    *,
    required: list[str] | None = None,
    rules: list[Schema] | None = None,
    default: dict[str, Any] | None = None,
) -> Schema:
    s: Schema = {"type": "object", "description": description, "properties": properties}
    return _with(s, rules, {"required": required, "default": default})


def array(
    description: str,
    items: Schema,
    *,
    max_items: int,
    min_items: int | None = None,
    default: list[Any] | None = None,
    rules: list[Schema] | None = None,
    list_type: str | None = None,
) -> Schema:
    s: Schema = {"type": "array", "description": description, "items": items, "maxItems": max_items}
    return _with(s, rules, {"minItems": min_items, "default": default, "x-kubernetes-list-type": list_type})


def string_map(description: str, *, max_properties: int = 64, value_length: int = 1024) -> Schema:
    return {
        "type": "object",
        "description": description,
        "maxProperties": max_properties,
        "additionalProperties": {"type": "string", "maxLength": value_length},
    }


def number_map(description: str) -> Schema:
    return {
        "type": "object",
        "description": description,
        "maxProperties": 64,
        "additionalProperties": {"type": "number"},
    }


def free_form(description: str) -> Schema:
    """An embedded Kubernetes structure passed through as is (the API server validates it on the child)."""
    return {"type": "object", "description": description, "x-kubernetes-preserve-unknown-fields": True}


def exactly_one(*fields: str) -> str:
    """CEL: exactly one of the optional fields is set."""
    return "[" + ", ".join(f"has(self.{f})" for f in fields) + "].exists_one(x, x)"
