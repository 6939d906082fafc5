"""Signed model packages: a full artifact, or a delta holding only what changed since a base version.

A package is one uncompressed tar file:

    manifest.json   the per-tensor manifest (see `manifest`) plus kind (full | delta) and encryption
    manifest.sig    Ed25519 signature of manifest.json's exact bytes
    data/REL        a whole file (full packages: every file; deltas: new or changed non-tensor files)
    header/REL      deltas: the new header bytes of a safetensors file the base also has ...
    tensor/KEY      ... the bytes of each of its tensors whose hash changed (KEY = REL:name) ...
    chunk/KEY/I     ... or, for a tensor of unchanged size, only its changed 64 KiB slices

With an encryption key every member but the manifest and signature is AES-256-GCM in 4 MiB chunks:
an 8-byte random prefix, then each chunk sealed with nonce = prefix + chunk index and associated data
naming the member, the index and whether it is the last (so chunks cannot be swapped, dropped or cut
off). The manifest hashes the plaintext; the key is never stored.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import BinaryIO, Iterator

from ..errors import ConfigError, DataError, IntegrityError
from ..io import atomic_write_path
from . import keys
from .manifest import TENSOR_CHUNK, build_manifest, canonical, manifest_hash

CHUNK = 4 << 20
TAG = 16


def parse_version(text: str):
    from packaging.version import InvalidVersion, Version
    try:
        return Version(str(text))
    except InvalidVersion:
        raise ConfigError(f"version '{text}' is not a version number", "use e.g. 1, 1.2 or 2.0.1") from None


# ---- encryption ------------------------------------------------------------------------------------

def _aad(name: str, index: int, last: bool) -> bytes:
    return f"{name}\0{index}\0{int(last)}".encode()


def _encrypt_stream(key: bytes, name: str, src: BinaryIO, size: int) -> Iterator[bytes]:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    aes, prefix = AESGCM(key), os.urandom(8)
    yield prefix
    n = max(1, -(-size // CHUNK))
    for i in range(n):
        block = src.read(CHUNK)
        yield aes.encrypt(prefix + i.to_bytes(4, "big"), block, _aad(name, i, i == n - 1))


def _decrypt_stream(key: bytes, name: str, src: BinaryIO, size: int, first: int = 0) -> Iterator[bytes]:
    """Plaintext chunks of an encrypted member of `size` bytes, from chunk `first` on (src: its start)."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    aes, prefix = AESGCM(key), src.read(8)
    n = max(1, -(-(size - 8) // (CHUNK + TAG)))
    if first:
        src.seek(8 + first * (CHUNK + TAG))
    for i in range(first, n):
        block = src.read(CHUNK + TAG)
        try:
            yield aes.decrypt(prefix + i.to_bytes(4, "big"), block, _aad(name, i, i == n - 1))
        except InvalidTag:
            raise IntegrityError(f"package member '{name}' does not decrypt",
                                 "the encryption key is wrong or the package was modified") from None


def encrypted_size(size: int) -> int:
    return 8 + max(1, -(-size // CHUNK)) * TAG + size


# ---- writing ---------------------------------------------------------------------------------------

class _Writer:
    """Adds members to a tar being written, encrypting them when a key is given."""

    def __init__(self, tar: tarfile.TarFile, key: bytes | None):
        self.tar, self.key = tar, key

    def add_bytes(self, name: str, data: bytes, encrypt: bool = True) -> None:
        self.add_stream(name, io.BytesIO(data), len(data), encrypt)

    def add_stream(self, name: str, src: BinaryIO, size: int, encrypt: bool = True) -> None:
        info = tarfile.TarInfo(name)
        info.mode = 0o644
        if self.key is None or not encrypt:
            info.size = size
            self.tar.addfile(info, src)
            return
        info.size = encrypted_size(size)
        self.tar.addfile(info, _Joined(_encrypt_stream(self.key, name, src, size)))

    def add_range(self, name: str, path: Path, start: int, end: int) -> None:
        with open(path, "rb") as f:
            f.seek(start)
            self.add_stream(name, _Limited(f, end - start), end - start)


class _Joined(io.RawIOBase):
    """A readable stream over an iterator of byte blocks (what tarfile.addfile reads from)."""

    def __init__(self, blocks: Iterator[bytes]):
        self.blocks, self.buf = blocks, b""

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self.buf) < n:
            try:
                self.buf += next(self.blocks)
            except StopIteration:
                break
        out, self.buf = (self.buf, b"") if n < 0 else (self.buf[:n], self.buf[n:])
        return out


class _Limited(io.RawIOBase):
    def __init__(self, f: BinaryIO, size: int):
        self.f, self.left = f, size

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        return data


def _write_package(out: Path, manifest: dict, signing_key, enc_key: bytes | None, add_members) -> Path:
    manifest = {**manifest, "encryption": "AES-256-GCM/4MiB-chunks" if enc_key else None}
    body = canonical(manifest)
    with atomic_write_path(out) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            w = _Writer(tar, enc_key)
            w.add_bytes("manifest.json", body, encrypt=False)
            w.add_bytes("manifest.sig", keys.sign(signing_key, body), encrypt=False)
            add_members(w)
    return out


def pack(artifact: str | Path, out: str | Path, key_path: str | Path, *, version: str, name: str | None = None,
         encrypt_key: bytes | None = None) -> dict:
    """A full package of `artifact` at `version`, signed with the key at `key_path`; its manifest."""
    root = Path(artifact)
    if not (root / "config.json").is_file():
        raise DataError(f"'{root}' is not a model artifact (no config.json)", "pass a directory written by pocketlm")
    parse_version(version)
    signing_key = keys.load_private(key_path)
    manifest = {**build_manifest(root, name=name or root.name, version=version), "kind": "full"}

    def members(w: _Writer) -> None:
        for rel, entry in manifest["files"].items():
            with open(root / rel, "rb") as f:
                w.add_stream(f"data/{rel}", f, entry["size"])
    _write_package(Path(out), manifest, signing_key, encrypt_key, members)
    return manifest


def diff(old: str | Path, new: str | Path, out: str | Path, key_path: str | Path, *,
         old_key: bytes | None = None, new_key: bytes | None = None, encrypt_key: bytes | None = None) -> dict:
    """A delta from the full package `old` to the full package `new`: only new or changed files and,
    inside safetensors files both have, only the tensors whose hash changed. Returns its manifest."""
    signing_key = keys.load_private(key_path)
    trusted = keys.public_pem(signing_key)
    with Package(old, trusted_pem=trusted, enc_key=old_key) as a, Package(new, trusted_pem=trusted, enc_key=new_key) as b:
        base, target = a.manifest, b.manifest
        if base["kind"] != "full" or target["kind"] != "full":
            raise DataError("diff takes two full packages", "pass the packages `pocketlm pack` wrote")
        if parse_version(target["version"]) <= parse_version(base["version"]):
            raise ConfigError(f"new version {target['version']} is not above the old {base['version']}",
                              "diff an older package against a newer one")
        manifest = {**build_manifest_from(target, base), "kind": "delta"}
        plan = delta_plan(base, target)

        def members(w: _Writer) -> None:
            for rel in plan["files"]:
                w.add_stream(f"data/{rel}", b.open(f"data/{rel}"), target["files"][rel]["size"])
            for rel in plan["headers"]:
                start = min(t["start"] for t in target["tensors"].values() if t["file"] == rel)
                w.add_bytes(f"header/{rel}", b.read_prefix(f"data/{rel}", start))
            for key in plan["tensors"]:
                t = target["tensors"][key]
                w.add_bytes(f"tensor/{key}", b.read_range(f"data/{t['file']}", t["start"], t["end"]))
            for key, i in plan["chunks"]:
                t = target["tensors"][key]
                start = t["start"] + i * TENSOR_CHUNK
                w.add_bytes(f"chunk/{key}/{i}", b.read_range(f"data/{t['file']}", start,
                                                              min(start + TENSOR_CHUNK, t["end"])))
        _write_package(Path(out), manifest, signing_key, encrypt_key, members)
    return manifest


def build_manifest_from(target: dict, base: dict) -> dict:
    core = {k: v for k, v in target.items() if k not in ("kind", "encryption", "base_version", "base_manifest")}
    return {**core, "base_version": base["version"], "base_manifest": manifest_hash(base)}


def delta_plan(base: dict, target: dict) -> dict:
    """What a delta must carry: whole files (new, or changed and not rebuildable from tensors),
    safetensors headers, the changed tensors of files rebuilt from the base, and for a changed tensor
    of the same size, only its changed TENSOR_CHUNK slices (as (tensor key, slice index))."""
    files, headers, tensors, chunks = [], [], [], []
    base_tensors = {t["sha256"] for t in base["tensors"].values()}
    for rel, entry in target["files"].items():
        old = base["files"].get(rel)
        if old is not None and old["sha256"] == entry["sha256"]:
            continue
        mine = sorted((t for t in target["tensors"].values() if t["file"] == rel), key=lambda t: t["start"])
        contiguous = bool(mine) and all(a["end"] == b["start"] for a, b in zip(mine, mine[1:])) \
            and mine[-1]["end"] == entry["size"]
        if old is None or not contiguous:
            files.append(rel)
            continue
        headers.append(rel)
        for t in mine:
            if t["sha256"] in base_tensors:
                continue
            key, was = f"{rel}:{t['name']}", base["tensors"].get(f"{rel}:{t['name']}")
            if was is not None and t["chunks"] and len(was.get("chunks", [])) == len(t["chunks"]) \
                    and was["end"] - was["start"] == t["end"] - t["start"]:
                chunks += [(key, i) for i, (a, b) in enumerate(zip(was["chunks"], t["chunks"])) if a != b]
            else:
                tensors.append(key)
    return {"files": files, "headers": headers, "tensors": tensors, "chunks": chunks}


# ---- reading ---------------------------------------------------------------------------------------

class Package:
    """An opened package whose signature verified against the trusted key (path or PEM bytes)."""

    def __init__(self, path: str | Path, trusted: str | Path | None = None, *, trusted_pem: bytes | None = None,
                 enc_key: bytes | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"package '{self.path}' does not exist", "pass a file written by pocketlm pack or diff")
        try:
            self.tar = tarfile.open(self.path, "r:")
            self.members = {m.name: m for m in self.tar.getmembers()}
            body = self._raw("manifest.json")
            signature = self._raw("manifest.sig")
        except (tarfile.TarError, OSError, EOFError, KeyError) as e:
            raise IntegrityError(f"package '{self.path}' is truncated or damaged ({type(e).__name__})",
                                 "download it again") from None
        if trusted_pem is not None:
            from cryptography.hazmat.primitives import serialization
            public = serialization.load_pem_public_key(trusted_pem)
        else:
            public = keys.load_public(trusted)
        keys.verify(public, body, signature, f"package '{self.path.name}'")
        self.manifest = json.loads(body)
        size = self.path.stat().st_size
        last = max((m.offset_data + m.size for m in self.members.values()), default=0)
        if last > size:
            raise IntegrityError(f"package '{self.path}' is truncated", "download it again")
        if self.manifest.get("encryption") and enc_key is None:
            raise ConfigError(f"package '{self.path.name}' is encrypted and no key was given",
                              f"pass --decrypt-key FILE or set {keys.KEY_ENV}")
        self.enc_key = enc_key if self.manifest.get("encryption") else None

    def __enter__(self) -> "Package":
        return self

    def __exit__(self, *exc) -> None:
        self.tar.close()

    def _raw(self, name: str) -> bytes:
        f = self.tar.extractfile(self.members[name])
        data = f.read()
        if len(data) != self.members[name].size:
            raise EOFError(name)
        return data

    def open(self, name: str) -> BinaryIO:
        """A stream of member `name`'s plaintext."""
        if name not in self.members:
            raise IntegrityError(f"package '{self.path.name}' lacks '{name}' that its manifest needs",
                                 "the package is damaged; download it again")
        m = self.members[name]
        raw = self.tar.extractfile(m)
        if self.enc_key is None:
            return raw
        return _Joined(_decrypt_stream(self.enc_key, name, raw, m.size))

    def read_prefix(self, name: str, n: int) -> bytes:
        return self.open(name).read(n)

    def read_range(self, name: str, start: int, end: int) -> bytes:
        """Plaintext bytes [start, end) of a member, seeking (to the first chunk needed when encrypted)."""
        self.open(name)  # the member check
        m = self.members[name]
        raw = self.tar.extractfile(m)
        if self.enc_key is None:
            raw.seek(start)
            return raw.read(end - start)
        first = start // CHUNK
        f = _Joined(_decrypt_stream(self.enc_key, name, raw, m.size, first))
        return f.read(end - first * CHUNK)[start - first * CHUNK:]

    def read_all(self, name: str) -> bytes:
        return self.open(name).read()

