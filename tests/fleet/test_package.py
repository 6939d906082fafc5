"""Signed packages, deltas, install, rollback and verify — and every tamper case, each rejected with
the installed model untouched."""
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pocketlm
from pocketlm.errors import ConfigError, DataError, IntegrityError, PocketError
from pocketlm.fleet import install as inst
from pocketlm.fleet import keys, package
from pocketlm.io import ASSETS
from pocketlm.runtime import Generator
from test_cli import run

TINY = ASSETS / "models" / "tiny"


def changed_copy(src: Path, dst: Path, layers: tuple[int, ...], delta: float = 0.01) -> Path:
    """A copy of `src` whose given layers' q_proj weights moved (a stand-in for a KD update)."""
    shutil.copytree(src, dst)
    st = load_file(src / "model.safetensors")
    for i in layers:
        k = f"model.layers.{i}.self_attn.q_proj.weight"
        st[k] = st[k] + delta
    save_file(st, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def snapshot(root: Path) -> dict:
    """Every file under `root` and where `active` points: what a rejected install must not change."""
    files = {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in root.rglob("*") if p.is_file() and not p.is_symlink()}
    return {"files": files, "active": os.readlink(root / "active")}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Keys, three versions of tiny (v2: layer 1 changed; v3: layer 0 too), their packages and deltas."""
    d = tmp_path_factory.mktemp("release")
    priv, pub = keys.generate(d / "rel")
    _, other_pub = keys.generate(d / "other")
    v1 = d / "v1"
    shutil.copytree(TINY, v1)
    v2 = changed_copy(v1, d / "v2", (1,))
    v3 = changed_copy(v2, d / "v3", (0,))
    pk = {}
    for v, art in (("1", v1), ("2", v2), ("3", v3)):
        package.pack(art, d / f"v{v}.pkg", priv, version=v, name="tiny")
        pk[v] = d / f"v{v}.pkg"
    package.diff(pk["1"], pk["2"], d / "d12.pkg", priv)
    package.diff(pk["2"], pk["3"], d / "d23.pkg", priv)
    return {"dir": d, "priv": priv, "pub": pub, "other_pub": other_pub, "pkg": pk, "d12": d / "d12.pkg",
            "d23": d / "d23.pkg", "arts": {"1": v1, "2": v2, "3": v3}}


def installed(tmp_path, release, version="1") -> Path:
    root = tmp_path / "device"
    inst.install(release["pkg"][version], root, release["pub"])
    return root


def test_delta_carries_only_changed_tensors_and_rebuilds_the_full_version(release, tmp_path):
    with package.Package(release["d12"], release["pub"]) as d:
        tensors = [n for n in d.members if n.startswith("tensor/")]
        assert tensors == ["tensor/model.safetensors:model.layers.1.self_attn.q_proj.weight"]
        assert not any(n.startswith("data/") for n in d.members)  # config, tokenizer unchanged
    assert release["d12"].stat().st_size < 0.1 * release["pkg"]["2"].stat().st_size
    root = installed(tmp_path, release)
    inst.install(release["d12"], root, release["pub"])
    v2 = root / "versions" / "2"
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (v2 / name).read_bytes() == (release["arts"]["2"] / name).read_bytes()
    assert inst.verify_install(root)["version"] == "2"


def test_rollback_restores_identical_outputs(release, tmp_path):
    root = installed(tmp_path, release)
    first = Generator(*pocketlm.load(root)).generate("In the beginning", 16)
    inst.install(release["d12"], root, release["pub"])
    assert Generator(*pocketlm.load(root)).generate("In the beginning", 16) != first
    assert inst.rollback(root) == {"from": "2", "to": "1"}
    assert Generator(*pocketlm.load(root)).generate("In the beginning", 16) == first


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def member_offset(pkg: Path, name: str) -> int:
    with tarfile.open(pkg) as t:
        return t.getmember(name).offset_data


def tampered(release, tmp_path, how: str) -> tuple[Path, Path]:
    """(package to install, trusted key) for one tamper case."""
    src = release["pkg"]["2"]
    pkg = tmp_path / f"{how}.pkg"
    shutil.copyfile(src, pkg)
    trust = release["pub"]
    if how == "tensor byte":
        with package.Package(src, trust) as p:
            t = p.manifest["tensors"]["model.safetensors:model.layers.1.self_attn.q_proj.weight"]
        flip(pkg, member_offset(pkg, "data/model.safetensors") + t["start"] + 5)
    elif how == "manifest byte":
        flip(pkg, member_offset(pkg, "manifest.json") + 40)
    elif how == "signature byte":
        flip(pkg, member_offset(pkg, "manifest.sig") + 3)
    elif how == "wrong key":
        trust = release["other_pub"]
    elif how == "truncated":
        pkg.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    elif how == "delta on the wrong base":
        shutil.copyfile(release["d23"], pkg)
    return pkg, trust


EXPECTED = {"tensor byte": "does not match its manifest: file model.safetensors differs",
            "manifest byte": "signature", "signature byte": "signature", "wrong key": "trusts another signing key",
            "truncated": "truncated", "delta on the wrong base": "the delta applies to version 2"}
CASES = list(EXPECTED)


@pytest.mark.parametrize("how", CASES)
def test_tampered_packages_are_rejected_and_the_install_is_untouched(release, tmp_path, how):
    root = installed(tmp_path, release)
    before = snapshot(root)
    pkg, trust = tampered(release, tmp_path, how)
    with pytest.raises(PocketError) as e:
        inst.install(pkg, root, trust)
    assert isinstance(e.value, (IntegrityError, DataError))
    assert EXPECTED[how] in str(e.value) and "\n" not in str(e.value)
    assert snapshot(root) == before
    assert inst.verify_install(root)["version"] == "1"


def test_an_older_version_is_refused_unless_asked(release, tmp_path):
    root = installed(tmp_path, release, "2")
    before = snapshot(root)
    with pytest.raises(IntegrityError, match="older than the active 2"):
        inst.install(release["pkg"]["1"], root, release["pub"])
    assert snapshot(root) == before
    inst.install(release["pkg"]["1"], root, release["pub"], allow_downgrade=True)
    assert inst.verify_install(root)["version"] == "1"


def test_a_full_disk_fails_cleanly(release, tmp_path, monkeypatch):
    root = installed(tmp_path, release)
    before = snapshot(root)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(shutil, "copyfileobj", full)
    with pytest.raises(DataError, match="No space left on device.*active version is unchanged"):
        inst.install(release["pkg"]["2"], root, release["pub"])
    assert snapshot(root) == before and not list(root.glob(".staging-*"))


def test_an_install_killed_midway_leaves_the_active_version_working(release, tmp_path):
    root = installed(tmp_path, release)
    code = ("import sys; from pocketlm.fleet.install import install; "
            "install(sys.argv[1], sys.argv[2], sys.argv[3])")
    proc = subprocess.Popen([sys.executable, "-c", code, str(release["pkg"]["2"]), str(root), str(release["pub"])])
    deadline = time.time() + 60
    while not list(root.glob(".staging-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert inst.verify_install(root)["version"] in ("1", "2")  # killed before or after the switch: valid either way
    pocketlm.load(root)
    inst.install(release["pkg"]["3"], root, release["pub"])  # the next install clears the stale slot
    assert not list(root.glob(".staging-*")) and inst.verify_install(root)["version"] == "3"


def test_a_modified_install_is_refused_by_load_and_verify(release, tmp_path):
    root = installed(tmp_path, release)
    inst.install(release["d12"], root, release["pub"])
    flip(root / "versions" / "2" / "model.safetensors", 4096)
    with pytest.raises(IntegrityError, match="was modified: file model.safetensors differs"):
        pocketlm.load(root)
    with pytest.raises(IntegrityError):
        inst.verify_install(root)
    inst.rollback(root)
    pocketlm.load(root)


def test_encrypted_packages_need_the_right_key(release, tmp_path):
    key = os.urandom(32)
    pkg = tmp_path / "enc.pkg"
    package.pack(release["arts"]["1"], pkg, release["priv"], version="1", encrypt_key=key)
    assert b"LlamaForCausalLM" not in pkg.read_bytes()  # config.json is not readable in the package
    with pytest.raises(ConfigError, match="encrypted"):
        inst.install(pkg, tmp_path / "a", release["pub"])
    with pytest.raises(IntegrityError, match="does not decrypt"):
        inst.install(pkg, tmp_path / "b", release["pub"], enc_key=os.urandom(32))
    assert not (tmp_path / "b" / "active").exists()
    inst.install(pkg, tmp_path / "c", release["pub"], enc_key=key)
    assert inst.verify_install(tmp_path / "c")["version"] == "1"


def test_cli_pack_install_verify_and_bad_input(release, tmp_path, capsys):
    pkg = tmp_path / "cli.pkg"
    code, out, err = run(["pack", str(release["arts"]["1"]), "-o", str(pkg), "--key", str(release["priv"]),
                          "--version", "1"], capsys)
    assert code == 0, err
    code, out, err = run(["install", str(pkg), "--into", str(tmp_path / "dev"), "--trust", str(release["pub"])], capsys)
    assert code == 0 and "(active)" in out, err
    code, out, err = run(["verify", str(tmp_path / "dev")], capsys)
    assert code == 0 and "38 tensors verified" in out, err
    code, out, err = run(["install", str(release["pkg"]["2"]), "--into", str(tmp_path / "dev"),
                          "--trust", str(release["other_pub"])], capsys)
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1 and "trusts another signing key" in err
    code, out, err = run(["pack", str(tmp_path / "nope"), "-o", str(tmp_path / "x.pkg"), "--key",
                          str(release["priv"]), "--version", "1"], capsys)
    assert code == 2 and "not a model artifact" in err and not (tmp_path / "x.pkg").exists()


def test_a_package_signed_by_another_key_is_refused_on_a_new_device(release, tmp_path):
    with pytest.raises(IntegrityError, match="signature of package 'v1.pkg' does not verify"):
        inst.install(release["pkg"]["1"], tmp_path / "new", release["other_pub"])
    assert not (tmp_path / "new" / "active").exists()


def test_a_delta_carries_only_the_changed_slices_of_a_large_tensor(release, tmp_path):
    """E.g. two retrained experts of a fused expert tensor: only their slices travel."""
    v2 = tmp_path / "rows"
    shutil.copytree(release["arts"]["1"], v2)
    st = load_file(v2 / "model.safetensors")
    st["model.embed_tokens.weight"][:3] += 0.5  # three rows: one 64 KiB slice
    save_file(st, v2 / "model.safetensors", metadata={"format": "pt"})
    package.pack(v2, tmp_path / "rows.pkg", release["priv"], version="2")
    package.diff(release["pkg"]["1"], tmp_path / "rows.pkg", tmp_path / "rows.delta", release["priv"])
    with package.Package(tmp_path / "rows.delta", release["pub"]) as d:
        assert [n for n in d.members if n.startswith(("chunk/", "tensor/"))] == \
            ["chunk/model.safetensors:model.embed_tokens.weight/0"]
    root = installed(tmp_path, release)
    inst.install(tmp_path / "rows.delta", root, release["pub"])
    assert (root / "versions" / "2" / "model.safetensors").read_bytes() == (v2 / "model.safetensors").read_bytes()


@pytest.mark.parametrize("encrypted", [False, True])
def test_range_reads_cross_chunk_boundaries(release, tmp_path, encrypted):
    art = tmp_path / "art"
    art.mkdir()
    shutil.copyfile(TINY / "config.json", art / "config.json")
    data = os.urandom(2 * package.CHUNK + 123)  # three encryption chunks, the last one short
    (art / "blob.bin").write_bytes(data)
    key = os.urandom(32) if encrypted else None
    package.pack(art, tmp_path / "p.pkg", release["priv"], version="1", encrypt_key=key)
    with package.Package(tmp_path / "p.pkg", release["pub"], enc_key=key) as p:
        for a, b in ((0, 10), (package.CHUNK - 4, package.CHUNK + 4), (2 * package.CHUNK, len(data)), (7, len(data))):
            assert p.read_range("data/blob.bin", a, b) == data[a:b]
        assert p.read_all("data/blob.bin") == data
