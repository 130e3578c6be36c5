"""kiln_compressor: the program a ModelCompression's Job runs (images/compressor; docs/compressor.md).

Modules: ``config`` (spec/flags -> validated Config, no torch), ``report`` (what the termination message drops
first), ``models`` (sources and data), ``torch_steps`` (prune, distill), ``onnx_steps`` (export, optimize,
quantize, float16), ``measure`` (evaluation, benchmark, placement), ``pipeline`` (recipes, step cache, gates,
publish, ``main``). Exit codes, failure classes and the termination message are every workload's:
kiln_artifacts.contract.
"""
