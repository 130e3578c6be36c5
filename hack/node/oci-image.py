#!/usr/bin/env python3
"""Writes a one-layer OCI image archive (importable with `ctr images import`) from a few files of this machine.

Reproducible: fixed timestamps and ownership, so the same inputs always give the same image digest.
  oci-image.py --out pause.tar --name kiln.local/pause:3.10.2 --file pause=/path/to/pause \
      --entrypoint /pause --user 65535:65535
  oci-image.py --out bb.tar --name kiln.local/busybox:1 --file bin/busybox=/bin/busybox --symlink bin/sh=busybox
"""

import argparse
import hashlib
import io
import json
import tarfile

PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def blob(tar: tarfile.TarFile, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    info = tarfile.TarInfo("blobs/sha256/" + digest.split(":", 1)[1])
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
    return digest, len(data)


def layer(files: list[str], symlinks: list[str]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as t:
        dirs = set()
        for spec in files + symlinks:
            parts = spec.split("=", 1)[0].strip("/").split("/")[:-1]
            dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        for d in sorted(dirs):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            t.addfile(info)
        for spec in files:
            dest, src = spec.split("=", 1)
            with open(src, "rb") as f:
                data = f.read()
            info = tarfile.TarInfo(dest.strip("/"))
            info.size, info.mode = len(data), 0o755
            t.addfile(info, io.BytesIO(data))
        for spec in symlinks:
            dest, target = spec.split("=", 1)
            info = tarfile.TarInfo(dest.strip("/"))
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
            t.addfile(info)
    return out.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--name", required=True, help="the image reference, e.g. kiln.local/pause:3.10.2")
    p.add_argument("--file", action="append", default=[], help="DEST=SRC: a file of this machine, mode 0755")
    p.add_argument("--symlink", action="append", default=[], help="DEST=TARGET")
    p.add_argument("--entrypoint", action="append", default=[])
    p.add_argument("--user", default="")
    a = p.parse_args()

    layer_tar = layer(a.file, a.symlink)
    created = "1970-01-01T00:00:00Z"
    config = {
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": a.entrypoint or None, "User": a.user, "Env": [PATH]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer_tar).hexdigest()]},
        "history": [{"created": created, "created_by": "hack/node/oci-image.py"}],
    }
    with tarfile.open(a.out, "w") as t:
        layer_digest, layer_size = blob(t, layer_tar)
        cfg_digest, cfg_size = blob(t, json.dumps(config, sort_keys=True).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_digest, "size": cfg_size},
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_size}
            ],
        }
        man_digest, man_size = blob(t, json.dumps(manifest, sort_keys=True).encode())
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": man_digest,
                    "size": man_size,
                    "platform": {"architecture": "amd64", "os": "linux"},
                    # containerd names the imported image after this annotation
                    "annotations": {
                        "io.containerd.image.name": a.name,
                        "org.opencontainers.image.ref.name": a.name.rsplit(":", 1)[-1],
                    },
                }
            ],
        }
        for name, data in (
            ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
            ("index.json", json.dumps(index).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


if __name__ == "__main__":
    main()
