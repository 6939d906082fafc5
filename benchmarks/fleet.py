"""Fleet deployment: tamper cases, delta sizes, install cost, and shadow → gate → promote → rollback.

1. Tamper: N ways to break a package or an install of `small` (flipped byte in a tensor, in the
   manifest, in the signature; another signer; a truncated package; a delta on the wrong base; an
   older version; a full disk; an install killed mid-way; a modified installed file); each must be
   rejected with a one-line error and leave the active version loading and verifying.
2. Deltas for two realistic updates vs the full package: `small` with its last 4 layers retrained
   (next-token loss on the train split, the rest frozen), and `moe` with 2 experts of every layer
   retrained the same way. Install time and peak RSS (own process, 2 threads) for full and delta.
3. SmolLM2-135M-Instruct RTN int8 (incumbent, active) and RTN int4 g32 (candidate, installed
   inactive): `pocketlm shadow` on chat and arithmetic requests; `promote` with a strict gate file
   (refused: the incumbent stays) and with a release gate file (promoted); then `rollback`, whose
   greedy outputs must equal the incumbent's from before.

    python benchmarks/fleet.py [--threads 2] [--shadow-requests 32]
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from common import SHARED, machine, write_result  # noqa: E402
from real_model import CHAT_PROMPTS, ensure_model  # noqa: E402

console = Console(width=160)
# Two gate files over one shadow report: "strict" asks for token-identical answers (the example,
# which a re-quantized model is not expected to meet) and must keep the incumbent; "release" bounds the
# loss the way a deployment would (task accuracy, KL, perplexity, latency) and promotes.
GATES = {"strict": ["agreement >= 0.95", "ppl_ratio <= 1.02"],
         "release": ["task_accuracy >= incumbent - 0.05", "kl_mean <= 0.05", "ppl_ratio <= 1.02",
                     "p95_latency_ms <= 1.1 * incumbent"]}
CLI = [sys.executable, "-m", "pocketlm.cli"]


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([*CLI, *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"pocketlm {' '.join(args)} failed: {r.stderr[-2000:]}")
    return r


def timed_install(pkg: Path, into: Path, trust: Path, threads: int) -> dict:
    """Install in its own process: wall seconds and that process's peak RSS."""
    code = ("import resource, sys, time, torch; torch.set_num_threads(int(sys.argv[4])); "
            "from pocketlm.fleet.install import install; t = time.perf_counter(); "
            "install(sys.argv[1], sys.argv[2], sys.argv[3]); "
            "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    r = subprocess.run([sys.executable, "-c", code, str(pkg), str(into), str(trust), str(threads)],
                       capture_output=True, text=True, check=True)
    wall, rss = map(float, r.stdout.split())
    return {"install_s": wall, "install_peak_rss_mb": rss}


def retrain(model, tok, params, steps: int = 8) -> None:
    """A few steps of next-token loss on the train split, only on `params` (a realistic small update)."""
    from pocketlm.compress.distill.trainer import packed_sequences
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    data = packed_sequences(tok, (SHARED / "corpus" / "train.txt").read_text()[:400_000], 256)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)  # decay would move the frozen slices too
    model.train()
    for i in range(steps):
        batch = data[i * 4:(i + 1) * 4]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def retrain_experts(model, tok, experts: tuple[int, ...], steps: int = 8) -> None:
    """Retrain `experts` of every MoE layer: gradients of the fused tensors are masked to their slices."""
    from pocketlm.moe.block import moe_blocks
    fused = [t for _, _, b in moe_blocks(model) for t in (b.experts.gate_up_proj, b.experts.down_proj)]
    mask = torch.zeros(fused[0].shape[0], 1, 1)
    mask[list(experts)] = 1
    hooks = [t.register_hook(lambda g: g * mask) for t in fused]
    retrain(model, tok, fused, steps)
    for h in hooks:
        h.remove()


