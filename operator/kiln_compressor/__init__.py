"""kiln_compressor: the program a ModelCompression's Job runs (images/compressor, README there).

Modules: ``config`` (spec/flags -> validated Config, no torch), ``report`` (exit codes, termination message),
``models`` (sources and data), ``torch_steps`` (prune, distill), ``onnx_steps`` (export, optimize, quantize,
float16), ``measure`` (evaluation, benchmark, placement), ``pipeline`` (recipes, step cache, gates, publish,
``main``).
"""

from .report import ExitCode

__all__ = ["ExitCode"]
