"""Run a Kiln program exactly as ``python -m <program>`` does, and record what the check measures around it.

    python -m gpu_check.launch [--peak-file F] [--backend gloo] [--no-tf32] kiln_trainer ARGS...

- ``--peak-file``: at exit, write the process's peak CUDA memory (``torch.cuda.max_memory_allocated``) and peak
  resident set, which the program itself does not report.
- ``--backend gloo``: ``torch.distributed.init_process_group`` gets gloo whatever the program asks for, so that two
  ranks can share one GPU (NCCL refuses that) while the rest of the trainer's distributed path runs unchanged: DDP
  on CUDA tensors, the all-reduced stop flag, the gathered RNG states, the barriers.
- ``--no-tf32``: TF32 convolutions and matmuls off, for runs whose weights are compared with a tolerance meant for
  summation order alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import runpy
import sys
from pathlib import Path
from typing import Any


def _force_backend(backend: str) -> None:
    import torch.distributed as dist

    original = dist.init_process_group

    def init_process_group(requested: Any = None, *args: Any, **kwargs: Any) -> Any:
        print(f"gpu-check launch: process group backend {requested!r} replaced by {backend!r}", flush=True)
        kwargs.pop("device_id", None)  # binds an NCCL communicator to a device; gloo takes none
        kwargs.pop("backend", None)
        return original(backend, *args, **kwargs)

    dist.init_process_group = init_process_group  # type: ignore[assignment]


def _peak(path: Path) -> None:
    peak: dict[str, Any] = {"maxRssBytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["maxMemoryAllocatedBytes"] = int(torch.cuda.max_memory_allocated())
        peak["maxMemoryReservedBytes"] = int(torch.cuda.max_memory_reserved())
    path.write_text(json.dumps(peak) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m gpu_check.launch", description=__doc__, allow_abbrev=False)
    p.add_argument("--peak-file", type=Path)
    p.add_argument("--backend", choices=["gloo"])
    p.add_argument("--no-tf32", action="store_true")
    p.add_argument("module")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the program's own arguments, passed unchanged")
    args = p.parse_args()
    rest = args.args
    if args.backend:
        _force_backend(args.backend)
    if args.no_tf32:
        import torch

        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    sys.argv = [args.module, *rest]
    code: Any = 0
    try:
        runpy.run_module(args.module, run_name="__main__", alter_sys=True)
    except SystemExit as e:  # the program's own sys.exit(main())
        code = e.code
    finally:
        if args.peak_file:
            _peak(args.peak_file)
    return code if isinstance(code, int) else (0 if code is None else 1)


if __name__ == "__main__":
    sys.exit(main())
