"""Helpers for the server tests: small real models as kiln ONNX artifacts, and real server processes.

Artifacts follow the serving contract (docs/server.md): ``model.onnx``, ``kiln-model.json`` and, for
text, the tokenizer files, and the reference profile (``kiln-profile.json``) that the trainer would record: built
with ``kiln_artifacts.profile`` on the data the model is evaluated on (image: the packaged digits' test split,
normalised as the trainer feeds them; text: `reviews`), by running the exported ONNX model on it. They are built
once per test process (``functools.cache`` on the session's base temp folder), because exporting MiniLM takes
seconds.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import os
import random
import shutil
import signal
import ssl
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
DIGIT_LABELS = [str(i) for i in range(10)]
TEXT_LABELS = ["neg", "pos"]


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
    """A KilnCNN for 8x8 digits (random weights, seed 0) as an artifact with its reference profile: (uri, local
    path of model.onnx)."""
    import torch

    from kiln_artifacts.models import KilnCNN

    torch.manual_seed(0)
    with _one_torch_thread():
        return onnx_artifact_of(root, KilnCNN(10).eval(), profile=True)


@functools.cache
def image_artifact_without_profile(root: str) -> str:
    """The same model as `image_artifact`, published without a profile (an imported model): its uri."""
    src = Path(root) / "image-plain-src"
    src.mkdir(parents=True, exist_ok=True)
    model = image_artifact(root)[1]
    for name in ("model.onnx", "kiln-model.json"):
        shutil.copy(model.parent / name, src / name)
    return _publish(src, Path(root) / "image-model-plain", "image-classification")


@functools.cache
def digits_pixels() -> tuple[np.ndarray, np.ndarray]:
    """The packaged digits as the trainer feeds them (``x / 127.5 - 1``, float32 [n, 1, 8, 8]): (the test split,
    every 5th image as ``samples.digits_dataset`` splits them, which the profile is made of; the other images,
    traffic from the same distribution)."""
    from kiln_artifacts.samples import read_digits

    images, _ = read_digits()
    x = np.frombuffer(b"".join(images), dtype=np.uint8).reshape(-1, 1, 8, 8).astype(np.float32) / 127.5 - 1.0
    test = np.arange(len(x)) % 5 == 4
    return x[test], x[~test]


def _session(model_path: Path) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])


def image_profile(model_path: Path) -> Any:
    """The reference profile of the image model on the digits' test split."""
    from kiln_artifacts import profile as P

    pixels, _ = digits_pixels()
    logits = _session(model_path).run(["logits"], {"pixel_values": pixels})[0]
    features = {**P.output_features(logits), **P.image_features(pixels)}
    return P.build("image-classification", features, DIGIT_LABELS, {"dataset": "digits (test split)"})


_OPENERS = ["The", "Our", "This", "That", "My"]
_THINGS = ["film", "meal", "book", "hotel room", "concert", "service", "show", "trip", "phone", "course", "album"]
_GOOD = ["great", "wonderful", "excellent", "lovely", "superb", "delightful", "fine", "brilliant", "charming"]
_BAD = ["terrible", "awful", "horrible", "dreadful", "poor", "disappointing", "bland", "boring", "overpriced"]
_MORE = [
    "and the staff were friendly",
    "but the ending dragged on",
    "and I would happily go again",
    "although the price was far too high",
    "and the music was loud",
    "but nobody answered my emails",
    "and everything arrived on time",
    "though the first hour was slow",
    "and my friends loved it too",
]


def reviews(n: int, seed: int) -> list[str]:
    """Short English reviews of one to three clauses: the text model's evaluation data (seed 0) and, with other
    seeds, traffic from the same distribution."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = f"{rng.choice(_OPENERS)} {rng.choice(_THINGS)} was {rng.choice(_GOOD + _BAD)}"
        for _ in range(rng.randrange(3)):
            text += ", " + rng.choice(_MORE)
        out.append(text + ".")
    return out


def nonwords(n: int, seed: int) -> list[str]:
    """Another domain: sentences of random pronounceable non-words, which the tokenizer splits into many pieces."""
    rng = random.Random(seed)
    consonants, vowels = "bcdfghjklmnpqrstvwxz", "aeiou"

    def word() -> str:
        return "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randrange(2, 5)))

    return [" ".join(word() for _ in range(rng.randrange(4, 9))) for _ in range(n)]


def text_profile(src: Path) -> Any:
    """The reference profile of the text model in `src` on ``reviews(400, seed=0)``, tokenized as the server
    does (the artifact's tokenizer.json, truncation to TEXT_MAX_LEN, padding per batch)."""
    from tokenizers import Tokenizer

    from kiln_artifacts import profile as P

    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(TEXT_MAX_LEN)
    sess = _session(src / "model.onnx")
    texts = reviews(400, seed=0)
    parts = []
    for start in range(0, len(texts), 50):
        enc = tok.encode_batch(texts[start : start + 50])
        width = max(len(e.ids) for e in enc)
        ids = np.zeros((len(enc), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, e in enumerate(enc):
            ids[i, : len(e.ids)] = e.ids
            mask[i, : len(e.ids)] = e.attention_mask
        logits = sess.run(["logits"], {"input_ids": ids, "attention_mask": mask, "token_type_ids": 0 * ids})[0]
        parts.append({**P.token_features(ids, mask, tok.token_to_id("[UNK]")), **P.output_features(logits)})
    features = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    return P.build("text-classification", features, TEXT_LABELS, {"dataset": "reviews(400, seed=0)"})


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


def onnx_artifact_of(root: str, model: Any, profile: bool = False) -> tuple[str, Path]:
    """`model` exported to ONNX and published as an artifact under `root` (with its reference profile on the
    digits if `profile`): (uri, local path of model.onnx)."""
    import torch

    from kiln_artifacts.profile import PROFILE_FILE

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
    spec = {"task": "image-classification", "labels": DIGIT_LABELS, "imageShape": [1, 8, 8]}
    (src / "kiln-model.json").write_text(json.dumps({**spec, "precision": "fp32"}))
    (src / PROFILE_FILE).unlink(missing_ok=True)
    if profile:
        image_profile(src / "model.onnx").write(src)
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
    spec = {"task": "text-classification", "labels": TEXT_LABELS, "maxSequenceLength": TEXT_MAX_LEN}
    (src / "kiln-model.json").write_text(json.dumps({**spec, "precision": "fp32"}))
    text_profile(src).write(src)
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

    def __init__(
        self, tmp: Path, model_uri: str, *args: str, name: str = "m", env: dict[str, str] | None = None
    ) -> None:
        self.env = env or {}
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
        # With --tls-cert-file: how requests to the inference port verify the server (metrics stay plain HTTP).
        self.client_ssl: ssl.SSLContext | None = None

    def start(self) -> ServerProcess:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.args, env={**server_env(), **self.env}, stdout=log, stderr=subprocess.STDOUT
            )
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
        port = port or self.port
        conn = (
            http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=self.client_ssl)
            if self.client_ssl is not None and port == self.port
            else http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        )
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
