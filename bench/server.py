"""Kiln's inference server against the raw ONNX Runtime limit, MLServer and KServe's Python model server, in one run.

    .venv/bin/python -m bench.server                    # everything (creates bench/.venv-mlserver, -kserve if missing)
    .venv/bin/python -m bench.server --peers none       # raw ORT + Kiln only
    .venv/bin/python -m bench.server --peer-layout single  # peers in one worker of 2 threads (not like for like)
    .venv/bin/python -m bench.server --monitoring       # Kiln with monitoring off vs on (+ payload log at 10 %)
    .venv/bin/python -m bench.server --arenas 2         # that "on" server: glibc's default arenas vs MALLOC_ARENA_MAX=2

Run from the repository root: the model is made with the tests' own helpers (tests/support/server.py).

Model: the packaged MiniLM (all-MiniLM-L6-v2, 22.7 M parameters) with a 2-class head, exported to ONNX (fp32) as
a kiln artifact. Every server receives raw text (one sentence per request, OIP JSON
``BYTES``), tokenizes it with the same ``tokenizers`` tokenizer, pads per batch and runs the same ONNX file in an
ONNX Runtime session built with the same options (intra-op threads, inter-op 1, spinning off, all graph
optimisations). Peers: MLServer 1.7.1 with a custom ``MLModel`` wrapping that session (MLServer has no ONNX Runtime
runtime of its own any more), adaptive batching on with the same max batch size and a 10 ms max_batch_time (its
batcher sends batches off without waiting for the running one, so it needs a window; Kiln's greedy batcher takes
what queued while the previous batch ran, with no added delay); KServe 0.21.0 ``kserve.Model`` subclass with that
session (KServe's Python server has no batcher: batching is its Go agent's job). ``--peer-layout single``:
each peer runs one worker (MLServer ``parallel_workers`` 1: inference in one worker process; KServe ``workers`` 1)
with one session of ``--threads`` threads; ``--peer-layout matched`` (default): Kiln's layout,
``--kiln-instances`` workers
(MLServer ``parallel_workers``, batches dispatched round robin; KServe ``--workers``, uvicorn processes sharing the
listening socket, connections spread by the kernel) each with a session of ``--threads / --kiln-instances``
threads; the peers' model code counts what each worker process served (printed). Kiln runs ``--kiln-instances``
(2) batches at a time on one session of ``--threads / --kiln-instances`` threads, the same number of ORT threads in
all as each peer; the raw
limit is measured both ways (one caller on a ``--threads`` session, and that many concurrent callers on a session
of Kiln's threads per instance) and the higher counts. The load generator is one separate process for all servers:
asyncio, one HTTP/1.1 keep-alive connection per client, closed loop, the same request bodies.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
PEER_VENVS = {
    # uvloop 0.22+ breaks MLServer 1.7.1's parallel workers (get_event_loop() raises in a fresh process): pin 0.21
    "mlserver": (REPO / "bench/.venv-mlserver", ["mlserver==1.7.1", "uvloop==0.21.0"]),
    "kserve": (REPO / "bench/.venv-kserve", ["kserve==0.21.0"]),
}
COMMON_PEER_DEPS = ["onnxruntime==1.31.1", "tokenizers>=0.22", "numpy>=2"]
SENTENCES = [
    "The film was a delight from start to finish.",
    "Terrible service, I will never come back to this place again.",
    "An average product: it works, but the battery life is disappointing.",
    "I loved the soundtrack and the acting, though the plot dragged in the middle.",
    "Shipping took three weeks and the box arrived crushed.",
    "Best purchase of the year, my whole family uses it every day.",
    "The hotel room was clean, quiet and the staff were friendly and helpful at all hours.",
    "Not worth the money.",
    "A thoughtful, moving story about friendship, loss and growing up in a small town.",
    "The update broke everything and support never answered my emails.",
    "Great value for the price, would recommend to anyone looking for a budget option.",
    "The sequel is louder, longer and much less fun than the original.",
    "Fresh ingredients, generous portions, and the dessert alone is worth the trip.",
    "It stopped working after two days.",
    "The lecture was clear and well organised, with excellent examples throughout.",
    "Confusing instructions, missing screws, and a wobbly table at the end of it all.",
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# --------------------------------------------------------------------------------------------- the ORT session
SESSION_CODE = textwrap.dedent(
    """
    import json, os, time, numpy as np, onnxruntime as ort
    from tokenizers import Tokenizer

    def make_session(model_path, threads):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        return ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])

    def make_tokenizer(path, max_len):
        tok = Tokenizer.from_file(path)
        tok.no_padding()
        tok.enable_truncation(max_len)
        return tok

    _served = {"calls": 0, "samples": 0, "written": 0.0}

    def served(n):
        # Per-process counts under $KILN_BENCH_SERVED/<pid>.json (written at most every 0.5 s): which workers serve.
        d = os.environ.get("KILN_BENCH_SERVED")
        if not d:
            return
        _served["calls"] += 1
        _served["samples"] += n
        now = time.monotonic()
        if now - _served["written"] > 0.5:
            _served["written"] = now
            with open(f"{d}/{os.getpid()}.json", "w") as f:
                json.dump({"calls": _served["calls"], "samples": _served["samples"]}, f)

    def feeds(tok, texts):
        enc = tok.encode_batch(texts)
        width = max(len(e.ids) for e in enc)
        ids = np.zeros((len(enc), width), np.int64)
        mask = np.zeros((len(enc), width), np.int64)
        for i, e in enumerate(enc):
            ids[i, : len(e.ids)] = e.ids
            mask[i, : len(e.ids)] = e.attention_mask
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    """
)


RAW_CODE = textwrap.dedent(
    """
    import json, random, sys, time
    sys.path.insert(0, sys.argv[1])
    from kiln_bench_session import make_session, make_tokenizer, feeds
    import threading
    model, tokenizer, threads, seconds = sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
    sentences, sizes, callers = json.loads(sys.argv[6]), json.loads(sys.argv[7]), int(sys.argv[8])
    sess = make_session(model, threads)
    tok = make_tokenizer(tokenizer, 128)
    rng = random.Random(0)
    out = {}
    for batch in sizes:
        batches = [feeds(tok, [rng.choice(sentences) for _ in range(batch)]) for _ in range(16)]
        sess.run(["logits"], batches[0])
        counts = [0] * callers
        started = time.perf_counter()

        def loop(i):  # `callers` threads run the one session at the same time (ORT releases the GIL)
            n = i
            while time.perf_counter() - started < seconds:
                sess.run(["logits"], batches[n % len(batches)])
                n += 1
                counts[i] += 1

        pool = [threading.Thread(target=loop, args=(i,)) for i in range(callers)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        out[batch] = sum(counts) * batch / (time.perf_counter() - started)
    print(json.dumps(out))
    """
)

MLSERVER_RUNTIME = textwrap.dedent(
    """
    import numpy as np
    from mlserver import MLModel
    from mlserver.codecs import StringCodec, NumpyCodec
    from mlserver.types import InferenceRequest, InferenceResponse
    from kiln_bench_session import make_session, make_tokenizer, feeds, served

    class OrtTextModel(MLModel):
        async def load(self) -> bool:
            p = self.settings.parameters.extra
            self.sess = make_session(p["model"], int(p["threads"]))
            self.tok = make_tokenizer(p["tokenizer"], int(p["max_len"]))
            return True

        async def predict(self, payload: InferenceRequest) -> InferenceResponse:
            texts = StringCodec.decode_input(payload.inputs[0])
            logits = self.sess.run(["logits"], feeds(self.tok, texts))[0]
            served(len(texts))
            return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("logits", logits)])
    """
)

KSERVE_SERVER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import kserve
    from kserve import InferOutput, InferRequest, InferResponse
    from kiln_bench_session import make_session, make_tokenizer, feeds, served

    class OrtTextModel(kserve.Model):
        def __init__(self, name, model, tokenizer, threads, max_len):
            super().__init__(name)
            self.spec = (model, tokenizer, threads, max_len)
            self._open()
            self.ready = True

        def _open(self):
            model, tokenizer, threads, max_len = self.spec
            self.sess = make_session(model, threads)
            self.tok = make_tokenizer(tokenizer, max_len)

        # With workers > 1 KServe spawns its REST worker processes and pickles the model into each: each worker
        # opens its own session (an InferenceSession cannot be pickled).
        def __getstate__(self):
            return {k: v for k, v in self.__dict__.items() if k not in ("sess", "tok")}

        def __setstate__(self, state):
            self.__dict__.update(state)
            self._open()

        def predict(self, payload: InferRequest, headers=None) -> InferResponse:
            texts = [t if isinstance(t, str) else t.decode() for t in payload.inputs[0].data]
            logits = self.sess.run(["logits"], feeds(self.tok, texts))[0]
            served(len(texts))
            out = InferOutput(name="logits", shape=list(logits.shape), datatype="FP32")
            out.set_data_from_numpy(logits, binary_data=False)
            return InferResponse(model_name=self.name, infer_outputs=[out], response_id=payload.id or "")

    if __name__ == "__main__":
        name, model, tokenizer, threads, max_len, http_port, grpc_port, workers = sys.argv[1:9]
        m = OrtTextModel(name, model, tokenizer, int(threads), int(max_len))
        kserve.ModelServer(
            http_port=int(http_port), grpc_port=int(grpc_port), workers=int(workers), enable_grpc=False,
            enable_latency_logging=False,
        ).start([m])
    """
)


