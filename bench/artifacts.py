"""Benchmark: publish and load of an artifact on file:// and s3:// against a plain copy measured in the same run.

    .venv/bin/python -m bench.artifacts --size-mb 500 --repeat 5 --s3-repeat 2

The artifact is one weights file of --size-mb MiB plus three small files (config, tokenizer, vocab), like a
Hugging Face model folder. Baselines, measured in the same run and the same way:
- file copy: shutil.copyfile of every file, then fsync (publish fsyncs too, so the durability is the same);
  also shown without fsync;
- s3 put/get: fsspec/s3fs put and get of the same folder (no hashing, no manifest).
s3:// runs against moto's S3 server on 127.0.0.1 (kiln_artifacts.testing), started here. Every operation is
repeated; medians and best runs are reported; ratios are operation / baseline (target: <= 1.5).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import kiln_artifacts as ka
from kiln_artifacts.storage import s3_filesystem
from kiln_artifacts.testing import S3TestServer


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_source(root: Path, size_mb: int) -> Path:
    src = root / "source"
    src.mkdir()
    block = os.urandom(8 << 20)
    remaining = size_mb << 20
    with open(src / "model.safetensors", "wb") as f:
        while remaining:
            n = min(remaining, len(block))
            f.write(block[:n] if n < len(block) else block)
            remaining -= n
            block = bytes(reversed(block[:64])) + block[64:]  # vary the blocks a little
    (src / "config.json").write_text('{"model_type": "bert", "hidden_size": 384}\n')
    (src / "tokenizer.json").write_bytes(os.urandom(466_000))
    (src / "vocab.txt").write_bytes(os.urandom(231_000))
    return src


def copy_tree(src: Path, dst: Path, fsync: bool) -> None:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        shutil.copyfile(f, dst / f.name)
        if fsync:
            fd = os.open(dst / f.name, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def timed(fn: Callable[[], object]) -> float:
    os.sync()  # start each measurement with no dirty pages left by the previous one
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=500, help="size of the weights file in MiB (default 500)")
    parser.add_argument("--repeat", type=int, default=5, help="file:// repetitions (median and best reported)")
    parser.add_argument("--s3-repeat", type=int, default=2, help="s3:// repetitions (moto is slow)")
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary folder under /tmp)")
    parser.add_argument("--no-s3", action="store_true", help="skip the s3:// measurements")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kiln-bench-", dir=args.dir))
    times: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        times.setdefault(name, []).append(seconds)
        say(f"  {name:<34} {seconds:7.3f} s")

    try:
        say(f"[bench] writing a {args.size_mb} MiB source artifact in {work}")
        src = make_source(work, args.size_mb)
        total = sum(f.stat().st_size for f in src.iterdir())
        os.sync()
        for i in range(args.repeat):
            say(f"[bench] file:// round {i + 1}/{args.repeat}")
            uri = f"file://{work}/store/run-{i}"
            steps = [
                ("file copy + fsync", lambda i=i: copy_tree(src, work / f"copy-{i}", True)),
                ("file publish", lambda uri=uri: ka.publish(src, uri, format="hf-transformers")),
            ]
            # The virtual disk's speed drifts (writeback, discards): alternate which of the pair goes first.
            for name, fn in steps if i % 2 == 0 else reversed(steps):
                record(name, timed(fn))
            record("file copy (no fsync)", timed(lambda i=i: copy_tree(src, work / f"copy-nofsync-{i}", False)))
            record("file load (verify full)", timed(lambda uri=uri: ka.load(uri, verify="full")))
            record("file load (verify lazy)", timed(lambda uri=uri: ka.load(uri, verify="lazy")))
            for p in (work / f"copy-nofsync-{i}", work / f"copy-{i}", work / "store"):
                shutil.rmtree(p)
            os.sync()

        if not args.no_s3:
            say("[bench] starting the S3 server (moto) on 127.0.0.1")
            with S3TestServer() as s3:
                s3.create_bucket("bench")
                os.environ.update(s3.env())
                fs = s3_filesystem()
                for i in range(args.s3_repeat):
                    say(f"[bench] s3:// round {i + 1}/{args.s3_repeat}")
                    plain = f"bench/plain-{i}"
                    record("s3 put (fsspec)", timed(lambda plain=plain: fs.put(f"{src}/", plain + "/", recursive=True)))
                    uri = f"s3://bench/run-{i}"
                    record("s3 publish", timed(lambda uri=uri: ka.publish(src, uri, format="hf-transformers")))
                    got = work / f"got-{i}"
                    record(
                        "s3 get (fsspec)",
                        timed(lambda plain=plain, got=got: fs.get(plain + "/", f"{got}/", recursive=True)),
                    )
                    cache = work / f"cache-{i}"
                    record(
                        "s3 load (download + verify full)",
                        timed(lambda uri=uri, cache=cache: ka.load(uri, verify="full", cache_dir=cache)),
                    )
                    fs.rm(plain, recursive=True)
                    fs.rm(f"bench/run-{i}", recursive=True)
                    shutil.rmtree(got)
                    shutil.rmtree(cache)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    mb = total / (1 << 20)
    rows = [
        ("file publish", "file copy + fsync"),
        ("file load (verify full)", "file copy + fsync"),
        ("file load (verify full)", "file copy (no fsync)"),
        ("file load (verify lazy)", "file copy (no fsync)"),
        ("s3 publish", "s3 put (fsspec)"),
        ("s3 publish", "file copy + fsync"),
        ("s3 load (download + verify full)", "s3 get (fsspec)"),
        ("s3 load (download + verify full)", "file copy + fsync"),
    ]
    best = {k: min(v) for k, v in times.items()}
    print(f"\nartifact: {mb:.0f} MiB in 4 files; ratio = operation / baseline, of the medians and of the best runs")
    print(
        f"{'operation':<34} {'median s':>8} {'MiB/s':>6}   {'baseline':<22} {'median s':>8} {'ratio':>6}"
        f"   {'best s':>7} {'base best':>9} {'ratio':>6}"
    )
    for op, base in rows:
        if op in med and base in med:
            print(
                f"{op:<34} {med[op]:8.3f} {mb / med[op]:6.0f}   {base:<22} {med[base]:8.3f} {med[op] / med[base]:6.2f}"
                f"   {best[op]:7.3f} {best[base]:9.3f} {best[op] / best[base]:6.2f}"
            )
    print("\nall runs (s):")
    for k, v in times.items():
        print(f"  {k:<34} " + " ".join(f"{x:.3f}" for x in v))


if __name__ == "__main__":
    main()
