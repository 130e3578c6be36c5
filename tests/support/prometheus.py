"""A real Prometheus server on loopback for the canary analysis tests (hack/prometheus.sh fetches Debian's)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest
import yaml

from .net import free_port
from .processes import stop
from .waiting import wait_for

CACHED = Path(os.environ.get("KILN_CACHE") or Path.home() / ".cache" / "kiln") / "prometheus" / "usr/bin/prometheus"


def prometheus_binary() -> str | None:
    """$KILN_PROMETHEUS, else the one hack/prometheus.sh unpacked into the cache, else one on PATH."""
    if os.environ.get("KILN_PROMETHEUS"):
        return os.environ["KILN_PROMETHEUS"]
    if os.access(CACHED, os.X_OK):
        return str(CACHED)
    return shutil.which("prometheus")


def require_prometheus() -> str:
    """The binary; without one a test skips, except under CI, where hack/test.sh must have fetched it."""
    binary = prometheus_binary()
    if binary:
        return binary
    if os.environ.get("CI"):
        pytest.fail("prometheus not installed under CI: hack/prometheus.sh should have fetched it")
    pytest.skip("prometheus not installed: hack/prometheus.sh")


def promtool_binary() -> str | None:
    """$KILN_PROMTOOL, else the one hack/prometheus.sh unpacked beside prometheus (Debian's package ships both),
    else one on PATH."""
    if os.environ.get("KILN_PROMTOOL"):
        return os.environ["KILN_PROMTOOL"]
    cached = CACHED.with_name("promtool")
    if os.access(cached, os.X_OK):
        return str(cached)
    return shutil.which("promtool")


def require_promtool() -> str:
    """The binary; without one a test skips, except under CI, where hack/test.sh must have fetched it."""
    binary = promtool_binary()
    if binary:
        return binary
    if os.environ.get("CI"):
        pytest.fail("promtool not installed under CI: hack/prometheus.sh should have fetched it")
    pytest.skip("promtool not installed: hack/prometheus.sh")


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


@contextlib.contextmanager
def run_prometheus(
    tmp: Path,
    targets: Sequence[tuple[str, Mapping[str, str]]],
    *,
    scrape_interval: str = "1s",
    discovery: Mapping[str, object] | None = None,
    expected: int | None = None,
    listen: str = "127.0.0.1",
    rule_files: Sequence[Path] = (),
) -> Iterator[str]:
    """Prometheus scraping `targets` ((host:port, target labels) pairs) every `scrape_interval`, or the targets a
    `discovery` scrape config finds (`expected` of them); yields its base URL once it is ready and has scraped every
    target successfully, and stops it (SIGTERM, then SIGKILL) on exit. It listens on `listen` (loopback, or an
    address of this machine that pods reach). `rule_files` are evaluated every `scrape_interval` too."""
    binary = prometheus_binary()
    if binary is None:
        raise RuntimeError("prometheus not installed: hack/prometheus.sh")
    port = free_port()
    work = tmp / f"prometheus-{port}"
    work.mkdir(parents=True)
    config = {
        # scrape_timeout defaults to 10s, which Prometheus refuses when it is longer than the interval.
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "evaluation_interval": scrape_interval,
        },
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [
            dict(discovery)
            if discovery
            else {
                "job_name": "kiln-server",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [address], "labels": dict(labels)} for address, labels in targets],
            }
        ],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    log_path = work / "prometheus.log"
    url = f"http://{listen}:{port}"
    args = [
        binary,
        f"--config.file={work / 'prometheus.yml'}",
        f"--storage.tsdb.path={work / 'data'}",
        f"--web.listen-address={listen}:{port}",
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {proc.returncode}; log tail:\n{_tail(log_path)}")
            try:
                if _get(f"{url}/-/ready")[0] != 200:  # plain text, not JSON
                    return False
                status, body = _get(f"{url}/api/v1/targets")
            except OSError:  # not listening yet
                return False
            # Targets show up only after the discovery manager's first update (about 5 s after the start).
            active = json.loads(body)["data"]["activeTargets"] if status == 200 else []
            return len(active) == want and all(t["health"] == "up" for t in active)

        want = len(targets) if expected is None else expected
        try:
            wait_for(ready, what=f"prometheus on {url} ready with {want} targets up", timeout=60, interval=0.2)
        except AssertionError as e:
            raise AssertionError(f"{e}\nprometheus log tail:\n{_tail(log_path)}") from None
        yield url
    finally:
        stop(proc)
