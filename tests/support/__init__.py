"""Helpers the tests share, one module per subject; importable as `support` (pyproject puts tests/ on the path).

cluster: the local control plane and the operator under KopfRunner; waiting: waiting on a condition with a
deadline; net: loopback ports; server, compressor, trainer, artifacts, prometheus: building, running and reading
the workloads and the tools the tests check them with. Fixtures stay in the conftest.py files and call these."""
