"""Kiln's operator. `kopf run -m kiln_operator` (or the `kiln-operator` script) loads every handler below."""

from kiln_operator import handlers, settings

__all__ = ["handlers", "settings"]
__version__ = "0.1.0"
