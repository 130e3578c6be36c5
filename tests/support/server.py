"""Helpers for the server tests: small real models as kiln ONNX artifacts, and real server processes.

Artifacts follow the serving contract (docs/server.md): ``model.onnx``, ``kiln-model.json`` and, for
text, the tokenizer files. They are built once per test process (``functools.cache`` on the session's base temp
folder), because exporting MiniLM takes seconds.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .net import free_port
from .waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
SENTENCES = [
    "The film was a delight from start to finish.",
    "Terrible service, I will never come back.",
    "ok",
    "A long, rambling review that goes on and on about the plot, the actors, the music and the popcorn, "
    "which was stale, and the seats, which were comfortable enough for a three hour epic.",
    "Ünïcödé tèxt with emoji 🎉 and CJK 漢字 survives tokenisation.",
    "",
]
TEXT_MAX_LEN = 64


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    for name in list(env):
        if name.startswith(("KILN_SERVER_", "KILN_MODEL_")):
            del env[name]
    return env


def _publish(folder: Path, dest: Path, task: str) -> str:
    import kiln_artifacts as ka

    art = ka.publish(folder, f"file://{dest}", format="onnx", task=task, durable=False)
    return art.uri


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Exports on one thread (the machine is shared), restoring the setting for whatever runs next."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.cache
def image_artifact(root: str) -> tuple[str, Path]:
    """A KilnCNN for 8x8 digits (random weights, seed 0) as an artifact: (uri, local path of model.onnx)."""
    import torch

    from kiln_artifacts.models import KilnCNN

    torch.manual_seed(0)
    with _one_torch_thread():
        return onnx_artifact_of(root, KilnCNN(10).eval())


class Broken:
    """A model that loads and warms up (zeros) but fails at inference on real input: its Gather index runs out of
    bounds for any non-zero pixel, and ONNX Runtime refuses, so the server answers 500."""

    @staticmethod
    def build():
        import torch

        class Module(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.table = torch.nn.Parameter(torch.randn(1, 10))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                index = (x.flatten(1).abs().sum(1) > 0).long() * 1000
                return self.table[index]

        return Module().eval()


def onnx_artifact_of(root: str, model: Any) -> tuple[str, Path]:
    """`model` exported to ONNX and published as an artifact under `root`: (uri, local path of model.onnx)."""
    import torch

    src = Path(root) / "image-src"
    src.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # the exporter's deprecation and tracer warnings are about torch
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(2, 1, 8, 8),),
            str(src / "model.onnx"),
            input_names=["pixel_values"],
            output_names=["logits"],
            dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
            opset_version=17,
        )
    spec = {"task": "image-classification", "labels": [str(i) for i in range(10)], "imageShape": [1, 8, 8]}
    (src / "kiln-model.json").write_text(json.dumps({**spec, "precision": "fp32"}))
    uri = _publish(src, Path(root) / "image-model", "image-classification")
    return uri, src / "model.onnx"


@functools.cache
def text_artifact(root: str) -> tuple[str, np.ndarray]:
    """MiniLM with a (random, seed 0) 2-class head as an artifact: (uri, torch logits for SENTENCES computed with
    transformers' own tokenizer and the torch model, the reference the server must match)."""
    import torch

    torch.manual_seed(0)
    with _one_torch_thread():
        return _text_artifact(root)


def _text_artifact(root: str) -> tuple[str, np.ndarray]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kiln_artifacts.samples import minilm_dir

    base = minilm_dir()
    hf = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=2, local_files_only=True).eval()
    with torch.no_grad():  # a random head gives logits near 0 for every text; spread them so rows differ clearly
        hf.classifier.weight.mul_(50.0)

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hf = hf

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.hf(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

    src = Path(root) / "text-src"
    src.mkdir(parents=True, exist_ok=True)
    ids = torch.ones(2, 8, dtype=torch.long)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Logits().eval(),
            (ids, ids, torch.zeros_like(ids)),
            str(src / "model.onnx"),
            input_names=names,
            output_names=["logits"],
            dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names}, "logits": {0: "batch"}},
            dynamo=False,
            opset_version=17,
        )
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(base / name, src / name)
    spec = {"task": "text-classification", "labels": ["neg", "pos"], "maxSequenceLength": TEXT_MAX_LEN}
    (src / "kiln-model.json").write_text(json.dumps({**spec, "precision": "fp32"}))
    tok = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    hf.eval()  # the exporter restores the mode it found; be explicit: no dropout in the reference
    with torch.no_grad():
        expected = []
        for s in SENTENCES:  # one at a time: no padding in the reference
            enc = tok([s], truncation=True, max_length=TEXT_MAX_LEN, return_tensors="pt")
            expected.append(hf(**enc).logits[0].numpy())
    uri = _publish(src, Path(root) / "text-model", "text-classification")
    return uri, np.stack(expected)


