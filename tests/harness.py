"""Test harness shared by the integration tests: the cluster handle and the operator runner."""

import contextlib
import json
import os
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kopf.testing import KopfRunner

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Cluster:
    kubeconfig: str
    bin_dir: Path

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.bin_dir / "kubectl"), "--kubeconfig", self.kubeconfig, *args],
            input=stdin,
            capture_output=True,
            text=True,
            check=check,
        )

    def get(self, *args: str) -> dict[str, Any]:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)


def bin_dir() -> Path:
    cache = Path(os.environ.get("KILN_CACHE", Path.home() / ".cache/kiln"))
    return Path(os.environ.get("KILN_BIN_DIR", cache / "bin"))


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Operator:
    runner: KopfRunner
    liveness_url: str
    metrics_url: str

    def metrics(self) -> str:
        return urllib.request.urlopen(self.metrics_url, timeout=5).read().decode()

    def liveness(self) -> dict[str, Any]:
        return json.loads(urllib.request.urlopen(self.liveness_url, timeout=5).read())


@contextlib.contextmanager
def run_operator(*scope: str) -> Iterator[Operator]:
    """The operator in this process under KopfRunner; on exit its exit code and exceptions are asserted."""
    liveness = f"http://127.0.0.1:{free_port()}/healthz"
    metrics_port = free_port()
    os.environ["KILN_METRICS_ADDRESS"] = f"127.0.0.1:{metrics_port}"
    args = ["run", "--standalone", "-m", "kiln_operator", f"--liveness={liveness}", "--verbose", *scope]
    with KopfRunner(args, timeout=60) as runner:
        yield Operator(runner, liveness, f"http://127.0.0.1:{metrics_port}/metrics")
    assert runner.exception is None, runner.output
    assert runner.exit_code == 0, runner.output
