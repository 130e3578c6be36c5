"""Stage 4, the server (``python -m kiln_server``, REST on loopback) on the compressor stage's ONNX artifacts.

With the CUDA execution provider in the importable onnxruntime: ``--provider cuda`` must become ready on CUDA and
answer like ONNX Runtime run directly; its p50 at batch 1 and 32 is measured beside a ``--provider cpu`` server of
the same artifact. Without it (the CPU onnxruntime, the dry run): ``--provider auto`` must fall back to the CPU and
say so (the active providers in the model metadata and the load line of its log), answer correctly, and its p50
is measured; and ``--provider cuda`` must stay live but never ready, giving the reason.
"""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import time
from typing import Any

from .common import (
    PIP_NAMES,
    Check,
    Context,
    Skip,
    Stage,
    free_port,
    http_json,
    package_missing,
    percentile,
    python_cmd,
    spawn,
    stop,
)

TITLE = "Server: the CUDA execution provider or the CPU fallback, readiness, a request, p50 at batch 1 and 32"
NEEDS = ("grpc", "google.protobuf", "aiohttp", "prometheus_client", "onnxruntime", "numpy", "tokenizers")


def run_stage(ctx: Context) -> Stage:
    stage = Stage(ctx, "server", TITLE)
    reason, error = _unavailable(ctx)
    artifacts: dict[str, str] = {}
    for kind in ("image", "text"):
        with stage.check(f"{kind}: the ONNX artifact") as c:
            if reason:
                raise Skip(reason)
            if not c.expect(not error, f"kiln_server cannot be imported: {error}"):
                continue
            artifacts[kind] = onnx_artifact(ctx, kind, c)
    for kind, uri in artifacts.items():
        if ctx.ort_cuda:
            with stage.check(f"{kind}: --provider cuda, ready on CUDA, a request, p50 against --provider cpu") as c:
                _cuda_against_cpu(ctx, c, kind, uri)
        else:
            with stage.check(f"{kind}: --provider auto falls back to the CPU and says so; a request; p50") as c:
                _auto_fallback(ctx, c, kind, uri)
    if not ctx.ort_cuda and "image" in artifacts:
        with stage.check("image: --provider cuda without the CUDA provider: live, never ready, the reason given") as c:
            _cuda_refused(ctx, c, artifacts["image"])
    return stage


def _unavailable(ctx: Context) -> tuple[str, str]:
    """(why the server cannot run on this machine, or ""; an import error that is the server's own, or "")."""
    missing = package_missing(*NEEDS)
    if missing:
        reason = f"{PIP_NAMES.get(missing, missing)} missing"
        return reason + (
            " (kiln_server imports it at start, even with --grpc-port off)" if missing == "grpc" else ""
        ), ""
    imported = (ctx.environment.get("imports") or {}).get("kiln_server.app", "ok")
    if imported == "ok":
        return "", ""
    name, error = imported.get("missing") or "", imported.get("error", "")
    if name and not name.startswith("kiln"):
        top = name.split(".")[0]
        return f"{PIP_NAMES.get(top, top)} missing (kiln_server imports it at start)", ""
    if "VersionError" in error or "protobuf" in error.lower():  # the generated gRPC module and this protobuf
        return f"protobuf here does not fit kiln_server's generated module: {error[:300]}", ""
    return "", error


def onnx_artifact(ctx: Context, kind: str, c: Check) -> str:
    """The compressor stage's fp32 artifact, or one made here with the compressor when that stage made none."""
    folder = ctx.work / "onnx" / f"{kind}-fp32"
    if (folder / "kiln-manifest.json").is_file():
        c.figures.update(artifact="the compressor stage's fp32 export", uri=f"file://{folder}")
        return f"file://{folder}"
    from .compressor import _compress, trained_model

    model, dataset = trained_model(ctx, kind, c)
    ran, message, _ = _compress(ctx, f"{kind}-fp32", model, dataset, [{"export": {}}], gpu=False)
    if ran.code != 0:
        raise RuntimeError(
            f"the compressor could not export the {kind} model (exit {ran.code}): {message.get('message')}"
        )
    c.figures.update(artifact="exported here (the compressor stage published none)", uri=f"file://{folder}")
    return f"file://{folder}"


# ------------------------------------------------------------------------------------------------ server process


