"""Why Wanda and SparseGPT gain less over magnitude pruning on `small` than on 7B-class models.

Wanda scores |W_ij|·‖X_j‖, so it differs from magnitude only where input channels differ in scale;
SparseGPT also uses their correlations and updates the weights it keeps. 7B-class models have a few hidden channels whose activations
are tens of times the others', read by small weights: magnitude pruning removes those weights and
the calibrated methods keep them. This script measures how far `small` is from that, and then
makes that pattern in it without changing its function:

- per prunable matrix of the reference model: max/median of the input column norms ‖X_j‖, and the
  share of weights on which Wanda's 50% mask equals per-row magnitude's;
- function-equivalent copies with the k strongest hidden channels made outliers: those channels' RMSNorm weights
  × s and the columns of the q/k/v and gate/up weights reading them ÷ s (same logits, same dense ppl;
  large activations, small weights);
- on each: 50% unstructured magnitude, Wanda and SparseGPT, ppl and Δppl ÷ magnitude's Δppl.

    python benchmarks/prune_outliers.py [--channels 4] [--scales 1,8,32]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

import pocketlm
from pocketlm.compress import MagnitudeConfig, SparseGPTConfig, WandaConfig, compress_
from pocketlm.compress.api import PassContext
from pocketlm.compress.calibration import decoder_layers, walk_layers, run_layer
from pocketlm.compress.prune.sparsify import _calibrated_layers
from pocketlm.compress.prune.unstructured import wanda_mask
from common import parse_reference_args, write_result


def norm_readers(layer) -> list[tuple]:
    """(RMSNorm, the Linears that read its output) for a Llama/Qwen/Mistral decoder layer."""
    attn, mlp = layer.self_attn, layer.mlp
    return [(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]),
            (layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])]


@torch.no_grad()
def make_outliers_(model, channels: torch.Tensor, scale: float) -> None:
    """Scale the given hidden channels' activations by `scale` after every RMSNorm and their weights
    by 1/scale in the Linears reading them: the model computes the same function."""
    for layer in decoder_layers(model):
        for norm, readers in norm_readers(layer):
            norm.weight[channels] *= scale
            for lin in readers:
                lin.weight[:, channels] /= scale


@torch.no_grad()
def strongest_channels(model, tokens: torch.Tensor, k: int) -> torch.Tensor:
    """The k hidden channels with the largest RMSNorm-output norms summed over all norms of all layers:
    the channels that already carry the most, as the outlier channels of large models do."""
    total = torch.zeros(model.config.hidden_size)

    def add(_module, _args, out) -> None:
        total.add_(out.float().square().sum((0, 1)))

    for _i, layer, inputs, kwargs in walk_layers(model, tokens):
        hooks = [norm.register_forward_hook(add) for norm, _readers in norm_readers(layer)]
        run_layer(layer, inputs, kwargs)
        for h in hooks:
            h.remove()
    return total.topk(k).indices.sort().values


@torch.no_grad()
def input_spread(model, ctx: PassContext) -> dict:
    """Per matrix kind (q_proj, …): max/median input column norm and Wanda/row-magnitude mask agreement,
    as [min, median, max] over the layers."""
    spread, agree = {}, {}
    for mats in _calibrated_layers(model, ctx, "input spread", hessian=False):
        for m in mats:
            kind, norm = m.name.split(".")[-1], m.stats.col_norm
            spread.setdefault(kind, []).append((norm.max() / norm.median()).item())
            same = wanda_mask(m.weight, norm, 0.5) == wanda_mask(m.weight, torch.ones_like(norm), 0.5)
            agree.setdefault(kind, []).append(same.float().mean().item())
    summary = lambda v: [min(v), statistics.median(v), max(v)]  # noqa: E731
    return {k: {"max_over_median_norm": summary(spread[k]), "wanda_equals_magnitude": summary(agree[k])}
            for k in spread}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--channels", type=int, default=4, help="hidden channels made outliers")
    ap.add_argument("--scales", default="1,8,32", help="activation scales of those channels (1: the model as is)")
    ap.add_argument("--calib-samples", type=int, default=128)
    args = parse_reference_args(ap)
    t_start = time.perf_counter()
    calib = dict(calib_samples=args.calib_samples, calib_len=512, show_progress=False)
    quality = pocketlm.EvalProtocol(text=args.text, tokens=args.tokens, speed=False)
    base, tok = pocketlm.load(args.model)
    spread_ctx = PassContext(tok=tok, calib_samples=32, show_progress=False)  # 32 calibration sequences
    channels = strongest_channels(base, spread_ctx.tokens, args.channels)
    probe = torch.randint(0, base.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    console, rows = Console(width=160), []
    for scale in [float(s) for s in args.scales.split(",")]:
        model = copy.deepcopy(base)
        make_outliers_(model, channels, scale)
        with torch.no_grad():
            logit_diff = (model(probe).logits - base(probe).logits).abs().max().item()
        dense_ppl = pocketlm.evaluate(model, tok, quality, show_progress=False).quality["ppl"]
        row = {"scale": scale, "max_logit_diff_vs_reference": logit_diff, "dense_ppl": dense_ppl,
               "spread": input_spread(model, spread_ctx)}
        for cls in (MagnitudeConfig, WandaConfig, SparseGPTConfig):
            pruned = copy.deepcopy(model)
            compress_(pruned, cls(sparsity=0.5), tok=tok, **calib)
            row[cls(sparsity=0.5).kind.removeprefix("prune_")] = pocketlm.evaluate(
                pruned, tok, quality, show_progress=False).quality["ppl"]
        for method in ("wanda", "sparsegpt"):
            row[f"{method}_vs_magnitude"] = (row[method] - dense_ppl) / (row["magnitude"] - dense_ppl)
        rows.append(row)
        console.print(f"scale {scale:g}: dense {dense_ppl:.3f}, magnitude {row['magnitude']:.3f}, "
                      f"wanda {row['wanda']:.3f}, sparsegpt {row['sparsegpt']:.3f}")

    table = Table(title=f"50% unstructured on {args.model} with {args.channels} hidden channels × scale "
                        f"(function-equivalent; {args.threads} threads)")
    for col in ("scale", "q/k/v/gate/up max/median ‖X‖", "Wanda = magnitude mask", "dense ppl",
                "magnitude", "Wanda", "SparseGPT", "Wanda Δ/Δmag", "SparseGPT Δ/Δmag"):
        table.add_column(col, justify="right")
    for r in rows:
        reads = [r["spread"][k] for k in ("q_proj", "gate_proj")]
        table.add_row(f"{r['scale']:g}", f"{max(s['max_over_median_norm'][2] for s in reads):.1f}",
                      f"{min(s['wanda_equals_magnitude'][0] for s in reads):.3f}", f"{r['dense_ppl']:.3f}",
                      f"{r['magnitude']:.3f}", f"{r['wanda']:.3f}", f"{r['sparsegpt']:.3f}",
                      f"{r['wanda_vs_magnitude']:.3f}", f"{r['sparsegpt_vs_magnitude']:.3f}")
    console.print(table)
    path = write_result("prune_outliers_small", {
        "model": args.model, "text": args.text, "tokens": args.tokens, "calib_samples": args.calib_samples,
        "outlier_channels": channels.tolist(), "rows": rows, "wall_s": time.perf_counter() - t_start})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
