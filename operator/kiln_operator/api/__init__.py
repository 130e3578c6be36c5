"""Kiln's API (group kiln.dev, version v1alpha1), written once here; crds/ is generated from it."""