class Server:
    """A kiln_server process on loopback (REST only), stopped with SIGTERM as the kubelet does."""

    def __init__(self, ctx: Context, uri: str, provider: str, name: str) -> None:
        self.ctx, self.name, self.provider = ctx, name, provider
        self.port, metrics = free_port(), free_port()
        self.log_name = f"server-{name}-{provider}"
        cmd = python_cmd(
            "kiln_server",
            "--model-uri", uri, "--model-name", name, "--provider", provider,
            "--host", "127.0.0.1", "--port", str(self.port), "--metrics-port", str(metrics), "--grpc-port", "off",
            "--max-batch-size", "32", "--intra-op-threads", str(ctx.sizes.threads), "--warmup-rounds", "1",
            "--shutdown-delay-s", "0", "--grace-period-s", "5", "--log-level", "info",
            "--termination-log", str(ctx.work / f"{self.log_name}.termination"),
        )  # fmt: skip
        self.proc: subprocess.Popen[bytes] = spawn(ctx, cmd, self.log_name)

    @property
    def log(self) -> str:
        try:
            return (self.ctx.logs / f"{self.log_name}.log").read_text(errors="replace")
        except OSError:
            return ""

    def wait(self, cap: float = 90) -> tuple[bool, str]:
        """(ready, reason): until ready, a reason other than loading, the process gone, or the time limit."""
        deadline = time.monotonic() + self.ctx.child_timeout(cap)
        reason = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False, f"exited {self.proc.returncode}: {self.log[-500:]}"
            try:
                status, body = http_json(self.port, "GET", "/v2/health/ready", timeout=5)
            except OSError:
                time.sleep(0.1)
                continue
            if status == 200:
                return True, ""
            reason = body.get("reason", str(body)) if isinstance(body, dict) else str(body)
            if reason not in ("loading", "starting"):
                return False, reason
            time.sleep(0.1)
        return False, f"not ready within the time limit ({reason})"

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        return stop(self.proc)


# ------------------------------------------------------------------------------------------------------ requests


def _inputs(ctx: Context, kind: str, uri: str, n: int) -> tuple[dict[str, Any], Any]:
    """(request body of ``n`` samples, ONNX Runtime's logits for them on the CPU, run directly on the artifact)."""
    import numpy as np
    import onnxruntime as ort

    import kiln_artifacts as ka

    art = ka.load(uri)
    spec = json.loads(art.path("kiln-model.json").read_text())
    so = ort.SessionOptions()
    so.intra_op_num_threads = ctx.sizes.threads
    sess = ort.InferenceSession(str(art.path("model.onnx")), so, providers=["CPUExecutionProvider"])
    if kind == "image":
        c, h, w = spec["imageShape"]
        rng = np.random.default_rng(0)
        pixels = (rng.integers(0, 256, (n, c, h, w)).astype(np.float32) / np.float32(127.5) - 1).astype(np.float32)
        body = {"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": list(pixels.shape),
                            "data": pixels.ravel().tolist()}]}  # fmt: skip
        return body, sess.run(["logits"], {"pixel_values": pixels})[0]
    from tokenizers import Tokenizer

    from .data import SENTENCES

    texts = [SENTENCES[i % len(SENTENCES)] for i in range(n)]
    tok = Tokenizer.from_file(str(art.path("tokenizer.json")))
    tok.no_padding()
    tok.enable_truncation(int(spec.get("maxSequenceLength") or 512))
    names = [i.name for i in sess.get_inputs()]
    rows = []
    for text in texts:  # each sentence alone: no padding, the reference for the server's padded batches
        enc = tok.encode(text)
        feed = {
            "input_ids": np.asarray([enc.ids], dtype=np.int64),
            "attention_mask": np.asarray([enc.attention_mask], dtype=np.int64),
            "token_type_ids": np.asarray([enc.type_ids], dtype=np.int64),
        }
        rows.append(sess.run(["logits"], {k: feed[k] for k in names})[0][0])
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [n], "data": texts}]}, np.stack(rows)


def _infer(server: Server, body: dict[str, Any]) -> Any:
    import numpy as np

    status, answer = http_json(server.port, "POST", f"/v2/models/{server.name}/infer", body, timeout=60)
    if status != 200:
        raise RuntimeError(f"infer: HTTP {status}: {str(answer)[:300]}")
    out = next(o for o in answer["outputs"] if o["name"] == "logits")
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def _p50(ctx: Context, server: Server, body: dict[str, Any], n: int) -> tuple[float, float]:
    """(p50, p95) in ms of ``n`` sequential requests on one kept-alive connection, after 3 untimed ones."""
    payload = json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    times = []
    try:
        for i in range(n + 3):
            if ctx.remaining() < 5:
                break
            t = time.perf_counter()
            conn.request(
                "POST", f"/v2/models/{server.name}/infer", body=payload, headers={"Content-Type": "application/json"}
            )
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                raise RuntimeError(f"infer: HTTP {r.status}")
            if i >= 3:
                times.append((time.perf_counter() - t) * 1000)
    finally:
        conn.close()
    return round(percentile(times, 50), 3), round(percentile(times, 95), 3)


