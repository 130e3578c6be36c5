"""The GPU check: every CUDA path of Kiln exercised in one run of a few minutes (docs/gpu-check.md).

``hack/gpu-check.sh [--dry-run] OUTDIR`` runs ``python -m gpu_check``, which runs each stage in a process of its
own with a time limit and writes ``OUTDIR/gpu-check.json`` and ``OUTDIR/gpu-check.md``.

Modules: ``common`` (sizes, folders, results, child processes), ``data`` (data sets and the small text model made
here, offline), ``launch`` (a Kiln program run as ``python -m`` runs it, plus peak memory), one module per stage
(``trainer``, ``distributed``, ``compressor``, ``server``) and ``report`` (the JSON and the Markdown table).
"""
