"""What every stage of the GPU check shares: the sizes of a run, its folders and deadline, how a check records its
result, and how Kiln's programs are run as child processes (each with a time limit, its log kept)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SOURCE_ROOTS = ("operator", "images/trainer", "images/compressor", "images/server")
STAGES = ("trainer", "distributed", "compressor", "server")
PRECISIONS = ("fp32", "bf16", "fp16")
# onnxruntime-gpu 1.31.1 (cp312, manylinux x86_64), the server image's build: what would have to travel with the
# checkout for the ONNX Runtime CUDA path on a machine that has only the CPU onnxruntime.
ORT_GPU_WHEEL_MIB = 244
TRAVEL_LIMIT_MIB = 64


@dataclass(frozen=True)
class Sizes:
    """How big each part of a run is. The dry run keeps the same code paths with sizes a 2-core CPU finishes in
    about a minute and a half; the full run sizes the work so that throughput figures are not start-up noise."""

    threads: int  # OMP/torch/ONNX Runtime threads of every child: concurrent processes must not oversubscribe
    image_side: int  # 28 like Fashion-MNIST; the dry run's 12 keeps KilnCNN's pooling off a divisor (dynamo export)
    image_train: int
    image_test: int
    image_batch: int
    image_steps: int
    image_lr: float
    text_train: int
    text_test: int
    text_batch: int
    text_steps: int
    text_seq: int
    text_lr: float
    bert: tuple[int, int, int, int]  # hidden size, layers, heads, intermediate size of the locally built encoder
    resume_steps: int
    resume_every: int
    sigterm_after: int  # the step after which the preempted run gets its SIGTERM
    dist_batch: int  # per rank
    dist_steps: int
    eval_samples: int
    bench_iterations: int
    requests: int  # per batch size and server, for p50
    limits: Mapping[str, int]  # seconds, per stage (and the environment probe)
    total: int  # seconds for the whole run; each stage's limit is cut to what is left of it


FULL = Sizes(
    threads=4,
    image_side=28,
    image_train=20000,
    image_test=2000,
    image_batch=256,
    image_steps=400,
    image_lr=2e-3,
    text_train=8000,
    text_test=1000,
    text_batch=64,
    text_steps=200,
    text_seq=64,
    text_lr=5e-4,
    bert=(384, 6, 12, 1536),  # all-MiniLM-L6-v2's shape
    resume_steps=400,
    resume_every=100,
    sigterm_after=150,
    dist_batch=128,
    dist_steps=200,
    eval_samples=512,
    bench_iterations=50,
    requests=100,
    limits={"probe": 40, "trainer": 160, "distributed": 90, "compressor": 110, "server": 70},
    total=460,  # 8 minutes less the grace a stage gets past its limit before it is killed
)
DRY = Sizes(
    threads=1,
    image_side=12,
    image_train=640,
    image_test=128,
    image_batch=16,
    image_steps=40,
    image_lr=3e-3,
    text_train=320,
    text_test=64,
    text_batch=16,
    text_steps=40,
    text_seq=16,
    text_lr=5e-3,  # a 2-layer encoder from random weights learns the set in 40 steps at this rate
    bert=(32, 2, 2, 64),
    resume_steps=240,  # room after the signal step: a busy machine must not let the run end before it is signalled
    resume_every=60,
    sigterm_after=40,
    dist_batch=8,
    dist_steps=20,
    eval_samples=64,
    bench_iterations=10,
    requests=20,
    limits={"probe": 30, "trainer": 110, "distributed": 60, "compressor": 80, "server": 50},
    total=170,
)


class Skip(Exception):
    """This check cannot run here (no CUDA, a package missing); recorded as ``skipped: <reason>``."""


class OutOfTime(Exception):
    """The stage's time limit leaves no room for the next child process."""


