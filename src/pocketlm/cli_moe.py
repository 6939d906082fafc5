"""The mixture-of-experts commands of the `pocketlm` app: moe bench, moe deploy, moefy (registered on cli.app)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .cli import _threads, app, out
from .cli_moe_options import EXPERT_BITS, EXPERT_MEMORY, MOE_THRESHOLD, MOE_TOP_P, RESIDENT, moe_overrides, resident_value
from .errors import ConfigError

moe_app = typer.Typer(no_args_is_help=True, help="Run MoE models with experts offloaded, bit-mixed, dynamic top-k.")
app.add_typer(moe_app, name="moe")


@moe_app.command("bench")
def moe_bench_cmd(
    model: str = typer.Argument(..., help="MoE model directory or embedded name (e.g. moe)."),
    resident: Optional[str] = typer.Option(None, "--resident-experts", "--resident",
                                           help="Experts kept in memory: a count (12) or a share (0.25). Default 0.25."),
    expert_memory_mb: Optional[float] = typer.Option(None, help="Instead: memory for resident experts, MB."),
    policy: str = typer.Option("lfu", help="Eviction: lru or lfu."),
    prefetch: bool = typer.Option(False, "--prefetch/--no-prefetch",
                                  help="Load the next layer's likely expert early, in a background thread."),
    page_cache: bool = typer.Option(True, "--page-cache/--no-page-cache",
                                    help="--no-page-cache: every expert load reads the disk."),
    bits_budget_mb: Optional[float] = typer.Option(None, "--bits-budget-mb", "--expert-bits-mb", help="Quantize experts to a per-expert 8/4-bit mix of this size."),
    group_size: int = typer.Option(32, help="int4 group size of the bit mix."),
    top_p: Optional[float] = typer.Option(None, "--top-p", "--moe-top-p", help="Dynamic top-k: fewest experts whose router mass reaches P."),
    threshold: Optional[float] = typer.Option(None, "--threshold", "--moe-threshold", help="Dynamic top-k: experts whose router probability is ≥ T."),
    new_tokens: int = typer.Option(128, help="Greedy tokens per decode run."),
    rounds: int = typer.Option(5, help="Alternating timed rounds (medians reported)."),
    ppl_tokens: int = typer.Option(16384, help="Tokens of test text for perplexity (0: skip)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: all cores)."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results JSON here."),
):
    """Decode speed, expert memory, cache hits, perplexity and routing balance against all-resident."""
    from .io import atomic_write_text
    from .moe.bench import MoEBenchConfig, run_moe_bench

    share = resident_value(resident)
    cfg = MoEBenchConfig(resident=share if share is not None or expert_memory_mb is not None else 0.25,
                         expert_memory_mb=expert_memory_mb, policy=policy, prefetch=prefetch, page_cache=page_cache,
                         bits_budget_mb=bits_budget_mb, group_size=group_size, top_p=top_p, threshold=threshold,
                         new_tokens=new_tokens, rounds=rounds, ppl_tokens=ppl_tokens)
    if share is not None and expert_memory_mb is not None:
        raise ConfigError("both --resident-experts and --expert-memory-mb given", "pass one of them")
    _threads(threads)
    r = run_moe_bench(model, cfg, dtype=dtype)
    c = r["cache"]
    table = Table(title=f"pocketlm moe bench {model} ({dtype}, {r['threads']} threads)")
    for col in ("run", "decode tok/s", "× resident", "hit rate", "prefetch acc.", "loaded MB", "stall s",
                "expert MB (budget)", "active experts", "ppl"):
        table.add_column(col, justify="left" if col == "run" else "right")
    ppl_base = f"{r['ppl_all_resident']:.3f}" if "ppl" in r else "-"
    table.add_row("all resident", f"{r['decode_tok_s']['all_resident']:.1f}", "1.00", "1.00", "-", "0", "0",
                  f"{r['expert_mb_all_resident']:.1f}", "-", ppl_base)
    label = (f"{c['resident_share']:.0%} resident, {policy}" + (", prefetch" if prefetch else "")
             + (f", bits {r['bits_share_of_bf16']:.0%} of bf16" if bits_budget_mb else "")
             + (f", top-p {top_p}" if top_p else "") + (f", threshold {threshold}" if threshold else ""))
    ppl = f"{r['ppl']:.3f} ({r['ppl_change']:+.2%})" if "ppl" in r else "-"
    active = r["routing"]["mean_active_experts"]
    table.add_row(label, f"{r['decode_tok_s']['configured']:.1f}", f"{r['speed_ratio']:.2f}", f"{c['hit_rate']:.2f}",
                  "-" if c["prefetch_accuracy"] is None else f"{c['prefetch_accuracy']:.2f}",
                  f"{c['bytes_loaded'] / 2**20:.0f}", f"{c['stall_s']:.2f}",
                  f"{r['expert_peak_rss_mb']:.1f} ({r['expert_budget_mb']:.1f})",
                  "-" if active is None else f"{active:.2f}", ppl)
    out.print(table)
    out.print(f"greedy tokens identical to all-resident: {r['tokens_identical']} "
              f"(agreement {r['token_agreement']:.0%}) · routing balance (CV per layer): "
              + ", ".join(f"{x['cv']:.2f}" for x in r["routing"]["layers"] if x["cv"] is not None))
    if json_out:
        atomic_write_text(json_out, json.dumps(r, indent=1) + "\n")
        out.print(f"wrote {json_out}")


@moe_app.command("deploy")
def moe_deploy_cmd(
    model: str = typer.Argument(..., help="MoE model directory or embedded name (e.g. moe)."),
    output: Path = typer.Option(..., "-o", "--output", help="Artifact directory to write."),
    resident_experts: Optional[str] = RESIDENT,
    expert_memory_mb: Optional[float] = EXPERT_MEMORY,
    expert_bits_mb: Optional[float] = EXPERT_BITS,
    moe_top_p: Optional[float] = MOE_TOP_P,
    moe_threshold: Optional[float] = MOE_THRESHOLD,
    policy: Optional[str] = typer.Option(None, help="Eviction: lru or lfu (default lfu)."),
    group_size: Optional[int] = typer.Option(None, help="int4 group size of the bit mix (default 32)."),
    calib_samples: Optional[int] = typer.Option(None, help="Calibration windows of 512 tokens for the bit plan (default 32)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: all cores)."),
):
    """Save MODEL as an artifact that runs its experts this way wherever it is loaded (generate, chat,
    eval, serve; their own MoE options still change it): offload budget, expert bit plan, dynamic top-k."""
    from .io import check_output, load
    from .moe.deploy import MoEDeployConfig, plan, save_deploy

    changes = moe_overrides(resident_experts, expert_memory_mb, expert_bits_mb, moe_top_p, moe_threshold)
    _threads(threads)
    m, tok = load(model, moe=False)
    check_output(output, overwrite, protect=m.pocketlm_source.inputs)  # fail before the calibration
    cfg = (MoEDeployConfig.from_record(m.pocketlm_record) or MoEDeployConfig()).merged(
        **changes, policy=policy, group_size=group_size, calib_samples=calib_samples)
    cfg = plan(m, tok, cfg)
    save_deploy(m, tok, cfg, output, overwrite=overwrite)
    bits = [b for layer in cfg.bits or [] for b in layer]
    budget = (f"{cfg.resident} resident" if cfg.resident is not None else
              f"{cfg.expert_memory_mb} MB of experts" if cfg.expert_memory_mb is not None else "all experts resident")
    out.print(f"wrote {output}: {budget}, {cfg.policy}"
              + (f", bit plan {bits.count(8)}×8 / {bits.count(4)}×4 bits" if bits else "")
              + (f", dynamic top-k (top-p {cfg.top_p})" if cfg.top_p else "")
              + (f", dynamic top-k (threshold {cfg.threshold})" if cfg.threshold is not None else ""))


@app.command("moefy")
def moefy_cmd(
    model: str = typer.Argument(..., help="Dense model directory or embedded name (Llama/Qwen/Mistral)."),
    output: Path = typer.Option(..., "-o", "--output", help="Artifact directory to write."),
    experts: int = typer.Option(8, help="Experts per FFN (must divide its width)."),
    top_k: int = typer.Option(2, help="Experts each token runs."),
    calib: Optional[Path] = typer.Option(None, help="Calibration text (default: embedded train-split slice)."),
    calib_samples: int = typer.Option(32, help="Calibration sequences of 512 tokens."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: all cores)."),
):
    """Split every dense FFN into experts with a trained router; save a model that runs top-k of them."""
    from .compress.calibration import calibration_tokens
    from .io import check_output, load, save
    from .moe.moefy import ffn_flops_saved, moefy

    if calib_samples < 1:
        raise ConfigError(f"--calib-samples {calib_samples} is below 1", "use 1 or more")
    _threads(threads)
    m, tok = load(model)
    check_output(output, overwrite, protect=m.pocketlm_source.inputs)  # fail before the long work
    tokens, calib_hash = calibration_tokens(tok, calib, samples=calib_samples, seq_len=512)
    moefy(m, tokens, experts, top_k)
    save(m, tok, output, recipe=[{"kind": "moefy", "experts": experts, "top_k": top_k}],
         calibration_hash=calib_hash, overwrite=overwrite)
    w = m.model.layers[0].mlp.gate_proj.weight
    out.print(f"moefied {len(m.model.layers)} FFNs into {experts} experts, top-{top_k}: "
              f"{ffn_flops_saved(w.shape[1], w.shape[0], experts, top_k):.0%} of FFN multiply-adds skipped · wrote {output}")
