"""The per-tensor manifest of an artifact directory: what a package signs and an install re-checks.

Every file gets its size and sha256; every tensor of every safetensors file gets its dtype, shape,
byte range in the file and the sha256 of those bytes, so that a delta can name exactly the tensors
that changed and an install can rebuild a file from the base's bytes plus the new tensors. The
manifest's own hash (sha256 of its canonical JSON) is what a delta names as its base.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from ..errors import CorruptModelError

FORMAT = "pocketlm-manifest/1"
CHUNK = 1 << 22
TENSOR_CHUNK = 1 << 16  # delta granularity inside a tensor (an expert slice is a multiple of it)
SKIP = {"manifest.json", "manifest.sig"}


def sha256_file(path: Path, start: int = 0, end: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = (os.fstat(f.fileno()).st_size if end is None else end) - start
        f.seek(start)
        while left > 0:
            block = f.read(min(CHUNK, left))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def safetensors_header(path: Path) -> tuple[int, dict]:
    """(bytes before the data, the header's tensor entries) of a safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        try:
            (n,) = struct.unpack("<Q", raw)
            header = json.loads(f.read(n))
        except (struct.error, ValueError) as e:
            raise CorruptModelError(f"'{path}' is not a readable safetensors file ({type(e).__name__})",
                                    "re-create the artifact") from None
    header.pop("__metadata__", None)
    return 8 + n, header


def tensor_entries(path: Path, rel: str) -> dict[str, dict]:
    """Per tensor: dtype, shape, byte range, sha256, and the sha256 of each TENSOR_CHUNK-byte slice (so a
    delta carries only the slices that changed, e.g. the retrained experts of a fused expert tensor)."""
    base, header = safetensors_header(path)
    out = {}
    with open(path, "rb") as f:
        for name, t in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, end = base + t["data_offsets"][0], base + t["data_offsets"][1]
            f.seek(start)
            data = f.read(end - start)
            chunks = [hashlib.sha256(data[i:i + TENSOR_CHUNK]).hexdigest()[:32]
                      for i in range(0, len(data), TENSOR_CHUNK)] if len(data) > TENSOR_CHUNK else []
            out[f"{rel}:{name}"] = {"file": rel, "name": name, "dtype": t["dtype"], "shape": t["shape"],
                                    "start": start, "end": end, "sha256": hashlib.sha256(data).hexdigest(),
                                    "chunks": chunks}
    return out


def build_manifest(artifact: str | Path, *, name: str, version: str, base: dict | None = None) -> dict:
    """The manifest of `artifact` (every file but a previous manifest), at `version`; `base` is the
    manifest a delta applies to (its hash and version are recorded)."""
    root = Path(artifact)
    files, tensors = {}, {}
    for p in sorted(x for x in root.rglob("*") if x.is_file()):
        rel = p.relative_to(root).as_posix()
        if rel in SKIP:
            continue
        files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        if rel.endswith(".safetensors"):
            tensors.update(tensor_entries(p, rel))
    return {"format": FORMAT, "name": name, "version": version,
            "base_version": base["version"] if base else None, "base_manifest": manifest_hash(base) if base else None,
            "files": files, "tensors": tensors}


def canonical(manifest: dict) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


def manifest_hash(manifest: dict) -> str:
    """The identity of a model version: sha256 of the canonical manifest, without the delta fields
    (a full package and a delta that build the same files have the same hash)."""
    core = {k: v for k, v in manifest.items() if k not in ("base_version", "base_manifest", "kind", "encryption")}
    return hashlib.sha256(canonical(core)).hexdigest()


def verify_files(root: Path, manifest: dict, tensors: bool = False) -> list[str]:
    """What in `root` differs from the manifest (empty: nothing): missing, extra or changed files;
    with `tensors`, every tensor's bytes too."""
    problems = []
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - SKIP
    for rel in sorted(present - set(manifest["files"])):
        problems.append(f"unexpected file {rel}")
    for rel, entry in manifest["files"].items():
        p = root / rel
        if not p.is_file():
            problems.append(f"missing file {rel}")
        elif p.stat().st_size != entry["size"] or sha256_file(p) != entry["sha256"]:
            problems.append(f"file {rel} differs from the manifest")
    if tensors:
        for key, t in manifest["tensors"].items():
            p = root / t["file"]
            if p.is_file() and sha256_file(p, t["start"], t["end"]) != t["sha256"]:
                problems.append(f"tensor {key} differs from the manifest")
    return problems