@dataclass
class Context:
    """One stage's view of the run: where to write, how big, until when, and what the environment probe found."""

    out: Path
    work: Path
    dry_run: bool
    sizes: Sizes
    deadline: float  # time.monotonic() by which the stage must be done
    environment: dict[str, Any]

    @property
    def cuda(self) -> bool:
        return bool(self.environment.get("torch", {}).get("cuda")) and not self.dry_run

    @property
    def ort_cuda(self) -> bool:
        """Whether the importable onnxruntime has the CUDA execution provider (the onnxruntime-gpu build)."""
        return "CUDAExecutionProvider" in self.environment.get("onnxruntime", {}).get("providers", []) and self.cuda

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def child_timeout(self, cap: float) -> float:
        """A child's time limit: ``cap``, or less when the stage's limit is nearer (a margin kept for the report)."""
        left = self.remaining() - 3
        if left < 5:
            raise OutOfTime(f"not run: {max(0, int(self.remaining()))} s left of the stage's time limit")
        return min(cap, left)

    def child_env(self, **extra: str) -> dict[str, str]:
        """The environment of a Kiln program run by the check: offline, its threads bounded, no inherited
        distributed or Kiln settings; the dry run hides any GPU so that it runs on the CPU wherever it runs."""
        env = dict(os.environ)
        for name in list(env):
            if name.startswith(("KILN_SERVER_", "KILN_MODEL_", "PET_")) or name in (
                "RANK",
                "WORLD_SIZE",
                "LOCAL_RANK",
                "MASTER_ADDR",
                "MASTER_PORT",
                "KILN_TRAINING_SPEC",
                "KILN_COMPRESSION_SPEC",
                "KILN_OUTPUT_URI",
                "KILN_TERMINATION_LOG",
                "KILN_PROGRESS_FILE",
            ):
                del env[name]
        threads = str(self.sizes.threads)
        env.update(
            OMP_NUM_THREADS=threads,
            MKL_NUM_THREADS=threads,
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            TRANSFORMERS_VERBOSITY="error",
            PYTHONUNBUFFERED="1",
            TMPDIR=str(self.work / "tmp"),  # the compressor's step cache and temporary folders stay in the work folder
        )
        if self.dry_run:
            env["CUDA_VISIBLE_DEVICES"] = ""
        env.update(extra)
        return env


def context_from(out: Path, work: Path, dry_run: bool, limit: float) -> Context:
    environment: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        environment = json.loads((work / "environment.json").read_text())
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    return Context(out, work, dry_run, DRY if dry_run else FULL, time.monotonic() + limit, environment)


# ------------------------------------------------------------------------------------------------------ results


@dataclass
class Check:
    """One verified claim: its status (passed, failed, skipped, noted), why, and the figures measured for it."""

    name: str
    status: str = "passed"
    detail: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def expect(self, condition: bool, what: str) -> bool:
        """Record a criterion; the check fails, listing every unmet one, at the end of its block."""
        if not condition:
            self.failures.append(what)
        return bool(condition)

    def note(self, detail: str) -> None:
        """Ran, and what happened is recorded without a verdict (NCCL refusing two ranks on one device)."""
        self.status, self.detail = "noted", detail