# ------------------------------------------------------------------------------------------------ load generator
LOADGEN = textwrap.dedent(
    """
    import asyncio, json, random, sys, time

    async def read_response(reader):
        head = await reader.readuntil(b"\\r\\n\\r\\n")
        lines = head.decode("latin-1").split("\\r\\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await reader.readuntil(b"\\r\\n")).strip(), 16)
                parts.append(await reader.readexactly(size + 2))
                if size == 0:
                    break
            body = b"".join(parts)
        else:
            body = b""
        return status, headers.get("connection", "").lower() == "close", body

    def requests(host, port, path, sentences):
        out = []
        for s in sentences:
            body = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [s]}]}).encode()
            head = (f"POST {path} HTTP/1.1\\r\\nHost: {host}:{port}\\r\\nContent-Type: application/json\\r\\n"
                    f"Content-Length: {len(body)}\\r\\n\\r\\n").encode()
            out.append(head + body)
        return out

    async def closed_loop(host, port, path, sentences, clients, warmup, seconds):
        reqs = requests(host, port, path, sentences)
        lat, errors, stop = [], 0, False
        t_start = time.perf_counter() + warmup
        t_end = t_start + seconds

        async def client(i):
            nonlocal errors
            rng = random.Random(i)
            reader, writer = await asyncio.open_connection(host, port)
            while True:
                t0 = time.perf_counter()
                if t0 >= t_end:
                    break
                writer.write(reqs[rng.randrange(len(reqs))])
                status, close, _ = await read_response(reader)
                t1 = time.perf_counter()
                if t_start <= t1 <= t_end:
                    if status == 200:
                        lat.append(t1 - t0)
                    else:
                        errors += 1
                if close:
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
            writer.close()

        await asyncio.gather(*(client(i) for i in range(clients)))
        return lat, errors, seconds

    async def open_loop(host, port, path, sentences, rate, warmup, seconds, arrivals):
        reqs = requests(host, port, path, sentences)
        lat, errors = [], 0
        idle = []
        rng = random.Random(0)
        t_start = time.perf_counter() + warmup
        t_end = t_start + seconds
        tasks = set()

        async def one(t_sched):
            nonlocal errors
            conn = idle.pop() if idle else await asyncio.open_connection(host, port)
            reader, writer = conn
            writer.write(reqs[rng.randrange(len(reqs))])
            status, close, _ = await read_response(reader)
            t1 = time.perf_counter()
            if t_sched >= t_start:
                if status == 200:
                    lat.append(t1 - t_sched)  # from the scheduled arrival: no coordinated omission
                else:
                    errors += 1
            if close:
                writer.close()
            else:
                idle.append(conn)

        t = time.perf_counter()
        while t < t_end:
            t += rng.expovariate(rate) if arrivals == "poisson" else 1.0 / rate
            delay = t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.ensure_future(one(t))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
        return lat, errors, seconds

    async def grpc_closed_loop(host, port, bodies, clients, warmup, seconds):
        # One channel (HTTP/2 connection) per client, as one keep-alive connection per client over REST.
        import grpc
        lat, errors = [], 0
        t_start = time.perf_counter() + warmup
        t_end = t_start + seconds

        async def client(i):
            nonlocal errors
            rng = random.Random(i)
            async with grpc.aio.insecure_channel(f"{host}:{port}") as channel:
                infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out
                while True:
                    t0 = time.perf_counter()
                    if t0 >= t_end:
                        break
                    try:
                        await infer(bodies[rng.randrange(len(bodies))])
                        ok = True
                    except grpc.aio.AioRpcError:
                        ok = False
                    t1 = time.perf_counter()
                    if t_start <= t1 <= t_end:
                        if ok:
                            lat.append(t1 - t0)
                        else:
                            errors += 1

        await asyncio.gather(*(client(i) for i in range(clients)))
        return lat, errors, seconds

    def main():
        cfg = json.loads(sys.argv[1])
        if cfg.get("grpc"):
            bodies = [bytes.fromhex(b) for b in cfg["grpc"]]
            lat, errors, secs = asyncio.run(grpc_closed_loop(cfg["host"], cfg["port"], bodies, cfg["clients"],
                                                             cfg["warmup"], cfg["seconds"]))
        elif cfg["mode"] == "closed":
            lat, errors, secs = asyncio.run(closed_loop(cfg["host"], cfg["port"], cfg["path"], cfg["sentences"],
                                                        cfg["clients"], cfg["warmup"], cfg["seconds"]))
        else:
            lat, errors, secs = asyncio.run(open_loop(cfg["host"], cfg["port"], cfg["path"], cfg["sentences"],
                                                      cfg["rate"], cfg["warmup"], cfg["seconds"], cfg["arrivals"]))
        lat.sort()
        def q(p):
            return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")
        print(json.dumps({"rps": len(lat) / secs, "p50": q(0.5), "p95": q(0.95), "p99": q(0.99),
                          "n": len(lat), "errors": errors, "seconds": secs,
                          "latencies_ms": [round(x * 1000, 2) for x in lat]}))

    main()
    """
)


