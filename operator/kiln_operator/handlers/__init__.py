"""One module per custom resource; importing this package registers their kopf handlers."""

from kiln_operator.handlers import modelcompression, modeldeployment, trainingjob

__all__ = ["modelcompression", "modeldeployment", "trainingjob"]
