"""``python -m gpu_check [--dry-run] [--only STAGES] [--keep-work] OUTDIR`` (what ``hack/gpu-check.sh`` runs).

The orchestrator: probes the environment, then runs each stage (trainer, distributed, compressor, server) as a
process of its own with a time limit, streams its progress lines, and rewrites ``OUTDIR/gpu-check.json`` and
``OUTDIR/gpu-check.md`` after every stage, so even a run cut short leaves its results. A stage that fails, crashes
or runs out of time is recorded and the next one runs; the whole run is bounded by a total limit (8 minutes on a
GPU machine, under 3 on the CPU for the dry run). Exit code: 0 when no stage failed, 1 otherwise, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import report
from .common import DRY, FULL, ORT_GPU_WHEEL_MIB, REPO, STAGES, TRAVEL_LIMIT_MIB, Sizes, context_from

# What each program imports (modules): a missing one is named in the environment, and the stages that
# need it record "skipped: <package> missing" instead of failing on an ImportError.
NEEDS = {
    "kiln_artifacts": ["fsspec", "numpy"],
    "kiln_trainer": ["torch", "numpy", "safetensors", "transformers", "tokenizers"],
    "kiln_compressor": ["torch", "transformers", "onnx", "onnxscript", "onnxruntime", "safetensors", "numpy"],
    "kiln_server": ["onnxruntime", "numpy", "aiohttp", "prometheus_client", "tokenizers", "grpc", "google.protobuf"],
}
TITLES = {
    "trainer": "Trainer on CUDA",
    "distributed": "Two processes on one GPU",
    "compressor": "Compressor: export, fp16, parity",
    "server": "Server: execution provider, readiness, latency",
}


def log(message: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="hack/gpu-check.sh", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("outdir", type=Path)
    p.add_argument("--dry-run", action="store_true", help="the same stages on the CPU with tiny sizes")
    p.add_argument("--only", help=f"comma-separated stages to run (default: all of {','.join(STAGES)})")
    p.add_argument("--keep-work", action="store_true", help="keep the work folder (models, checkpoints, artifacts)")
    p.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # internal: the environment probe
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--limit", type=float, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    out = a.outdir.resolve()
    if a.probe:
        return probe(a.work)
    if a.stage:
        return stage_worker(a.stage, out, a.work, a.dry_run, a.limit)
    stages = [s.strip() for s in (a.only or ",".join(STAGES)).split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        p.error(f"--only: unknown stage(s) {', '.join(unknown)} (stages: {', '.join(STAGES)})")
    return orchestrate(out, stages, a.dry_run, a.keep_work)


# ------------------------------------------------------------------------------------------------- orchestrator


def orchestrate(out: Path, stages: list[str], dry_run: bool, keep_work: bool) -> int:
    sizes: Sizes = DRY if dry_run else FULL
    started, started_at = time.monotonic(), datetime.now(UTC).isoformat(timespec="seconds")
    deadline = started + sizes.total
    out.mkdir(parents=True, exist_ok=True)
    for old in ("stages", "logs"):
        shutil.rmtree(out / old, ignore_errors=True)
    (out / "logs").mkdir()
    given = os.environ.get("KILN_GPU_CHECK_WORK")  # a folder of the caller's: kept, never deleted
    work = Path(given) if given else Path(tempfile.mkdtemp(prefix="kiln-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    keep_work = keep_work or bool(given)
    mode = "dry run (CPU, tiny sizes)" if dry_run else "full"
    log(f"{mode}: results in {out}, work folder {work}, at most {sizes.total} s")
    env = dict(os.environ)
    # Offline (a GPU machine has no network), and without the libraries' progress bars in the progress lines.
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TRANSFORMERS_VERBOSITY="error",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, wherever the dry run runs
    wheels, wheel = travelled_wheels(out, work, env)
    doc: dict[str, Any] = {
        "version": 1,
        "mode": "dry-run" if dry_run else "full",
        "startedAt": started_at,
        "limitSeconds": sizes.total,
        "stageLimits": dict(sizes.limits),
        "environment": {},
        "stages": [],
    }
    try:
        limit = min(sizes.limits["probe"], deadline - time.monotonic())
        code, _ = child(
            [sys.executable, "-m", "gpu_check", "--probe", "--work", str(work), str(out)],
            env,
            limit,
            out / "logs" / "probe.log",
            "probe",
        )
        environment = _read(work / "environment.json")
        if code != 0 or not environment:
            environment["probeError"] = f"the probe exited {code} (logs/probe.log)"
        environment["ortGpuWheel"] = wheel
        environment["wheels"] = wheels
        (work / "environment.json").write_text(json.dumps(environment, indent=2) + "\n")
        doc["environment"] = environment
        _summarise(environment)
        report.write(out, doc)
        for name in stages:
            doc["stages"].append(run_stage(name, out, work, env, dry_run, sizes, deadline))
            doc["seconds"] = round(time.monotonic() - started, 1)
            doc["result"] = _result(doc)
            report.write(out, doc)
    finally:
        doc["seconds"] = round(time.monotonic() - started, 1)
        doc["result"] = _result(doc)
        report.write(out, doc)
        if keep_work:
            log(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    log(f"done in {doc['seconds']} s: {doc['result']}; {out / 'gpu-check.md'}")
    for s in doc["stages"]:
        log(f"  {s['name']:12} {s['status']:8} {s['seconds']:7.1f} s")
    return 0 if doc["result"] == "passed" else 1


def _result(doc: dict[str, Any]) -> str:
    states = [s["status"] for s in doc["stages"]]
    if any(s in ("failed", "timeout", "error") for s in states):
        return "failed"
    return "passed" if "passed" in states else "nothing passed"


def _read(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _summarise(env: dict[str, Any]) -> None:
    t, o = env.get("torch") or {}, env.get("onnxruntime") or {}
    log(
        f"python {env.get('python')}, torch {t.get('version')}, CUDA available: {t.get('cuda')} {t.get('device') or ''}"
    )
    log(f"onnxruntime {o.get('version')}: {', '.join(o.get('providers') or [])}")
    missing = {k: v for k, v in (env.get("missing") or {}).items() if v}
    if missing:
        log(f"missing packages: {missing}")


def child(cmd: list[str], env: dict[str, str], limit: float, log_path: Path, prefix: str) -> tuple[int | None, float]:
    """Run a stage (or the probe) in a session of its own, streaming its lines; at the limit, kill its whole group
    (the stage and every program it started). Returns (exit code or None when killed, seconds)."""
    started = time.monotonic()
    p = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=REPO,
        start_new_session=True,
        text=True,
        errors="replace",
        bufsize=1,
    )

    def pump() -> None:
        assert p.stdout is not None
        with log_path.open("a") as f:
            for line in p.stdout:
                f.write(line)
                f.flush()
                log(f"{prefix}: {line.rstrip()}" if not line.startswith(prefix) else line.rstrip())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    code: int | None
    try:
        code = p.wait(timeout=max(1.0, limit))
    except subprocess.TimeoutExpired:
        code = None
    except BaseException:  # Ctrl-C: take the stage's processes down with the run
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        raise
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)  # what the stage left running, or the stage itself at its limit
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=10)
        reader.join(timeout=5)
    return code, round(time.monotonic() - started, 1)


def run_stage(
    name: str, out: Path, work: Path, env: dict[str, str], dry_run: bool, sizes: Sizes, deadline: float
) -> dict[str, Any]:
    limit = min(sizes.limits[name], deadline - time.monotonic() - 2)
    base = {"name": name, "title": TITLES[name], "limitSeconds": round(limit, 1), "checks": [], "notes": []}
    if limit < 10:
        log(f"stage {name}: not run, the run's total limit of {sizes.total} s is spent")
        return {**base, "status": "timeout", "seconds": 0, "error": "not run: the run's total time limit is spent"}
    log(f"stage {name}: {TITLES[name]} (limit {limit:.0f} s)")
    cmd = [sys.executable, "-m", "gpu_check", "--stage", name, "--work", str(work), "--limit", str(limit), str(out)]
    if dry_run:
        cmd.insert(3, "--dry-run")
    # The stage keeps its own deadline (each program it starts gets what is left); the hard kill comes a little later.
    code, seconds = child(cmd, env, limit + 10, out / "logs" / f"stage-{name}.log", name)
    result = {**base, **_read(out / "stages" / f"{name}.json")}
    result["limitSeconds"], result["seconds"] = round(limit, 1), seconds
    if code is None:
        result["status"] = "timeout"
        result["error"] = f"killed at its time limit ({limit:.0f} s); the checks it finished are kept"
    elif code != 0 or result.get("status") in (None, "running"):
        result["status"] = "error"
        tail = (out / "logs" / f"stage-{name}.log").read_text(errors="replace")[-1500:]
        result["error"] = f"the stage exited {code} (logs/stage-{name}.log): {tail}"
    log(f"stage {name}: {result['status']} in {seconds} s")
    return result


def stage_worker(name: str, out: Path, work: Path, dry_run: bool, limit: float) -> int:
    ctx = context_from(out, work, dry_run, limit)
    module = importlib.import_module(f"gpu_check.{name}")
    try:
        stage = module.run_stage(ctx)
    except Exception:
        traceback.print_exc()
        return 1
    stage.save()
    return 0


# ------------------------------------------------------------------------------------------ environment probe


def probe(work: Path) -> int:
    """What this machine has: Python, torch and CUDA, ONNX Runtime's providers, the packages the programs import."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "pythonpath": os.environ.get("PYTHONPATH", ""),
    }
    versions: dict[str, str | None] = {}
    for dist in sorted({d for ds in NEEDS.values() for d in ds}):
        name = {"grpc": "grpcio", "google.protobuf": "protobuf"}.get(dist, dist)
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    for extra in ("onnxruntime-gpu", "pyyaml", "huggingface-hub", "sympy"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[extra] = importlib.metadata.version(extra)
    info["packages"] = versions

    def importable(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            return False

    info["missing"] = {prog: [d for d in ds if not importable(d)] for prog, ds in NEEDS.items()}
    info["torch"] = _probe_torch()
    info["onnxruntime"] = _probe_ort()
    # Each program's top module imported here: a stage tells a package this machine lacks (or has in a version the
    # program cannot use) from a bug in the program.
    imports: dict[str, Any] = {}
    for module in ("kiln_trainer.loop", "kiln_compressor.pipeline", "kiln_server.app"):
        try:
            importlib.import_module(module)
            imports[module] = "ok"
        except Exception as e:
            missing = e.name if isinstance(e, ModuleNotFoundError) else None
            imports[module] = {"error": f"{type(e).__name__}: {e}"[:500], "missing": missing}
    info["imports"] = imports
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            q = "--query-gpu=name,driver_version,memory.total,compute_cap"
            r = subprocess.run(["nvidia-smi", q, "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
            info["nvidiaSmi"] = r.stdout.strip() or r.stderr.strip()
    (work / "environment.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps({k: info[k] for k in ("python", "torch", "onnxruntime")}), flush=True)
    return 0


def _probe_torch() -> dict[str, Any]:
    try:
        import torch
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    t: dict[str, Any] = {"version": torch.__version__, "cudaVersion": torch.version.cuda, "cuda": False}
    try:
        t["cuda"] = bool(torch.cuda.is_available())
        if t["cuda"]:
            props = torch.cuda.get_device_properties(0)
            t.update(
                device=torch.cuda.get_device_name(0),
                devices=torch.cuda.device_count(),
                capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                memoryBytes=int(props.total_memory),
                bf16=bool(torch.cuda.is_bf16_supported()),
            )
        with contextlib.suppress(Exception):
            t["ncclVersion"] = ".".join(map(str, torch.cuda.nccl.version()))
        t["distributed"] = {
            "nccl": bool(torch.distributed.is_nccl_available()),
            "gloo": bool(torch.distributed.is_gloo_available()),
        }
    except Exception as e:
        t["error"] = f"{type(e).__name__}: {e}"
    return t


def _probe_ort() -> dict[str, Any]:
    try:
        import onnxruntime as ort
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}", "providers": []}
    return {"version": ort.__version__, "providers": list(ort.get_available_providers()), "file": ort.__file__}


# ------------------------------------------------------------------------------------------ travelled wheels


def _unpack(wheel: Path, site: Path, env: dict[str, str]) -> dict[str, Any]:
    """A wheel unpacked into ``site``, which goes first on the stages' PYTHONPATH: a wheel is a zip of what pip
    would install (its package folders and metadata), so this is the install without pip or network."""
    try:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
    except (OSError, zipfile.BadZipFile) as e:
        return {"file": str(wheel), "error": f"cannot unpack: {e}"}
    if str(site) not in env.get("PYTHONPATH", "").split(os.pathsep):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH", "")) if p)
    mib = round(wheel.stat().st_size / 2**20, 1)
    log(f"wheel {wheel.name} ({mib} MiB) unpacked onto PYTHONPATH")
    return {"file": str(wheel), "wheelMiB": mib}


def travelled_wheels(out: Path, work: Path, env: dict[str, str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Packages this machine lacks that travelled with the checkout as wheels (``$KILN_GPU_CHECK_WHEELS``, else
    ``wheels/`` beside OUTDIR or ``shared/wheels/`` in the checkout; e.g. grpcio, which the server imports), and an
    onnxruntime-gpu wheel (``$KILN_ORT_GPU_WHEEL``, else ``onnxruntime_gpu-*.whl`` in OUTDIR's parent, the checkout or
    ``shared/``) ahead of the CPU build. Returns (the wheels, the onnxruntime-gpu record: the wheel, or why there is
    none and what that means)."""
    site = work / "site"
    given = env.get("KILN_GPU_CHECK_WHEELS")
    folders = [Path(given)] if given else [out.parent / "wheels", REPO / "shared" / "wheels"]
    ort_given = env.get("KILN_ORT_GPU_WHEEL")
    candidates = [Path(ort_given)] if ort_given else []
    for folder in (out.parent, REPO, REPO / "shared", *folders):
        candidates += sorted(folder.glob("onnxruntime_gpu-*.whl"))
    ort = next((c for c in candidates if c.is_file()), None)
    others = sorted({w for f in folders for w in f.glob("*.whl")} - {ort})
    wheels = [_unpack(w, site, env) for w in others]
    note = (
        f"onnxruntime-gpu is {ORT_GPU_WHEEL_MIB} MiB as a wheel, more than the {TRAVEL_LIMIT_MIB} MiB that may travel "
        "with the checkout; the ONNX Runtime CUDA path needs the real server image (or KILN_ORT_GPU_WHEEL)"
    )
    if ort is None:
        if ort_given:
            note = f"KILN_ORT_GPU_WHEEL={ort_given}: not a file. " + note
        return wheels, {"found": None, "wheelMiB": ORT_GPU_WHEEL_MIB, "note": note}
    record = _unpack(ort, site, env)
    if "error" in record:
        return wheels, {"found": str(ort), "error": record["error"], "note": note}
    # CUDA and cuDNN from the nvidia-* wheels torch brings: the server does not preload them as the compressor does.
    libs = _nvidia_lib_dirs()
    if libs:
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    return wheels, {
        "found": str(ort),
        "wheelMiB": record["wheelMiB"],
        "unpackedTo": str(site),
        "nvidiaLibDirs": len(libs),
    }


def _nvidia_lib_dirs() -> list[str]:
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs: list[str] = []
    for root in spec.submodule_search_locations:
        dirs += sorted(str(d) for d in Path(root).glob("*/lib") if d.is_dir())
    return dirs


if __name__ == "__main__":
    sys.exit(main())