def section_deltas(work: Path, priv: Path, pub: Path, threads: int) -> list[dict]:
    import pocketlm
    from pocketlm.fleet import package
    rows = []
    for label, name, update in (("small: last 4 layers retrained", "small", "layers"),
                                ("moe: 2 experts per layer retrained", "moe", "experts")):
        src = str(SHARED / "models" / name) if name == "small" else name
        model, tok = pocketlm.load(src, moe=False)
        pocketlm.save(model, tok, work / f"{name}-v1")
        if update == "layers":
            retrain(model, tok, [p for layer in model.model.layers[-4:] for p in layer.parameters()])
        else:
            retrain_experts(model, tok, (0, 1))
        pocketlm.save(model, tok, work / f"{name}-v2")
        full1 = work / f"{name}-v1.pkg"
        full2 = work / f"{name}-v2.pkg"
        package.pack(work / f"{name}-v1", full1, priv, version="1", name=name)
        package.pack(work / f"{name}-v2", full2, priv, version="2", name=name)
        delta = work / f"{name}-1-2.delta"
        t0 = time.perf_counter()
        package.diff(full1, full2, delta, priv)
        diff_s = time.perf_counter() - t0
        dev_full, dev_delta = work / f"dev-{name}-full", work / f"dev-{name}-delta"
        first = timed_install(full1, dev_delta, pub, threads)
        full = timed_install(full2, dev_full, pub, threads)
        part = timed_install(delta, dev_delta, pub, threads)
        same = (dev_full / "versions" / "2" / "model.safetensors").read_bytes() == \
            (dev_delta / "versions" / "2" / "model.safetensors").read_bytes()
        rows.append({"update": label, "full_mb": full2.stat().st_size / 2**20, "delta_mb": delta.stat().st_size / 2**20,
                     "delta_share": delta.stat().st_size / full2.stat().st_size, "diff_s": diff_s,
                     "full_install": full, "delta_install": part, "first_install": first,
                     "delta_result_identical": same})
        console.print(f"  {label}: full {rows[-1]['full_mb']:.1f} MB, delta {rows[-1]['delta_mb']:.2f} MB "
                      f"({rows[-1]['delta_share']:.1%}); install full {full['install_s']:.2f} s / delta "
                      f"{part['install_s']:.2f} s")
    return rows


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 1]))


