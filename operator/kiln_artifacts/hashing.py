"""sha256 of files, and a copy that hashes what it wrote, at close to the speed of a plain copy.

The copy runs in the kernel (copy_file_range) while a second thread hashes the destination's pages that were
just written (from the page cache), so the digest describes the bytes stored, not the bytes meant to be stored.
hashlib and os.preadv release the GIL, so the two overlap on two cores.
"""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

CHUNK = 16 << 20

BytesCallback = Callable[[int], None]


def hash_file(path: str | os.PathLike[str], *, on_bytes: BytesCallback | None = None) -> tuple[str, int]:
    """(sha256 hex, size) of a local file."""
    h = hashlib.sha256()
    size = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
            if on_bytes:
                on_bytes(n)
    return h.hexdigest(), size


def copy_and_hash(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    durable: bool = True,
    on_bytes: BytesCallback | None = None,
) -> tuple[str, int]:
    """Copy ``src`` to a new file ``dst`` and return (sha256 hex of ``dst``'s bytes, size); fsync when durable."""
    # Read-write: the hashing thread reads the destination back.
    fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    with open(src, "rb", buffering=0) as fin, open(fd, "r+b", buffering=0) as fout:
        try:
            digest, size = _kernel_copy_and_hash(fin.fileno(), fout.fileno(), on_bytes, durable)
        except _NoKernelCopy:
            fout.truncate(0)
            fin.seek(0)
            digest, size = _user_copy_and_hash(fin.fileno(), fout.fileno(), on_bytes)
            if durable:
                os.fsync(fout.fileno())
    return digest, size


class _NoKernelCopy(Exception):
    pass


def _kernel_copy_and_hash(
    fin: int, fout: int, on_bytes: BytesCallback | None, durable: bool = False
) -> tuple[str, int]:
    ranges: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
    result: dict[str, object] = {}

    def hasher() -> None:
        h = hashlib.sha256()
        buf = bytearray(CHUNK)
        try:
            while (item := ranges.get()) is not None:
                offset, length = item
                while length:
                    view = memoryview(buf)[: min(length, CHUNK)]
                    n = os.preadv(fout, [view], offset)
                    if n <= 0:
                        raise OSError(errno.EIO, "short read while hashing the copy")
                    h.update(view[:n])
                    offset += n
                    length -= n
            result["digest"] = h.hexdigest()
        except BaseException as e:  # surfaced to the caller below
            result["error"] = e

    thread = threading.Thread(target=hasher, name="kiln-hash", daemon=True)
    offset = 0
    started = False
    try:
        while True:
            try:
                n = os.copy_file_range(fin, fout, CHUNK)
            except OSError as e:
                if offset == 0 and e.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise _NoKernelCopy from e
                raise
            if n == 0:
                break
            if not started:
                thread.start()
                started = True
            ranges.put((offset, n))
            offset += n
            if on_bytes:
                on_bytes(n)
        if durable:
            os.fsync(fout)  # while the hasher catches up: both wait on I/O or hash without the GIL
    finally:
        if started:
            ranges.put(None)
            thread.join()
    if not started:
        return hashlib.sha256().hexdigest(), 0
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return str(result["digest"]), offset


def _user_copy_and_hash(fin: int, fout: int, on_bytes: BytesCallback | None) -> tuple[str, int]:
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    size = 0
    while n := os.readv(fin, [buf]):
        h.update(view[:n])
        written = 0
        while written < n:
            written += os.write(fout, view[written:n])
        size += n
        if on_bytes:
            on_bytes(n)
    return h.hexdigest(), size


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(Path(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
