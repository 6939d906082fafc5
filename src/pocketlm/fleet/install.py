"""Install packages on a device: verify, rebuild in a staging slot, re-hash, switch atomically, roll back.

    DIR/versions/V/      one installed version: the artifact's files, manifest.json, manifest.sig
    DIR/active           symlink to the active version (switched with one rename)
    DIR/history.json     versions in the order they were activated (for rollback)
    DIR/trusted.pub      the signing key's public half, pinned by the first install (later installs
                         must name the same key; load and verify re-check signatures with it)

A package is verified before anything is written (signature, version against the active one, a
delta's base against the active manifest); its files are rebuilt in DIR/.staging-*, every file and
tensor is re-hashed against the manifest, and only then does `active` move. A failure at any step
— a bad package, a full disk, a killed process — leaves the active version as it was; stale
staging slots are removed by the next install.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import ConfigError, DataError, IntegrityError
from ..io import atomic_write_text
from . import keys
from .manifest import TENSOR_CHUNK, manifest_hash, verify_files
from .package import CHUNK, Package, parse_version

ACTIVE, HISTORY, TRUSTED, VERSIONS = "active", "history.json", "trusted.pub", "versions"


def is_install_dir(path: Path) -> bool:
    return (path / ACTIVE).is_symlink() and (path / HISTORY).is_file()


def active_dir(root: Path) -> Path | None:
    link = root / ACTIVE
    return (root / os.readlink(link)).resolve() if link.is_symlink() else None


def read_manifest(version_dir: Path) -> dict:
    try:
        return json.loads((version_dir / "manifest.json").read_bytes())
    except (OSError, ValueError):
        raise IntegrityError(f"the manifest of '{version_dir}' is missing or unreadable",
                             "reinstall the package, or `pocketlm rollback`") from None


def check_signature(version_dir: Path, root: Path) -> dict:
    """The version's manifest, after its signature verified with the install's trusted key."""
    body = (version_dir / "manifest.json").read_bytes() if (version_dir / "manifest.json").is_file() else b""
    sig = (version_dir / "manifest.sig").read_bytes() if (version_dir / "manifest.sig").is_file() else b""
    if not body or not sig:
        raise IntegrityError(f"installed version '{version_dir.name}' lacks its manifest or signature",
                             "reinstall the package, or `pocketlm rollback`")
    keys.verify(keys.load_public(root / TRUSTED), body, sig, f"installed version '{version_dir.name}'")
    return json.loads(body)


def verify_install(root: str | Path, tensors: bool = True) -> dict:
    """Re-check the active version: signature, every file's hash and (with `tensors`) every tensor's.
    Returns a summary; raises IntegrityError naming what differs."""
    root = Path(root)
    if not is_install_dir(root):
        raise DataError(f"'{root}' is not a pocketlm install directory", "install into it with `pocketlm install`")
    version_dir = active_dir(root)
    manifest = check_signature(version_dir, root)
    problems = verify_files(version_dir, manifest, tensors=tensors)
    if problems:
        raise IntegrityError(f"installed version {manifest['version']} in '{root}' was modified: {problems[0]}"
                             + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
                             "reinstall the package, or `pocketlm rollback --into DIR`")
    return {"version": manifest["version"], "name": manifest["name"], "files": len(manifest["files"]),
            "tensors": len(manifest["tensors"]), "manifest": manifest_hash(manifest), "path": str(version_dir)}


def install(package: str | Path, into: str | Path, trust: str | Path, *, allow_downgrade: bool = False,
            enc_key: bytes | None = None, activate: bool = True) -> dict:
    """Install `package` (full or delta) into `into` and make it active (unless `activate` is False)."""
    root = Path(into)
    keys.load_public(trust)  # a missing or malformed key fails in one line, before anything else
    pinned = root / TRUSTED
    if pinned.is_file() and pinned.read_bytes() != Path(trust).read_bytes():
        raise IntegrityError(f"'{root}' trusts another signing key than '{trust}'",
                             f"pass the key it was first installed with ({pinned}), or install into a new directory")
    with Package(package, trust, enc_key=enc_key) as pkg:
        m = pkg.manifest
        current = active_dir(root) if is_install_dir(root) else None
        current_m = check_signature(current, root) if current is not None else None
        version = parse_version(m["version"])
        if (root / VERSIONS / m["version"]).exists():
            raise ConfigError(f"version {m['version']} is already installed in '{root}'",
                              "activate it with `pocketlm rollback --to`, or pack a new version")
        if current_m is not None and version < parse_version(current_m["version"]) and not allow_downgrade:
            raise IntegrityError(f"package version {m['version']} is older than the active {current_m['version']}",
                                 "refused as a rollback attack; pass --allow-downgrade if you mean it")
        if m["kind"] == "delta":
            if current_m is None or m["base_manifest"] != manifest_hash(current_m):
                have = "nothing installed" if current_m is None else f"active {current_m['version']}"
                raise IntegrityError(f"the delta applies to version {m['base_version']} "
                                     f"(manifest {m['base_manifest'][:12]}), not to {have}",
                                     "install the full package, or the delta made from the active version")
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".staging-*"):  # from an install that was killed
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
        try:
            _rebuild(pkg, staging, current)
            problems = verify_files(staging, m, tensors=True)
            if problems:
                raise IntegrityError(f"the rebuilt version {m['version']} does not match its manifest: {problems[0]}",
                                     "the package or the base is damaged; install the full package")
            (staging / "manifest.json").write_bytes(pkg._raw("manifest.json"))
            (staging / "manifest.sig").write_bytes(pkg._raw("manifest.sig"))
            _fsync_tree(staging)
            (root / VERSIONS).mkdir(exist_ok=True)
            target = root / VERSIONS / m["version"]
            staging.rename(target)
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise DataError(f"installing into '{root}' failed: {e.strerror or e}",
                            "free disk space (or fix permissions) and retry; the active version is unchanged") from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if not (root / TRUSTED).is_file():  # the first install pins the key (checked above for later ones)
            shutil.copyfile(trust, root / TRUSTED)
        if activate:
            switch(root, m["version"])
    return {"version": m["version"], "kind": m["kind"], "path": str(target), "active": activate}


def _rebuild(pkg: Package, staging: Path, base_dir: Path | None) -> None:
    """Write every file of the package's manifest into `staging`, from the package and (for a delta)
    the base version's files."""
    m = pkg.manifest
    carried = {n.split("/", 1)[1] for n in pkg.members if n.startswith("data/")}
    headers = {n.split("/", 1)[1] for n in pkg.members if n.startswith("header/")}
    base_m = read_manifest(base_dir) if base_dir is not None else None
    by_hash = {t["sha256"]: t for t in (base_m or {"tensors": {}})["tensors"].values()}
    slices: dict[str, list[tuple[int, str]]] = {}  # tensor key → (slice index, member) of the delta's slices
    for n in pkg.members:
        if n.startswith("chunk/"):
            key, index = n[len("chunk/"):].rsplit("/", 1)
            slices.setdefault(key, []).append((int(index), n))
    for rel, entry in m["files"].items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise IntegrityError(f"the manifest names a file outside the model directory ({rel})",
                                 "refused; the package is not a pocketlm package")
        dst = staging / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel in carried:
            with open(dst, "wb") as out:
                shutil.copyfileobj(pkg.open(f"data/{rel}"), out, CHUNK)
        elif rel in headers:
            tensors = sorted((t for t in m["tensors"].values() if t["file"] == rel), key=lambda t: t["start"])
            with open(dst, "wb") as out:
                out.write(pkg.read_all(f"header/{rel}"))
                for t in tensors:
                    key = f"{rel}:{t['name']}"
                    out.write(_tensor_bytes(pkg, key, t, base_dir, base_m, by_hash, slices.get(key, [])))
        elif base_m is not None and base_m["files"].get(rel, {}).get("sha256") == entry["sha256"]:
            shutil.copyfile(base_dir / rel, dst)
        else:
            raise IntegrityError(f"file {rel} is neither in the package nor unchanged in the base",
                                 "install the full package")


