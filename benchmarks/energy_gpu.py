"""The measured energy path on an NVIDIA GPU: `pocketlm.evaluate` on CUDA reads NVML's total-energy counter.

Runs the embedded models in fp32 and bf16 on the GPU (baseline: the fp32 model) and records joules
per token with `kind: measured`, CUDA peak memory and speed. Needs a CUDA device and nvidia-ml-py.

    python benchmarks/energy_gpu.py [--models tiny reasoner moe]
"""
from __future__ import annotations

import argparse

import torch
from rich.console import Console

import pocketlm
from pocketlm.eval.report import render_table
from common import write_result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["tiny", "reasoner", "moe"])
    ap.add_argument("--tokens", type=int, default=65536)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("energy_gpu.py needs a CUDA device")
    protocol = pocketlm.EvalProtocol(tokens=args.tokens)
    reports = []
    for name in args.models:
        base = pocketlm.load(name, dtype="float32", device="cuda")
        for dtype in ("float32", "bfloat16"):
            model, tok = base if dtype == "float32" else pocketlm.load(name, dtype=dtype, device="cuda")
            reports.append(pocketlm.evaluate(model, tok, protocol, baseline=base, label=f"{name}-{dtype}-cuda",
                                             show_progress=False).to_dict())
        del base
        torch.cuda.empty_cache()
    Console(width=180).print(render_table(reports))
    rows = [{"label": r["label"], "ppl": r["quality"]["ppl"], "kl": r["quality"]["kl"],
             "decode_tok_s_b1": r["efficiency"]["decode_tok_s"],
             "decode_tok_s_b8": r["efficiency"]["decode_tok_s_batch"].get("8"),
             "cuda_max_allocated_mb": r["efficiency"]["cuda_max_allocated_mb"], **{f"energy_{k}": v for k, v in r["energy"].items()}}
            for r in reports]
    path = write_result("energy_gpu", {"protocol": reports[0]["protocol"], "rows": rows, "reports": reports})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