class Stage:
    """A stage's checks, saved after each one: a stage killed at its time limit still reports what it finished."""

    def __init__(self, ctx: Context, name: str, title: str) -> None:
        self.ctx, self.name, self.title = ctx, name, title
        self.checks: list[Check] = []
        self.notes: list[str] = []
        self.started = time.monotonic()
        self.path = ctx.out / "stages" / f"{name}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.save()

    @contextlib.contextmanager
    def check(self, name: str) -> Iterator[Check]:
        c = Check(name)
        progress(f"{self.name}: {name} ...")
        try:
            yield c
        except Skip as e:
            c.status, c.detail = "skipped", str(e)
        except OutOfTime as e:
            c.status, c.detail = "failed", str(e)
        except Exception as e:
            c.status, c.detail = "failed", f"{type(e).__name__}: {e}"[:2000]
            c.figures.setdefault("traceback", traceback.format_exc()[-2000:])
        else:
            if c.failures:
                c.status = "failed"
                c.detail = "; ".join(c.failures) + (f" ({c.detail})" if c.detail else "")
        self.checks.append(c)
        self.save()
        progress(f"{self.name}: {name}: {c.status.upper()}" + (f" - {c.detail}" if c.detail else ""))
        if c.figures:
            progress(f"{self.name}:   {short_figures(c.figures)}")

    def status(self) -> str:
        """passed: nothing failed and something passed; skipped: nothing could run here; else failed."""
        states = {c.status for c in self.checks}
        if "failed" in states:
            return "failed"
        if "passed" in states:
            return "passed"
        return "skipped" if states <= {"skipped"} and states else "noted" if states else "failed"

    def save(self) -> None:
        body = {
            "name": self.name,
            "title": self.title,
            "status": self.status() if self.checks else "running",
            "seconds": round(time.monotonic() - self.started, 2),
            "checks": [{k: v for k, v in asdict(c).items() if k != "failures"} for c in self.checks],
            "notes": self.notes,
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


def progress(message: str) -> None:
    """A progress line (the orchestrator prefixes and timestamps it)."""
    print(message, flush=True)


def short_figures(figures: Mapping[str, Any], limit: int = 400) -> str:
    parts = []
    for k, v in figures.items():
        if k == "traceback" or isinstance(v, dict | list):
            continue
        parts.append(f"{k}={fmt(v)}")
    text = ", ".join(parts)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v).lower()
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e6:
            return f"{v:.4g}"
        return f"{v:.3g}"
    return str(v)


# ------------------------------------------------------------------------------------------------ child processes


@dataclass
class Ran:
    """A finished child: its exit code (None when it was killed at its time limit), time and log."""

    code: int | None
    seconds: float
    log: Path

    @property
    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, chars: int = 1500) -> str:
        return self.text[-chars:]


def python_cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def spawn(ctx: Context, cmd: Sequence[str], name: str, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a child whose output goes to ``logs/<name>.log`` (in the stage's process group, so that a stage killed at
    its limit takes its children with it)."""
    log = (ctx.logs / f"{name}.log").open("wb")
    try:
        return subprocess.Popen(
            list(cmd),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else ctx.child_env(),
            cwd=ctx.work,
        )
    finally:
        log.close()


def run(ctx: Context, cmd: Sequence[str], name: str, *, cap: float, env: Mapping[str, str] | None = None) -> Ran:
    """Run a child to its end, at most ``cap`` seconds (less when the stage's limit is nearer)."""
    timeout = ctx.child_timeout(cap)
    started = time.monotonic()
    p = spawn(ctx, cmd, name, env)
    try:
        code: int | None = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        code = None
    ran = Ran(code, round(time.monotonic() - started, 2), ctx.logs / f"{name}.log")
    outcome = f"exit {code}" if code is not None else f"killed at its limit of {timeout:.0f} s"
    progress(f"    {name}: {outcome} after {ran.seconds:.1f} s (logs/{name}.log)")
    return ran


def stop(p: subprocess.Popen[bytes], timeout: float = 20) -> int | None:
    """Kill a child that is still running (used on every way out of a check that started one)."""
    if p.poll() is None:
        p.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        return p.wait(timeout=timeout)
    return None


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_json(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    *,
    timeout: float = 30,
    conn: http.client.HTTPConnection | None = None,
) -> tuple[int, Any]:
    """One request to a server on loopback (http.client: no proxy settings apply); the body parsed as JSON."""
    own = conn is None
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        c.request(method, path, body=data, headers=headers)
        r = c.getresponse()
        raw = r.read()
        try:
            return r.status, json.loads(raw)
        except ValueError:
            return r.status, raw.decode(errors="replace")
    finally:
        if own:
            c.close()


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def package_missing(*modules: str) -> str | None:
    """The first of ``modules`` that cannot be found, without importing any (their imports may be heavy)."""
    import importlib.util

    for m in modules:
        try:
            if importlib.util.find_spec(m) is None:
                return m
        except (ImportError, ValueError):
            return m
    return None


def require(*modules: str) -> None:
    missing = package_missing(*modules)
    if missing:
        raise Skip(f"{PIP_NAMES.get(missing, missing)} missing")


PIP_NAMES = {"grpc": "grpcio", "google": "protobuf", "google.protobuf": "protobuf", "yaml": "pyyaml"}