class ServerProcess:
    """``python -m kiln_server`` on loopback, with its log in a file."""

    def __init__(self, tmp: Path, model_uri: str, *args: str, name: str = "m") -> None:
        self.port = free_port()
        self.grpc_port = free_port()
        self.metrics_port = free_port()
        self.name = name
        self.log_path = tmp / f"server-{self.port}.log"
        self.args = [
            sys.executable,
            "-m",
            "kiln_server",
            "--model-uri",
            model_uri,
            "--model-name",
            name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--grpc-port",
            str(self.grpc_port),
            "--metrics-port",
            str(self.metrics_port),
            "--intra-op-threads",
            "1",
            "--warmup-rounds",
            "1",
            "--shutdown-delay-s",
            "0",
            "--termination-log",
            str(tmp / "termination-log"),
            *args,
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.args, env=server_env(), stdout=log, stderr=subprocess.STDOUT)
        return self

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        port: int | None = None,
        timeout: float = 30,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def wait_ready(self, timeout: float = 90) -> ServerProcess:
        def probe() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log}")
            try:
                return self.request("GET", "/v2/health/ready", timeout=2)[0] == 200
            except OSError:
                return False

        wait_for(probe, what=f"server ready on {self.port}", timeout=timeout, interval=0.1)
        return self

    def metrics(self) -> dict[str, float]:
        """Every sample on /metrics as ``name{label="v",...}`` -> value (labels sorted)."""
        from prometheus_client.parser import text_string_to_metric_families

        status, _, body = self.request("GET", "/metrics", port=self.metrics_port)
        assert status == 200
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}"] = s.value
        return out

    def infer(self, doc: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        status, _, body = self.request(
            "POST",
            f"/v2/models/{self.name}/infer",
            json.dumps(doc).encode(),
            {"Content-Type": "application/json", **(headers or {})},
        )
        return status, json.loads(body)

    def terminate(self, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def wait_in_flight(server: ServerProcess, futures: list[Any], at_least: int) -> float:
    """Wait until ``at_least`` requests of a burst are accepted and in flight (or all done); the count then."""
    wait_for(
        lambda: (
            counter(server.metrics(), "kiln_server_inflight_requests", model=server.name) >= at_least
            or all(f.done() for f in futures)
        ),
        what="the burst in flight",
        timeout=30,
        interval=0.01,
    )
    return counter(server.metrics(), "kiln_server_inflight_requests", model=server.name)


def run_server(tmp: Path, model_uri: str, *args: str, timeout: float = 60) -> tuple[int, str, str]:
    """Run a server expected to exit by itself: (exit code, log, termination log)."""
    server = ServerProcess(tmp, model_uri, *args).start()
    assert server.proc is not None
    try:
        code = server.proc.wait(timeout)
    finally:
        server.kill()
    term = tmp / "termination-log"
    return code, server.log, term.read_text() if term.exists() else ""


def image_request(pixels: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "pixel_values", "datatype": "FP32", "shape": list(pixels.shape), "data": pixels.ravel().tolist()}
        ],
        **extra,
    }


def text_request(texts: list[str], **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}], **extra}


def counter(metrics: dict[str, float], name: str, **labels: str) -> float:
    key = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    return metrics.get(key, 0.0)
