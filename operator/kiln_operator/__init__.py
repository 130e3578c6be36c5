"""Kiln's operator. ``kopf run -m kiln_operator.startup`` (or ``kiln-operator``) registers and runs the handlers;
importing any other module of the package registers nothing."""

__version__ = "0.1.0"