def _serve_and_measure(ctx: Context, c: Check, kind: str, uri: str, provider: str, prefix: str) -> Server | None:
    """Start a server, wait for it, check one request against ONNX Runtime run directly, measure p50 at batch 1
    and 32; figures are named with ``prefix`` (``cpu``: cpuP50MsBatch1). Returns the running server (the caller
    stops it)."""
    import numpy as np

    def key(name: str) -> str:
        return prefix + name[0].upper() + name[1:] if prefix else name

    server = Server(ctx, uri, provider, kind)
    ready, reason = server.wait()
    c.figures[key("ready")] = ready
    if not c.expect(ready, f"--provider {provider}: ready ({reason})"):
        server.stop()
        return None
    _, meta = http_json(server.port, "GET", f"/v2/models/{kind}")
    providers = ((meta or {}).get("parameters") or {}).get("execution_providers") if isinstance(meta, dict) else None
    c.figures[key("providers")] = providers
    loaded = next((line.split(" loaded ", 1)[1][:300] for line in server.log.splitlines() if " loaded " in line), None)
    c.figures[key("logSaid")] = f"loaded {loaded}" if loaded else None
    body, reference = _inputs(ctx, kind, uri, 4)
    got = _infer(server, body)
    diff = float(np.max(np.abs(got - reference)))
    c.figures[key("maxAbsDiff")] = diff
    c.figures[key("agreement")] = float(np.mean(got.argmax(-1) == reference.argmax(-1)))
    for b in (1, 32):
        p50, p95 = _p50(ctx, server, _inputs(ctx, kind, uri, b)[0], ctx.sizes.requests)
        c.figures[key(f"p50MsBatch{b}")], c.figures[key(f"p95MsBatch{b}")] = p50, p95
    return server


def _auto_fallback(ctx: Context, c: Check, kind: str, uri: str) -> None:
    server = _serve_and_measure(ctx, c, kind, uri, "auto", "")
    if server is None:
        return
    try:
        c.figures["requests"] = ctx.sizes.requests
        c.expect(c.figures.get("providers") == ["CPUExecutionProvider"], "the metadata lists only the CPU provider")
        said = c.figures.get("logSaid") or ""
        c.expect("CPUExecutionProvider" in said, "the load line of its log names the CPU provider")
        c.expect(
            c.figures["maxAbsDiff"] <= 1e-4,
            f"logits equal ONNX Runtime run directly (|d| {c.figures['maxAbsDiff']:.3g})",
        )
        on = said[said.rfind(" on [") + 1 :] if " on [" in said else said
        c.detail = f"it said: metadata execution_providers {c.figures.get('providers')}, log 'loaded ... {on}'"
    finally:
        code = server.stop()
        c.figures["exitCodeAfterSigterm"] = code
        c.expect(code == 0, f"exit 0 after SIGTERM, got {code}")


def _cuda_against_cpu(ctx: Context, c: Check, kind: str, uri: str) -> None:
    cuda = _serve_and_measure(ctx, c, kind, uri, "cuda", "")
    if cuda is None:
        return
    try:
        c.figures["requests"] = ctx.sizes.requests
        c.expect("CUDAExecutionProvider" in (c.figures.get("providers") or []), "the CUDA provider is active")
        # TF32 and other kernels on the GPU: not bit-equal to the CPU, but the same answers.
        c.expect(c.figures["agreement"] == 1.0, "the same top-1 answers as ONNX Runtime on the CPU")
        c.expect(
            c.figures["maxAbsDiff"] <= 5e-2, f"logits within 5e-2 of the CPU's (|d| {c.figures['maxAbsDiff']:.3g})"
        )
    finally:
        code = cuda.stop()
        c.expect(code == 0, f"exit 0 after SIGTERM, got {code}")
    cpu = _serve_and_measure(ctx, c, kind, uri, "cpu", "cpu")
    if cpu is not None:
        cpu.stop()


def _cuda_refused(ctx: Context, c: Check, uri: str) -> None:
    server = Server(ctx, uri, "cuda", "image")
    try:
        ready, reason = server.wait()
        status, _ = http_json(server.port, "GET", "/v2/health/live") if server.proc.poll() is None else (None, None)
        c.figures.update(live=status == 200, ready=ready, reason=reason)
        c.expect(status == 200, "live")
        c.expect(not ready, "never ready")
        c.expect("CUDAExecutionProvider" in reason, "the not-ready reason names the CUDA provider")
    finally:
        code = server.stop()
        c.figures["exitCodeAfterSigterm"] = code