def run_load(workdir: Path, port: int, path: str, **cfg: Any) -> dict[str, Any]:
    spec = {"host": "127.0.0.1", "port": port, "path": path, "sentences": SENTENCES, **cfg}
    p = subprocess.run([PY, str(workdir / "loadgen.py"), json.dumps(spec)], capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"load generator failed: {p.stderr[-2000:]}")
    return json.loads(p.stdout)


def grpc_bodies(model: str) -> list[str]:
    """One serialized ModelInferRequest per sentence (text as BYTES, typed contents), hex for the load spec."""
    from kiln_server.proto import open_inference_pb2 as pb

    out = []
    for s in SENTENCES:
        msg = pb.ModelInferRequest(model_name=model)
        msg.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(s.encode())
        out.append(msg.SerializeToString().hex())
    return out


def merge(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Several short runs of one server at one level as one: requests over seconds, quantiles over all latencies."""
    lat = sorted(x for r in runs for x in r["latencies_ms"])

    def q(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")

    seconds = sum(r["seconds"] for r in runs)
    errors = sum(r["errors"] for r in runs)
    return {"rps": len(lat) / seconds, "p50": q(0.5), "p95": q(0.95), "p99": q(0.99), "errors": errors}


# ----------------------------------------------------------------------------------------------------- servers
def http_ok(url: str, timeout: float = 2) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def wait_ready(proc: subprocess.Popen[bytes], url: str, logfile: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not http_ok(url):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {logfile.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not ready after {timeout}s: {logfile.read_text()[-3000:]}")
        time.sleep(0.2)  # poll interval while a server starts


def check_answer(port: int, path: str) -> list[float]:
    body = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [SENTENCES[0]]}]})
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", body.encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        doc = json.loads(r.read())
    return [round(float(x), 4) for x in doc["outputs"][0]["data"]]


def ensure_venv(name: str) -> Path:
    venv, pkgs = PEER_VENVS[name]
    py = venv / "bin/python"
    pins = [p.split("==") for p in pkgs + COMMON_PEER_DEPS if "==" in p]
    probe = f"import importlib.metadata as m, tokenizers; assert all(m.version(n) == v for n, v in {pins!r})"
    if py.exists() and subprocess.run([str(py), "-c", probe], capture_output=True).returncode == 0:
        return py
    log(f"creating {venv} ({', '.join(pkgs + COMMON_PEER_DEPS)}); this takes a few minutes once")
    subprocess.run([sys.base_prefix + "/bin/python3", "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin/pip"), "install", "-q", *pkgs, *COMMON_PEER_DEPS], check=True)
    return py


class Server:
    def __init__(
        self, name: str, cmd: list[str], port: int, path: str, ready: str, env: dict[str, str], cwd: Path
    ) -> None:
        self.name, self.cmd, self.port, self.path, self.ready_url = name, cmd, port, path, ready
        self.env, self.cwd = env, cwd
        self.logfile = cwd / f"{name}.log"
        self.served_dir = cwd / f"served-{name}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.grpc_port: int | None = None
        self.metrics_port: int | None = None

    def processes(self) -> list[tuple[int, str, float]]:
        """(pid, command, CPU seconds so far) of every process in the server's session (its workers included)."""
        assert self.proc is not None
        tick = os.sysconf("SC_CLK_TCK")
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, pgrp, session, ...
            if int(fields[3]) == self.proc.pid:
                out.append((int(d.name), cmd[-60:], (int(fields[11]) + int(fields[12])) / tick))
        return sorted(out)

    def served(self) -> dict[int, dict[str, int]]:
        """Requests and samples per worker process, as the peers' model code counted them (KILN_BENCH_SERVED)."""
        return {int(f.stem): json.loads(f.read_text()) for f in sorted(self.served_dir.glob("*.json"))}

    def __enter__(self) -> Server:
        self.served_dir.mkdir(parents=True, exist_ok=True)
        self.env = {**self.env, "KILN_BENCH_SERVED": str(self.served_dir)}
        with open(self.logfile, "wb") as out:
            self.proc = subprocess.Popen(
                self.cmd, env=self.env, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_ready(self.proc, self.ready_url, self.logfile)
        return self

    def __exit__(self, *_exc: object) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def kiln_threads(args: argparse.Namespace) -> int:
    """Kiln's ORT threads per instance: the peers' thread budget (``--threads``) split over its instances."""
    return max(1, args.threads // args.kiln_instances)


def peer_layout(args: argparse.Namespace) -> tuple[int, int]:
    """(worker processes, ORT threads per worker's session) of each peer."""
    if args.peer_layout == "matched":
        return args.kiln_instances, kiln_threads(args)
    return 1, args.threads


def kiln_server(
    work: Path,
    uri: str,
    args: argparse.Namespace,
    name: str = "kiln",
    extra: tuple[str, ...] = (),
    env_extra: dict[str, str] | None = None,
) -> Server:
    port, gport, mport = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **(env_extra or {}),
    }
    cmd = [PY, "-m", "kiln_server", "--model-uri", uri, "--model-name", "minilm", "--host", "127.0.0.1",
           "--port", str(port), "--grpc-port", str(gport), "--metrics-port", str(mport),
           "--intra-op-threads", str(kiln_threads(args)),
           "--instances", str(args.kiln_instances), "--max-batch-size", str(args.max_batch),
           "--max-queue-delay-ms", str(args.max_delay_ms), "--max-queue-size", "1024", "--shutdown-delay-s", "0",
           "--log-level", "warning", *extra]  # fmt: skip
    server = Server(name, cmd, port, "/v2/models/minilm/infer", f"http://127.0.0.1:{port}/v2/health/ready", env, work)
    server.grpc_port = gport
    server.metrics_port = mport
    return server


def mlserver_server(work: Path, py: Path, model: Path, tok: Path, args: argparse.Namespace) -> Server:
    port, gport, mport = free_port(), free_port(), free_port()
    repo = work / "mlserver-repo"
    (repo / "minilm").mkdir(parents=True, exist_ok=True)
    (repo / "ort_runtime.py").write_text(MLSERVER_RUNTIME)
    workers, threads = peer_layout(args)
    # parallel_workers: inference in that many worker processes (each loads the model: one session each); the main
    # process (HTTP, adaptive batcher) dispatches batches to them round robin (mlserver/parallel/dispatcher.py).
    settings = {"http_port": port, "grpc_port": gport, "metrics_port": mport, "host": "127.0.0.1",
                "parallel_workers": workers}  # fmt: skip
    (repo / "settings.json").write_text(json.dumps(settings))
    (repo / "minilm" / "model-settings.json").write_text(
        json.dumps(
            {
                "name": "minilm",
                "implementation": "ort_runtime.OrtTextModel",
                "max_batch_size": args.max_batch,
                "max_batch_time": args.mlserver_batch_time_ms / 1000,
                "parameters": {
                    "extra": {"model": str(model), "tokenizer": str(tok), "threads": threads, "max_len": 128}
                },
            }
        )
    )
    env = {**os.environ, "PYTHONPATH": f"{repo}:{work}", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(py.parent / "mlserver"), "start", str(repo)]
    return Server(
        "mlserver", cmd, port, "/v2/models/minilm/infer", f"http://127.0.0.1:{port}/v2/models/minilm/ready", env, work
    )


def kserve_server(work: Path, py: Path, model: Path, tok: Path, args: argparse.Namespace) -> Server:
    port, gport = free_port(), free_port()
    (work / "kserve_server.py").write_text(KSERVE_SERVER)
    env = {**os.environ, "PYTHONPATH": str(work), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # workers > 1: KServe spawns that many uvicorn processes on one shared listening socket; the kernel hands each
    # new connection to whichever accepts first (per connection, not per request: the load's connections persist).
    workers, threads = peer_layout(args)
    cmd = [str(py), str(work / "kserve_server.py"), "minilm", str(model), str(tok), str(threads), "128",
           str(port), str(gport), str(workers)]  # fmt: skip
    return Server(
        "kserve", cmd, port, "/v2/models/minilm/infer", f"http://127.0.0.1:{port}/v2/models/minilm/ready", env, work
    )


# -------------------------------------------------------------------------------------------------------- main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", default="1,8,32,128", help="closed-loop clients per level")
    p.add_argument("--seconds", type=float, default=9.0, help="measured seconds per server and level")
    p.add_argument("--rounds", type=int, default=3, help="turns the measured seconds are split into (interleaved)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads, every server")
    p.add_argument(
        "--kiln-instances",
        type=int,
        default=2,
        help="Kiln's --instances; its ORT threads per instance are --threads divided by it, so that it uses as many "
        "ORT threads in all as each peer's one session (default 2: two batches of one thread each at a time)",
    )
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-delay-ms", type=float, default=0.0)
    p.add_argument(
        "--mlserver-batch-time-ms",
        type=float,
        default=10.0,
        help="MLServer's max_batch_time: its batcher does not wait for the running batch, so it needs a window to "
        "form batches at all (with 0 it runs nearly unbatched)",
    )
    p.add_argument("--peers", default="mlserver,kserve", help="comma list, or none")
    p.add_argument(
        "--grpc",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure Kiln over gRPC (the same server process; one channel per client)",
    )
    p.add_argument(
        "--peer-layout",
        choices=["single", "matched"],
        default="matched",
        help="matched (default, like for like): Kiln's CPU layout, --kiln-instances worker processes (MLServer "
        "parallel_workers, KServe --workers) each with a session of --threads / --kiln-instances threads; single: "
        "each peer runs one session of --threads threads in one worker",
    )
    p.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    p.add_argument(
        "--monitoring",
        action="store_true",
        help="instead of the comparison with peers: Kiln with --monitoring off against the same server with "
        "monitoring on and the payload log at 10 %%, side by side (throughput at saturation and the ratio, RSS "
        "after a short and a long run, detection delay of a shifted stream)",
    )
    p.add_argument("--monitoring-concurrency", default="32,128", help="--monitoring: closed-loop clients per level")
    p.add_argument(
        "--soak-seconds", type=float, default=120.0, help="--monitoring, --arenas: the long run, at saturation"
    )
    p.add_argument(
        "--arenas",
        type=int,
        default=None,
        metavar="N",
        help="instead of the comparison with peers: two servers with monitoring on and the payload log at 10 %%, "
        "one with glibc's default malloc arenas and one with MALLOC_ARENA_MAX=N, side by side at saturation for "
        "--soak-seconds (throughput, CPU per request, RSS)",
    )
    args = p.parse_args()
    if args.monitoring:
        return monitoring_main(args)
    if args.arenas is not None:
        return arenas_main(args)
    levels = [int(x) for x in args.concurrency.split(",")]
    peers = [] if args.peers == "none" else args.peers.split(",")
    started = time.monotonic()
    work = Path(args.work or tempfile.mkdtemp(prefix="kiln-bench-server-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "loadgen.py").write_text(LOADGEN)
    (work / "kiln_bench_session.py").write_text(SESSION_CODE)
    log(f"work folder {work}; load average {loadavg()}; {os.cpu_count()} CPUs")

    log("building the MiniLM ONNX artifact (tests/support/server.py)")
    from tests.support.server import text_artifact

    uri, _ = text_artifact(str(work / "artifacts"))
    art_dir = Path(uri.removeprefix("file://"))
    model, tok = art_dir / "model.onnx", art_dir / "tokenizer.json"
    pys = {name: ensure_venv(name) for name in peers}

    # Two raw limits: one caller on a session of --threads threads (what the peers run), and as many concurrent
    # callers as Kiln has instances on a session of Kiln's threads per instance (what Kiln runs). The raw limit of a
    # round is the higher one.
    layouts = {"1x" + str(args.threads): (args.threads, 1)}
    if args.kiln_instances > 1:
        layouts[f"{args.kiln_instances}x{kiln_threads(args)}"] = (kiln_threads(args), args.kiln_instances)

    def raw_ort(layout: str, sizes: list[int], seconds: float) -> dict[int, float]:
        threads, callers = layouts[layout]
        cmd = [PY, "-c", RAW_CODE, str(work), str(model), str(tok), str(threads), str(seconds),
               json.dumps(SENTENCES), json.dumps(sizes), str(callers)]  # fmt: skip
        out = subprocess.run(
            cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
        raw = {int(k): v for k, v in json.loads(out.stdout).items()}
        if len(sizes) > 1:
            log(f"raw ORT {layout} samples/s by batch: " + ", ".join(f"{b}: {v:.0f}" for b, v in raw.items()))
        return raw

    sweeps: dict[str, dict[int, float]] = {}
    for layout, (threads, callers) in layouts.items():
        log(f"raw ONNX Runtime loop (session.run on pre-tokenized batches, {callers} caller(s) x {threads} threads): "
            "batch size sweep")  # fmt: skip
        sweeps[layout] = raw_ort(layout, [1, 4, 8, 16, 32, 64], 2.0)
    best_batch = {layout: max(sw, key=lambda b: sw[b]) for layout, sw in sweeps.items()}
    raw_rounds: dict[int, float] = {}
    raw_rounds_by: dict[str, dict[int, float]] = {layout: {} for layout in layouts}

    servers: list[tuple[str, Any]] = [("kiln", lambda: kiln_server(work, uri, args))]
    if "mlserver" in peers:
        servers.append(("mlserver", lambda: mlserver_server(work, pys["mlserver"], model, tok, args)))
    if "kserve" in peers:
        servers.append(("kserve", lambda: kserve_server(work, pys["kserve"], model, tok, args)))

    results: dict[str, dict[int, dict[str, float]]] = {}
    half: dict[str, dict[str, float]] = {}
    answers: dict[str, list[float]] = {}
    work_split: dict[str, str] = {}
    served_split: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        # All servers up at once (idle ones cost nothing), then each concurrency level on each server back to back,
        # so the other work on this shared machine weighs on all of them alike.
        running: dict[str, Server] = {}
        for name, make in servers:
            log(f"starting {name}")
            running[name] = stack.enter_context(make())
            answers[name] = check_answer(running[name].port, running[name].path)
            results[name] = {}
        cpu_before = {name: {pid: cpu for pid, _, cpu in server.processes()} for name, server in running.items()}
        for c in levels:
            # Interleaved: the raw limit (at its best batch size) and every server, in short turns, several rounds,
            # so that the drifting load of this shared machine weighs on all of them alike.
            raws: dict[str, list[float]] = {layout: [] for layout in layouts}
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in [*running, *(["kiln-grpc"] * args.grpc)]}
            for _ in range(args.rounds):
                for layout in layouts:
                    b = best_batch[layout]
                    raws[layout].append(raw_ort(layout, [b], args.seconds / args.rounds / 2)[b])
                for name, server in running.items():
                    runs[name].append(run_load(work, server.port, server.path, mode="closed", clients=c, warmup=1.0,
                                               seconds=args.seconds / args.rounds))  # fmt: skip
                if args.grpc:
                    runs["kiln-grpc"].append(run_load(work, running["kiln"].grpc_port, "", mode="closed", clients=c,
                                                      warmup=1.0, seconds=args.seconds / args.rounds,
                                                      grpc=grpc_bodies("minilm")))  # fmt: skip
            for layout in layouts:
                raw_rounds_by[layout][c] = statistics.mean(raws[layout])
            raw_rounds[c] = max(raw_rounds_by[layout][c] for layout in layouts)
            for name in runs:
                r = results.setdefault(name, {})[c] = merge(runs[name])
                log(
                    f"{name:9s} clients {c:4d}: {r['rps']:7.1f} req/s  p50 {r['p50']:7.1f} ms  p95 {r['p95']:7.1f} ms"
                    f"  p99 {r['p99']:7.1f} ms  errors {int(r['errors'])}  (raw {raw_rounds[c]:.0f}/s; {loadavg()})"
                )
        # Which processes did the work: CPU seconds per process of each server over the closed-loop levels, and the
        # peers' own per-worker counts of the requests their model code served.
        for name, server in running.items():
            cpu = ", ".join(
                f"pid {pid}{' (main)' if pid == server.proc.pid else ''} {cpu - cpu_before[name].get(pid, 0.0):.0f} s"
                for pid, _, cpu in server.processes()
            )
            work_split[name] = cpu
            log(f"{name} CPU per process over the closed loops: {cpu}")
            if name != "kiln":
                counts = server.served()
                served_split[name] = ", ".join(
                    f"pid {pid}: {c['calls']} batches, {c['samples']} requests" for pid, c in counts.items()
                )
                log(f"{name} served per worker: {served_split[name]}")
        kiln = running["kiln"]
        sat = max(r["rps"] for r in results["kiln"].values())
        for arrivals in ("uniform", "poisson"):
            r = run_load(work, kiln.port, kiln.path, mode="open", rate=sat / 2, warmup=1.5,
                         seconds=args.seconds * 1.5, arrivals=arrivals)  # fmt: skip
            half[arrivals] = {**r, "rate": sat / 2}
            log(
                f"kiln      open loop, {arrivals} arrivals at {sat / 2:.0f} req/s (half of {sat:.0f}): "
                f"p50 {r['p50']:.1f} ms  p99 {r['p99']:.1f} ms  errors {int(r['errors'])}"
            )

    raw_limit = max([*(sweeps[layout][best_batch[layout]] for layout in layouts), *raw_rounds.values()])

    # ------------------------------------------------------------------------------------------------ summary
    print()
    print(f"## Server benchmark: MiniLM text classification (ONNX fp32, CPU, {args.threads} ORT threads)")
    total = time.monotonic() - started
    print(f"host: {os.cpu_count()} CPUs, load average at the end {loadavg()}; total run {total:.0f} s")
    print("first logits for the same sentence: " + ", ".join(f"{k} {v}" for k, v in answers.items()))
    print()
    for layout, (threads, callers) in layouts.items():
        swept = ", ".join(f"b{b} {v:.0f}" for b, v in sweeps[layout].items())
        rounds = ", ".join(f"{v:.0f}" for v in raw_rounds_by[layout].values())
        print(f"raw ONNX Runtime, {callers} caller(s) x {threads} threads (samples/s): sweep {swept}; best batch "
              f"{best_batch[layout]}, measured again at each level: {rounds}")  # fmt: skip
    print(f"raw ONNX Runtime limit: highest of all {raw_limit:.1f} samples/s")
    workers, threads = peer_layout(args)
    print(f"kiln: --instances {args.kiln_instances} --intra-op-threads {kiln_threads(args)}; peers (--peer-layout "
          f"{args.peer_layout}): {workers} worker process(es), each one session of {threads} thread(s)")  # fmt: skip
    for name, split in served_split.items():
        print(f"{name} served per worker (its model code's counts): {split}")
    print()
    print("| server | clients | req/s | p50 ms | p95 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|")
    for name in results:
        for c, r in results[name].items():
            cells = [name, c, f"{r['rps']:.1f}", f"{r['p50']:.1f}", f"{r['p95']:.1f}", f"{r['p99']:.1f}", r["errors"]]
            print("| " + " | ".join(str(x) for x in cells) + " |")
    print()
    kiln = results["kiln"]
    for c in levels:
        peers_here = [n for n in results if not n.startswith("kiln")]
        peer_best = max((results[n][c]["rps"] for n in peers_here), default=float("nan"))
        line = f"clients {c:4d}: kiln {kiln[c]['rps']:.1f} req/s"
        if "kiln-grpc" in results:
            line += f" (over gRPC {results['kiln-grpc'][c]['rps']:.1f})"
        if peers_here:
            line += f", best peer {peer_best:.1f} -> ratio {kiln[c]['rps'] / peer_best:.2f}x"
            line += " (target >= 1.5x)" if c >= 32 else ""
        print(line)
    sat = max(r["rps"] for r in kiln.values())
    c_sat = max(kiln, key=lambda c: kiln[c]["rps"])
    print(
        f"kiln at saturation: {sat:.1f} req/s ({c_sat} clients) = {100 * sat / raw_rounds[c_sat]:.1f} % of the raw ORT "
        f"limit measured in the same round ({raw_rounds[c_sat]:.1f}), {100 * sat / raw_limit:.1f} % of the highest "
        f"raw figure of the run (target >= 85 %)"
    )
    for arrivals, h in half.items():
        print(
            f"kiln at half saturation ({h['rate']:.0f} req/s, open loop, {arrivals} arrivals): p50 {h['p50']:.1f} ms, "
            f"p99 {h['p99']:.1f} ms, p99/p50 = {h['p99'] / h['p50']:.2f} (target <= 3), errors {int(h['errors'])}"
        )
    return 0


# ---------------------------------------------------------------------------------------------- monitoring
def rss_mib(server: Server) -> float:
    """Resident memory of the server's process, MiB."""
    assert server.proc is not None
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scrape(server: Server) -> dict[str, float]:
    """Every sample of the server's /metrics as ``name{label=value,...}`` -> value (labels sorted)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model")
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def drift(server: Server) -> tuple[float, dict[str, float]]:
    """(samples in the window, score by signal)."""
    m = scrape(server)
    scores = {k.split("signal=")[1].rstrip("}"): v for k, v in m.items() if k.startswith("kiln_server_drift_score")}
    return m["kiln_server_drift_window_samples{}"], scores


def infer_texts(server: Server, texts: list[str]) -> None:
    body = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]})
    req = urllib.request.Request(
        f"http://127.0.0.1:{server.port}{server.path}", body.encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        r.read()


def detection_delay(server: Server, stream: list[str], threshold: float, step: int) -> dict[str, int | None]:
    """Samples of `stream` sent (`step` per request, the window full of in-distribution traffic before) until
    each signal's score is over `threshold`; None for a signal that never crossed."""
    crossed: dict[str, int | None] = {}
    sent = 0
    for start in range(0, len(stream), step):
        infer_texts(server, stream[start : start + step])
        sent += len(stream[start : start + step])
        _, scores = drift(server)
        for name, score in scores.items():
            if score > threshold and crossed.get(name) is None:
                crossed[name] = sent
        if crossed and all(crossed.get(s) is not None for s in ("tokens", "prediction")):
            break
    return {s: crossed.get(s) for s in sorted(scores)}


def cpu_seconds(server: Server) -> float:
    """CPU seconds the server's processes have used so far."""
    return sum(cpu for _, _, cpu in server.processes())


def answered(server: Server) -> float:
    """Inference requests the server has answered so far (its own counter: warm-ups of the load included)."""
    return sum(v for k, v in scrape(server).items() if k.startswith("kiln_server_requests_total"))


def turn(work: Path, server: Server, clients: int, seconds: float, warmup: float) -> dict[str, Any]:
    """One closed-loop turn, with the CPU time the server spent and the requests it answered meanwhile."""
    cpu, done = cpu_seconds(server), answered(server)
    run = run_load(work, server.port, server.path, mode="closed", clients=clients, warmup=warmup, seconds=seconds)
    return {**run, "cpu": cpu_seconds(server) - cpu, "answered": answered(server) - done}


def cost(runs: list[dict[str, Any]]) -> float:
    """CPU milliseconds per request answered, over the runs."""
    return 1000 * sum(r["cpu"] for r in runs) / sum(r["answered"] for r in runs)


def arenas_main(args: argparse.Namespace) -> int:
    """A monitored server publishing its payload log (whose short-lived threads get malloc arenas of their own)
    with glibc's default arenas and with MALLOC_ARENA_MAX, in alternating turns at saturation, in one run."""
    from tests.support.server import text_artifact

    started = time.monotonic()
    clients = max(int(x) for x in args.monitoring_concurrency.split(","))
    work = Path(args.work or tempfile.mkdtemp(prefix="kiln-bench-arenas-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "loadgen.py").write_text(LOADGEN)
    log(f"work folder {work}; load average {loadavg()}; {os.cpu_count()} CPUs")
    uri, _ = text_artifact(str(work / "artifacts"))
    on = ("--monitoring", "on", "--payload-log-rate", "0.1", "--revision", "bench")
    limited = f"MALLOC_ARENA_MAX={args.arenas}"
    names = ("default", limited)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    rss: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    with contextlib.ExitStack() as stack:
        envs = ({}, {"MALLOC_ARENA_MAX": str(args.arenas)})
        servers = {}
        for i, (name, env) in enumerate(zip(names, envs, strict=True)):
            extra = (*on, "--payload-log-uri", f"file://{work}/payloads-{i}")
            servers[name] = stack.enter_context(kiln_server(work, uri, args, f"kiln-arenas-{i}", extra, env))
        for name, server in servers.items():
            rss[name].append((0.0, rss_mib(server)))
        chunk, t0 = 15.0, time.monotonic()
        for k in range(max(1, round(args.soak_seconds / chunk))):
            for name in names if k % 2 == 0 else names[::-1]:
                runs[name].append(turn(work, servers[name], clients, chunk, 1.0 if k == 0 else 0.0))
                rss[name].append((time.monotonic() - t0, rss_mib(servers[name])))
            log(f"{time.monotonic() - t0:5.0f} s: " + "; ".join(
                f"{n}: {runs[n][-1]['rps']:.1f} req/s, {rss[n][-1][1]:.1f} MiB" for n in names))  # fmt: skip
    print()
    print(f"## malloc arenas: a monitored server with the payload log at 10 %, {clients} clients, MiniLM, CPU")
    turns = len(runs[names[0]])
    print(f"host: {os.cpu_count()} CPUs, load average at the end {loadavg()}; total run "
          f"{time.monotonic() - started:.0f} s; {turns} alternating turns of {chunk:.0f} s each")  # fmt: skip
    print()
    print("| arenas | req/s | CPU ms/request | RSS MiB ready | RSS MiB at the end | growth MiB |")
    print("|---|---|---|---|---|---|")
    for name in names:
        rps = sum(r["rps"] for r in runs[name]) / len(runs[name])
        first, last = rss[name][0][1], rss[name][-1][1]
        print(f"| {name} | {rps:.1f} | {cost(runs[name]):.2f} | {first:.1f} | {last:.1f} | {last - first:+.1f} |")
    base, other = runs[names[0]], runs[names[1]]
    paired = statistics.median(b["rps"] / a["rps"] for a, b in zip(base, other, strict=True))
    print(f"throughput {limited}/default: {sum(r['rps'] for r in other) / sum(r['rps'] for r in base):.3f} as "
          f"measured (median of paired turns {paired:.3f}), {cost(base) / cost(other):.3f} from the CPU cost per "
          "request")  # fmt: skip
    for name in names:
        print(f"RSS during the run, {name} (s, MiB): " + ", ".join(f"{t:.0f} {m:.1f}" for t, m in rss[name]))
    return 0


def monitoring_main(args: argparse.Namespace) -> int:
    """The same Kiln server with monitoring off and on (+ the payload log at 10 %), in one run.

    On a machine shared with other work, throughput swings by tens of percent from one turn to the next, far more
    than the few percent to be measured; the turns alternate between the two servers so the swings weigh on both
    alike, and each turn also records the CPU time the server spent per request it answered: at saturation a
    CPU-bound server's throughput is its cores over that cost, so the ratio of the costs is the throughput ratio
    that an otherwise idle machine would show, and it hardly moves with the other work."""
    from tests.support.server import nonwords, reviews, text_artifact

    started = time.monotonic()
    levels = [int(x) for x in args.monitoring_concurrency.split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="kiln-bench-monitoring-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "loadgen.py").write_text(LOADGEN)
    log(f"work folder {work}; load average {loadavg()}; {os.cpu_count()} CPUs")
    log("building the MiniLM ONNX artifact with its reference profile (tests/support/server.py)")
    uri, _ = text_artifact(str(work / "artifacts"))
    payloads = work / "payloads"
    on_args = ("--monitoring", "on", "--payload-log-rate", "0.1", "--payload-log-uri", f"file://{payloads}",
               "--revision", "bench")  # fmt: skip
    names = ("off", "on")
    results: dict[str, dict[int, list[dict[str, Any]]]] = {n: {} for n in names}
    soaked: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    rss: dict[str, dict[str, float]] = {n: {} for n in names}
    rss_series: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    with contextlib.ExitStack() as stack:
        servers = {
            "off": stack.enter_context(kiln_server(work, uri, args, "kiln-monitoring-off", ("--monitoring", "off"))),
            "on": stack.enter_context(kiln_server(work, uri, args, "kiln-monitoring-on", on_args)),
        }
        for name, server in servers.items():
            rss[name]["ready"] = rss_mib(server)
        for r in range(args.rounds):
            for c in levels:
                # Turns alternate which goes first, so a machine that drifts weighs on both alike.
                for name in names if r % 2 == 0 else names[::-1]:
                    run = turn(work, servers[name], c, args.seconds / args.rounds, 1.0)
                    results[name].setdefault(c, []).append(run)
                    log(f"round {r + 1} {name:3s} clients {c:4d}: {run['rps']:7.1f} req/s  p50 {run['p50']:6.1f} ms"
                        f"  CPU {1000 * run['cpu'] / run['answered']:.2f} ms/request  ({loadavg()})")  # fmt: skip
        for name, server in servers.items():
            rss[name]["short"] = rss_mib(server)
        # The long run: both at saturation, in alternating turns, memory sampled after each.
        chunk, t0 = 15.0, time.monotonic()
        for k in range(max(1, round(args.soak_seconds / chunk))):
            for name in names if k % 2 == 0 else names[::-1]:
                run = turn(work, servers[name], max(levels), chunk, 0.0)
                soaked[name].append(run)
                rss_series[name].append((time.monotonic() - t0, rss_mib(servers[name])))
            log(f"long run {time.monotonic() - t0:5.0f} s: RSS off {rss_series['off'][-1][1]:.1f} MiB, on "
                f"{rss_series['on'][-1][1]:.1f} MiB; req/s off {soaked['off'][-1]['rps']:.1f}, on "
                f"{soaked['on'][-1]['rps']:.1f}")  # fmt: skip
        for name, server in servers.items():
            rss[name]["long"] = rss_mib(server)
        on_metrics = scrape(servers["on"])
        served = {name: answered(server) for name, server in servers.items()}

    # Detection delay: a fresh monitored server (defaults: window 1000, 200 samples for a verdict, threshold 0.2)
    # whose window is first filled with in-distribution traffic, then a shifted stream.
    delays: dict[str, dict[str, int | None]] = {}
    calm: dict[str, float] = {}
    with kiln_server(work, uri, args, "kiln-drift", ("--monitoring", "on")) as server:
        texts = reviews(1000, seed=7)
        for start in range(0, len(texts), 20):
            infer_texts(server, texts[start : start + 20])
        _, calm = drift(server)
        log("in distribution, window full: " + ", ".join(f"{k} {v:.3f}" for k, v in calm.items()))
        delays["non-words (all)"] = detection_delay(server, nonwords(1000, seed=8), 0.2, 10)
        log(f"non-words: {delays['non-words (all)']}")
        for start in range(0, 1000, 20):  # the window back to in-distribution traffic
            infer_texts(server, reviews(20, seed=100 + start))
        mixed = [w if i % 2 else r for i, (w, r) in enumerate(zip(nonwords(1000, 9), reviews(1000, 9), strict=True))]
        delays["half non-words"] = detection_delay(server, mixed, 0.2, 10)
        log(f"half non-words: {delays['half non-words']}")

    print()
    print("## Monitoring cost: Kiln with monitoring off vs on (+ payload log at 10 %), MiniLM, CPU")
    total = time.monotonic() - started
    print(f"host: {os.cpu_count()} CPUs, load average at the end {loadavg()}; total run {total:.0f} s")
    print(f"kiln: --instances {args.kiln_instances} --intra-op-threads {kiln_threads(args)} --max-batch-size "
          f"{args.max_batch}; on: {' '.join(on_args[:4])} (default window 1000, every batch observed); "
          f"{args.rounds} rounds of {args.seconds / args.rounds:.1f} s turns per level, alternating")  # fmt: skip
    print()
    print("| clients | off req/s | on req/s | on/off | median of paired on/off | off CPU ms/req | on CPU ms/req | "
          "off/on CPU |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    rows = [(str(c), results["off"][c], results["on"][c]) for c in levels]
    rows.append((f"{max(levels)} (long run)", soaked["off"], soaked["on"]))
    for label, off_runs, on_runs in rows:
        off_rps = sum(r["rps"] * r["seconds"] for r in off_runs) / sum(r["seconds"] for r in off_runs)
        on_rps = sum(r["rps"] * r["seconds"] for r in on_runs) / sum(r["seconds"] for r in on_runs)
        paired = statistics.median(b["rps"] / a["rps"] for a, b in zip(off_runs, on_runs, strict=True))
        print(f"| {label} | {off_rps:.1f} | {on_rps:.1f} | {on_rps / off_rps:.3f} | {paired:.3f} | "
              f"{cost(off_runs):.2f} | {cost(on_runs):.2f} | {cost(off_runs) / cost(on_runs):.3f} |")  # fmt: skip
    sat = [r for c in levels for r in results["off"][c]] + soaked["off"]
    sat_on = [r for c in levels for r in results["on"][c]] + soaked["on"]
    measured = sum(r["rps"] for r in sat_on) / sum(r["rps"] for r in sat)
    print(f"throughput at saturation, on/off: {measured:.3f} as measured (every turn; this machine's other work "
          f"makes single turns swing by tens of %), {cost(sat) / cost(sat_on):.3f} from the CPU cost per request "
          "(target >= 0.97)")  # fmt: skip
    print()
    for name in names:
        print(f"RSS MiB, {name}: ready {rss[name]['ready']:.1f}, after the rounds {rss[name]['short']:.1f}, after "
              f"{args.soak_seconds:.0f} s more at saturation {rss[name]['long']:.1f} "
              f"({rss[name]['long'] - rss[name]['short']:+.1f}); {served[name]:.0f} requests answered")  # fmt: skip
        print("  during the long run (s, MiB): " + ", ".join(f"{t:.0f} {m:.1f}" for t, m in rss_series[name]))
    print(f"on: payload records published {on_metrics['kiln_server_payload_log_records_total{}']:.0f} in "
          f"{on_metrics['kiln_server_payload_log_batches_total{}']:.0f} batches, dropped "
          f"{on_metrics['kiln_server_payload_log_dropped_total{}']:.0f}; window "
          f"{on_metrics['kiln_server_drift_window_samples{}']:.0f} samples")  # fmt: skip
    print()
    print("in-distribution scores with a full window (1000): " + ", ".join(f"{k} {v:.3f}" for k, v in calm.items()))
    for shift, crossed in delays.items():
        shown = ", ".join(f"{s} {'never' if n is None else n}" for s, n in crossed.items())
        print(f"detection delay, {shift}: samples until over 0.2: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