def section_tamper(work: Path, priv: Path, pub: Path, other_pub: Path) -> list[dict]:
    """Each case: the attempt, whether it was refused with one line, and whether the active version still
    loads and verifies afterwards."""
    import tarfile
    from unittest import mock

    import pocketlm
    from pocketlm.errors import PocketError
    from pocketlm.fleet import install as inst
    from pocketlm.fleet import package
    v1, v2, v3 = (work / f"small-v{i}.pkg" for i in (1, 2, 3))  # 1 and 2 from the delta section
    package.pack(work / "small-v2", v3, priv, version="3", name="small")  # the files of 2, a later version
    d23 = work / "small-2-3.delta"
    package.diff(v2, v3, d23, priv)
    with package.Package(v2, pub) as p:
        t = next(iter(p.manifest["tensors"].values()))
    with tarfile.open(v2) as tf:
        offsets = {m.name: m.offset_data for m in tf.getmembers()}

    def copy_with(name: str, edit) -> Path:
        out = work / f"tamper-{name}.pkg"
        shutil.copyfile(v2, out)
        edit(out)
        return out

    cases = {
        "flipped byte in a tensor": (copy_with("tensor", lambda f: flip(f, offsets["data/model.safetensors"]
                                                                         + t["start"] + 7)), pub, {}),
        "flipped byte in the manifest": (copy_with("manifest", lambda f: flip(f, offsets["manifest.json"] + 50)), pub, {}),
        "flipped byte in the signature": (copy_with("sig", lambda f: flip(f, offsets["manifest.sig"] + 5)), pub, {}),
        "signed by another key (pinned device)": (v2, other_pub, {}),
        "signed by another key (new device)": (v2, other_pub, {"fresh": True}),
        "truncated package": (copy_with("trunc", lambda f: os.truncate(f, f.stat().st_size * 2 // 3)), pub, {}),
        "delta on the wrong base": (d23, pub, {}),
        "older version (rollback attack)": (None, pub, {}),
        "disk full during install": (v2, pub, {"disk_full": True}),
    }
    rows = []
    for label, (pkg, trust, how) in cases.items():
        root = work / f"dev-tamper-{len(rows)}"
        if how.get("fresh"):  # nothing installed: the signature check alone must refuse it
            try:
                inst.install(pkg, root, trust)
                error = None
            except PocketError as e:
                error = str(e)
            rows.append({"case": label, "rejected": error is not None and "signature" in error, "error": error,
                         "active_untouched": not (root / "active").exists()})
            continue
        inst.install(v2 if label.startswith("older") else v1, root, pub)
        before = {p.name: p.stat().st_mtime_ns for p in (root / "versions").rglob("*") if p.is_file()}
        target = v1 if label.startswith("older") else pkg
        error = None
        try:
            if how.get("disk_full"):
                with mock.patch("shutil.copyfileobj", side_effect=OSError(errno.ENOSPC, "No space left on device")):
                    inst.install(target, root, trust)
            else:
                inst.install(target, root, trust)
        except PocketError as e:
            error = str(e)
        after = {p.name: p.stat().st_mtime_ns for p in (root / "versions").rglob("*") if p.is_file()}
        ok = inst.verify_install(root)["version"] == ("2" if label.startswith("older") else "1")
        pocketlm.load(root)
        rows.append({"case": label, "rejected": error is not None and "\n" not in error, "error": error,
                     "active_untouched": ok and before == after and not list(root.glob(".staging-*"))})
    # killed mid-way: SIGKILL once the staging slot appears
    root = work / "dev-tamper-kill"
    inst.install(v1, root, pub)
    code = "import sys; from pocketlm.fleet.install import install; install(sys.argv[1], sys.argv[2], sys.argv[3])"
    proc = subprocess.Popen([sys.executable, "-c", code, str(v2), str(root), str(pub)])
    deadline = time.time() + 120
    while not list(root.glob(".staging-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    version = inst.verify_install(root)["version"]
    pocketlm.load(root)
    rows.append({"case": "install killed mid-way (SIGKILL)", "rejected": True, "error": f"killed; active is {version}",
                 "active_untouched": version in ("1", "2")})
    # a modified installed file: load and verify refuse it, rollback recovers
    root = work / "dev-tamper-edit"
    inst.install(v1, root, pub)
    inst.install(v2, root, pub)
    flip(root / "versions" / "2" / "model.safetensors", 100_000)
    refused = []
    for check in (lambda: pocketlm.load(root), lambda: inst.verify_install(root)):
        try:
            check()
            refused.append(None)
        except PocketError as e:
            refused.append(str(e))
    inst.rollback(root)
    rows.append({"case": "installed file modified (load and verify)", "rejected": all(refused), "error": refused[0],
                 "active_untouched": inst.verify_install(root)["version"] == "1"})
    for r in rows:
        console.print(f"  {r['case']}: {'rejected' if r['rejected'] else 'ACCEPTED'}; "
                      f"active {'intact' if r['active_untouched'] else 'DAMAGED'} — {(r['error'] or '')[:110]}")
    return rows


def section_shadow(work: Path, priv: Path, pub: Path, args) -> dict:
    import pocketlm
    from pocketlm.compress import RTNConfig, compress_
    from pocketlm.fleet import install as inst
    from pocketlm.fleet import package
    from pocketlm.runtime import Generator
    ensure_model()
    for label, cfg in (("int8", RTNConfig(bits=8, head=True)), ("int4", RTNConfig(bits=4, group_size=32, head=True))):
        model, tok = pocketlm.load("smollm2")
        compress_(model, cfg, tok=tok, show_progress=False)
        pocketlm.save(model, tok, work / f"smollm2-{label}")
        del model
    package.pack(work / "smollm2-int8", work / "s-int8.pkg", priv, version="1", name="smollm2")
    package.pack(work / "smollm2-int4", work / "s-int4.pkg", priv, version="2", name="smollm2")
    root = work / "dev-smollm2"
    inst.install(work / "s-int8.pkg", root, pub)
    inst.install(work / "s-int4.pkg", root, pub, activate=False)
    arith = [json.loads(x) for x in (SHARED / "tasks" / "arith_test.jsonl").read_text().splitlines()]
    n_chat = args.shadow_requests // 2
    reqs = [{"messages": [{"role": "user", "content": q}]} for q in CHAT_PROMPTS[:n_chat]]
    reqs += [{"messages": [{"role": "user", "content": it["question"]}], "answer": it["answer"]}
             for it in arith[:args.shadow_requests - len(reqs)]]
    (work / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reqs))
    for name, gates in GATES.items():
        (work / f"{name}.yaml").write_text("".join(f"- {g}\n" for g in gates))
    gen = Generator(*pocketlm.load(root))
    before = [gen.generate(p, 24) for p in CHAT_PROMPTS[:4]]
    del gen
    t0 = time.perf_counter()
    cli("shadow", "--incumbent", str(root), "--candidate", str(root / "versions" / "2"), "--requests",
        str(work / "requests.jsonl"), "-o", str(work / "shadow.json"), "--max-tokens", str(args.max_tokens),
        "--threads", str(args.threads))
    shadow_s = time.perf_counter() - t0
    from pocketlm.fleet.gates import check_gates, load_gates, read_report
    report = read_report(work / "shadow.json")
    runs = {}
    for name in GATES:  # strict first: its refusal must leave version 1 active
        passed, results = check_gates(report, load_gates(work / f"{name}.yaml"))
        gate = cli("gate", str(work / "shadow.json"), "--gates", str(work / f"{name}.yaml"), check=False)
        promote = cli("promote", "--into", str(root), "--version", "2", "--report", str(work / "shadow.json"),
                      "--gates", str(work / f"{name}.yaml"), check=False)
        runs[name] = {"gates": [{"gate": g.gate, "value": g.value, "threshold": g.threshold, "passed": g.passed,
                                 "reason": g.reason} for g in results],
                      "all_passed": passed, "gate_exit": gate.returncode, "promote_exit": promote.returncode,
                      "active_after": inst.verify_install(root)["version"]}
    promoted = inst.verify_install(root)["version"] == "2"
    if promoted:
        gen = Generator(*pocketlm.load(root))
        promoted_outputs = [gen.generate(p, 24) for p in CHAT_PROMPTS[:4]]
        del gen
        cli("rollback", "--into", str(root))
    gen = Generator(*pocketlm.load(root))
    after = [gen.generate(p, 24) for p in CHAT_PROMPTS[:4]]
    return {"requests": len(reqs), "shadow_s": shadow_s, "report": {k: v for k, v in report.items() if k != "rows"},
            "runs": runs, "promoted": promoted, "active_at_end": inst.verify_install(root)["version"],
            "promoted_outputs_differ": promoted and promoted_outputs != before,
            "rollback_outputs_identical": before == after}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shadow-requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from pocketlm.fleet import keys
    t0 = time.perf_counter()
    result = {"settings": vars(args), "machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        priv, pub = keys.generate(work / "release")
        _, other_pub = keys.generate(work / "attacker")
        console.rule("deltas")
        result["deltas"] = section_deltas(work, priv, pub, args.threads)
        console.rule("tamper")
        result["tamper"] = section_tamper(work, priv, pub, other_pub)
        n = len(result["tamper"])
        result["tamper_summary"] = {"cases": n, "rejected": sum(r["rejected"] for r in result["tamper"]),
                                    "active_untouched": sum(r["active_untouched"] for r in result["tamper"])}
        console.rule("shadow → gate → promote → rollback")
        result["shadow"] = section_shadow(work, priv, pub, args)
    result["wall_s"] = time.perf_counter() - t0
    t = Table(title="deltas vs full packages")
    for c in ("update", "full MB", "delta MB", "share", "install full s", "install delta s", "peak RSS MB (delta)",
              "identical"):
        t.add_column(c, justify="left" if c == "update" else "right")
    for r in result["deltas"]:
        t.add_row(r["update"], f"{r['full_mb']:.1f}", f"{r['delta_mb']:.2f}", f"{r['delta_share']:.1%}",
                  f"{r['full_install']['install_s']:.2f}", f"{r['delta_install']['install_s']:.2f}",
                  f"{r['delta_install']['install_peak_rss_mb']:.0f}", str(r["delta_result_identical"]))
    console.print(t)
    s = result["tamper_summary"]
    console.print(f"tamper: {s['cases']} cases, {s['rejected']} rejected, active intact in {s['active_untouched']}")
    sh = result["shadow"]
    for name, run in sh["runs"].items():
        t = Table(title=f"{name} gates: SmolLM2 int4 g32 candidate vs int8 incumbent")
        for c in ("gate", "value", "threshold", "result"):
            t.add_column(c)
        for g in run["gates"]:
            t.add_row(g["gate"], f"{g['value']:.4g}" if g["value"] is not None else "-",
                      f"{g['threshold']:.4g}" if g["threshold"] is not None else "-", "pass" if g["passed"] else "FAIL")
        console.print(t)
        console.print(f"  promote exit {run['promote_exit']}, active then {run['active_after']}")
    console.print(f"at the end active {sh['active_at_end']}; outputs after rollback identical to before: "
                  f"{sh['rollback_outputs_identical']}")
    console.print(f"wrote {write_result('fleet', result)}")


if __name__ == "__main__":
    main()