def _tensor_bytes(pkg: Package, key: str, t: dict, base_dir: Path | None, base_m: dict | None,
                  by_hash: dict, slices: list[tuple[int, str]]) -> bytes:
    """A tensor of the new version: carried whole, or the base's bytes (the same tensor anywhere in the
    base, or this key's old bytes with the carried slices patched in)."""
    if f"tensor/{key}" in pkg.members:
        return pkg.read_all(f"tensor/{key}")
    src = by_hash.get(t["sha256"])
    patched = src is None
    if patched:
        src = (base_m or {"tensors": {}})["tensors"].get(key)
        if src is None:
            raise IntegrityError(f"tensor {key} is neither in the delta nor in the base", "install the full package")
    with open(base_dir / src["file"], "rb") as f:
        f.seek(src["start"])
        data = bytearray(f.read(src["end"] - src["start"]))
    if patched:
        for index, name in slices:
            at = index * TENSOR_CHUNK
            piece = pkg.read_all(name)
            data[at:at + len(piece)] = piece
    return bytes(data)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def switch(root: Path, version: str) -> None:
    """Point `active` at `version` with one rename, and record it in the history."""
    link = root / f".{ACTIVE}.new"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(Path(VERSIONS) / version, link)
    os.replace(link, root / ACTIVE)
    history = _history(root)
    atomic_write_text(root / HISTORY, json.dumps([*(v for v in history if v != version), version]) + "\n")


def _history(root: Path) -> list[str]:
    try:
        return json.loads((root / HISTORY).read_text())
    except (OSError, ValueError):
        return []


def rollback(root: str | Path, to: str | None = None) -> dict:
    """Make the previous version (or `to`) active again, after verifying it."""
    root = Path(root)
    if not is_install_dir(root):
        raise DataError(f"'{root}' is not a pocketlm install directory", "install into it with `pocketlm install`")
    current = active_dir(root).name
    if to is None:
        older = [v for v in _history(root)[:-1] if (root / VERSIONS / v).is_dir() and v != current]
        if not older:
            raise ConfigError(f"'{root}' has no earlier version to roll back to", "install one first")
        to = older[-1]
    target = root / VERSIONS / to
    if not target.is_dir():
        have = ", ".join(sorted(p.name for p in (root / VERSIONS).iterdir()))
        raise ConfigError(f"version {to} is not installed in '{root}'", f"choose one of: {have}")
    manifest = check_signature(target, root)
    problems = verify_files(target, manifest, tensors=False)
    if problems:
        raise IntegrityError(f"version {to} was modified: {problems[0]}", "reinstall it from its package")
    switch(root, to)
    return {"from": current, "to": to}
