"""The `pocketlm` command: a thin typer layer over the Python API; each command imports its work lazily."""
from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.text import Text

from .cli_moe_options import EXPERT_BITS, EXPERT_MEMORY, MOE_THRESHOLD, MOE_TOP_P, RESIDENT, moe_overrides
from .errors import ConfigError, PocketError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make Hugging Face causal LMs small and fast for edge machines, measure them, run them.")
out = Console()
if not out.is_terminal:  # piped output: keep the wide tables on one line per row
    out = Console(width=180)


def _batch_sizes(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--batch-sizes '{value}' is not a comma-separated list of integers",
                          "use e.g. --batch-sizes 1,8") from None


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="Model directory, embedded name (tiny, reasoner, moe) or cached hub id."),
    baseline: Optional[str] = typer.Option(None, help="Reference model for KL and top-1 agreement."),
    baseline_dtype: str = typer.Option("float32", help="dtype of the baseline (float32: the exact reference)."),
    text: Optional[Path] = typer.Option(None, help="Evaluation text file, or pydoc (English prose of the Python stdlib's pydoc_data/topics.py; default: embedded held-out test split)."),
    tokens: int = typer.Option(65536, help="Tokens of the text to score."),
    ctx: int = typer.Option(512, help="Window length in tokens."),
    tasks: Optional[Path] = typer.Option(None, help="JSONL of question/answer items (chat models)."),
    task_limit: Optional[int] = typer.Option(None, help="Score only the first N task items."),
    thinking: bool = typer.Option(False, "--thinking", help="Answer tasks in slow (thinking) mode."),
    no_speed: bool = typer.Option(False, "--no-speed", help="Skip speed, memory and energy."),
    batch_sizes: str = typer.Option("1,8", help="Decode batch sizes, comma-separated."),
    repeats: int = typer.Option(5, help="Timed repeats (the median is reported)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: all cores)."),
    engine: str = typer.Option("pocketlm", help="Engine timed for speed: pocketlm or transformers."),
    compile: bool = typer.Option(False, "--compile", help="Compile the engine's decode step (time reported apart)."),
    watts_per_core: float = typer.Option(10.0, help="Watts per busy core for the energy estimate."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
    label: Optional[str] = typer.Option(None, help="Name in tables and plots."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the EvalReport JSON here."),
    gates: Optional[Path] = typer.Option(None, help="Acceptance gates (YAML) the report must pass (exit 1 if not), "
                                         "e.g. 'quality.ppl <= 1.02 * incumbent'."),
    incumbent: Optional[Path] = typer.Option(None, help="EvalReport JSON of the model in service, for gates that "
                                             "compare against it."),
    resident_experts: Optional[str] = RESIDENT,
    expert_memory_mb: Optional[float] = EXPERT_MEMORY,
    expert_bits_mb: Optional[float] = EXPERT_BITS,
    moe_top_p: Optional[float] = MOE_TOP_P,
    moe_threshold: Optional[float] = MOE_THRESHOLD,
):
    """Evaluate a model under the one protocol: quality, size, memory, speed, energy."""
    from .eval.protocol import EvalProtocol, evaluate
    from .eval.report import render_table
    from .io import load

    protocol = EvalProtocol(text=str(text) if text else None, tokens=tokens, ctx=ctx,
                            tasks=str(tasks) if tasks else None, task_limit=task_limit, task_thinking=thinking,
                            speed=not no_speed, decode_batch_sizes=_batch_sizes(batch_sizes), repeats=repeats,
                            threads=threads, engine=engine, compile=compile, watts_per_core=watts_per_core)
    moe = moe_overrides(resident_experts, expert_memory_mb, expert_bits_mb, moe_top_p, moe_threshold)
    checks = None
    if gates is not None:
        from .fleet.gates import load_gates, read_report
        checks = (load_gates(gates), read_report(incumbent) if incumbent else None)  # bad files fail before the work
    m, tok = load(model, dtype=dtype, device=device, moe=moe)
    report = evaluate(m, tok, protocol, baseline=baseline, baseline_dtype=baseline_dtype, label=label)
    out.print(render_table([report.to_dict()]))
    if json_out:
        report.save(json_out)
        out.print(f"wrote {json_out}")
    if checks is not None:
        from .cli_fleet import gate_table
        from .fleet.gates import check_gates
        passed, results = check_gates({"candidate": report.to_dict(), "incumbent": checks[1]}, checks[0])
        out.print(gate_table(results))
        if not passed:
            out.print("gates FAILED")
            raise typer.Exit(1)


def _threads(threads: Optional[int]) -> None:
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads {threads} is below 1", "use 1 or more, or leave it unset for all cores")
        import torch
        torch.set_num_threads(threads)


@app.command("generate")
def generate_cmd(
    model: str = typer.Argument(..., help="Model directory, embedded name or cached hub id."),
    prompt: str = typer.Argument(..., help="Prompt text (used as is, no chat template)."),
    max_tokens: int = typer.Option(128, help="Most new tokens."),
    temperature: float = typer.Option(0.0, help="0 = greedy; above 0 samples."),
    top_k: int = typer.Option(0, help="Sample among the k most likely tokens (0 = all)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass (1 = off)."),
    repetition_penalty: float = typer.Option(1.0, help="Penalty on tokens already present (1 = off)."),
    seed: Optional[int] = typer.Option(None, help="Seed for sampling."),
    stop: list[str] = typer.Option([], help="Stop string (repeatable); the text ends before it."),
    stream: bool = typer.Option(False, "--stream", help="Print tokens as they are generated."),
    repair: bool = typer.Option(False, "--repair", help="Repetition self-repair: roll loops back and block them."),
    compile: bool = typer.Option(False, "--compile", help="Compile the decode step first (pays off on long outputs)."),
    native: bool = typer.Option(False, "--native", help="One native call per decode step (CPU, fp32/int8/int4)."),
    native_activations: str = typer.Option("fp32", help="With --native: fp32, or int8 (integer dot products, faster, "
                                                        "not logits-equal)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: all cores)."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
    resident_experts: Optional[str] = RESIDENT,
    expert_memory_mb: Optional[float] = EXPERT_MEMORY,
    expert_bits_mb: Optional[float] = EXPERT_BITS,
    moe_top_p: Optional[float] = MOE_TOP_P,
    moe_threshold: Optional[float] = MOE_THRESHOLD,
):
    """Generate text from a prompt with pocketlm's engine (static KV cache, optional compiled decode)."""
    from .io import load
    from .runtime import Generator, SamplingConfig

    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty, seed=seed)
    moe = moe_overrides(resident_experts, expert_memory_mb, expert_bits_mb, moe_top_p, moe_threshold)
    _threads(threads)
    m, tok = load(model, dtype=dtype, device=device, moe=moe)
    gen = Generator(m, tok, compile=compile, native=native, native_activations=native_activations)
    if repair:
        from .runtime.repair import RepairConfig
        from .runtime.rows import decode_rows

        for rows in decode_rows(gen, [gen.encode(prompt)], max_tokens, sampling, repair=RepairConfig()):
            pass
        print(tok.decode(rows[0].tokens, skip_special_tokens=True))
        Console(stderr=True).print(f"[dim]generated {len(rows[0].tokens)} tokens · {rows[0].repairs} loops repaired "
                                   f"({rows[0].dropped} tokens rolled back) · finish: {rows[0].finish}[/dim]")
        return
    pieces, last = [], None
    for last in gen.stream_generate(prompt, max_tokens, sampling, stop_strings=stop):
        pieces.append(last.text)
        if stream:
            print(last.text, end="", flush=True)
    print("" if stream else "".join(pieces))
    Console(stderr=True).print(f"[dim]prompt {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s · generated "
                               f"{last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s · "
                               f"finish: {last.finish_reason}"
                               + (f" · compile {gen.compile_s:.1f} s" if compile else "") + "[/dim]")


@app.command("bench")
def bench_cmd(
    model: str = typer.Argument(..., help="Model directory, embedded name or cached hub id."),
    batch_sizes: str = typer.Option("1,8", help="Decode batch sizes, comma-separated."),
    prompt_tokens: int = typer.Option(32, help="Prompt length for decode runs."),
    new_tokens: int = typer.Option(128, help="New tokens per decode run (forced)."),
    prefill_tokens: int = typer.Option(512, help="Prompt length for the prefill timing."),
    repeats: int = typer.Option(5, help="Timed repeats (the median is reported)."),
    eager: bool = typer.Option(False, "--eager", help="Do not compile the decode step."),
    native: bool = typer.Option(False, "--native", help="Time the native decode step (one C++ call per token)."),
    native_activations: str = typer.Option("fp32", help="With --native: fp32 or int8 activations."),
    transformers: bool = typer.Option(False, "--transformers", help="Also time transformers' generate; print ratios."),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: all cores)."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results JSON here."),
):
    """Prefill latency and decode tokens/s of the engine at each batch size (table + JSON)."""
    import json

    from rich.table import Table

    from .io import atomic_write_text, load
    from .runtime.bench import BenchConfig, run_bench

    cfg = BenchConfig(batch_sizes=_batch_sizes(batch_sizes), prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                      prefill_tokens=prefill_tokens, repeats=repeats, compile=not (eager or native), native=native,
                      native_activations=native_activations,
                      transformers=transformers)
    _threads(threads)
    m, tok = load(model, dtype=dtype, device=device)
    result = run_bench(m, tok, cfg)
    result["model"] = model
    table = Table(title=f"pocketlm bench {model} ({dtype}, {result['threads']} threads, {result['path']} step)")
    table.add_column("engine")
    table.add_column(f"prefill {prefill_tokens} ms", justify="right")
    for b in cfg.batch_sizes:
        table.add_column(f"decode tok/s b{b}", justify="right")
    for row in result["rows"]:
        table.add_row(row["engine"], f"{row['prefill_ms']:.1f}", *[f"{row['decode_tok_s'][str(b)]:.1f}" for b in cfg.batch_sizes])
    if transformers:
        table.add_row("speed-up", "", *[f"{result['speedup_vs_transformers'][str(b)]:.2f}×" for b in cfg.batch_sizes])
    out.print(table)
    if result["compile_s"] is not None:
        out.print(f"compile time (apart from the numbers above): {result['compile_s']:.1f} s")
    if json_out:
        atomic_write_text(json_out, json.dumps(result, indent=2) + "\n")
        out.print(f"wrote {json_out}")


PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt", "heads", "mlp", "layers", "width")


def _nm(value: Optional[str]) -> Optional[tuple[int, int]]:
    if value is None:
        return None
    try:
        n, m = (int(v) for v in value.split(":"))
    except ValueError:
        raise ConfigError(f"--nm '{value}' is not of the form N:M", "use e.g. --nm 2:4") from None
    return n, m


def _count(value: Optional[str]) -> Optional[int]:
    """'8M' -> 8_000_000; also K and B suffixes or a plain integer."""
    if value is None:
        return None
    scale = {"K": 10**3, "M": 10**6, "B": 10**9}.get(value[-1:].upper(), 1)
    try:
        return int(float(value[:-1] if scale > 1 else value) * scale)
    except ValueError:
        raise ConfigError(f"--target-params '{value}' is not a parameter count", "use e.g. 8M or 8000000") from None


def _prune_config(prune: str, *, sparsity, nm, scope, ratio, unit, importance, drop, metric, target_params):
    from . import compress as c
    if prune not in PRUNE_METHODS:
        raise ConfigError(f"unknown --prune method '{prune}'", f"use one of {', '.join(PRUNE_METHODS)}")
    if prune in ("magnitude", "wanda", "sparsegpt"):
        cls = {"magnitude": c.MagnitudeConfig, "wanda": c.WandaConfig, "sparsegpt": c.SparseGPTConfig}[prune]
        return cls(sparsity=sparsity, nm=_nm(nm), scope=scope)
    if prune == "heads":
        return c.HeadPruneConfig(ratio=ratio if ratio is not None else 0.25, unit=unit, scope=scope, importance=importance)
    if prune == "mlp":
        return c.MlpPruneConfig(ratio=ratio if ratio is not None else 0.5, scope=scope, importance=importance)
    if prune == "layers":
        return c.LayerDropConfig(drop=drop, metric=metric)
    if target_params is None:
        raise ConfigError("--prune width needs --target-params", "add e.g. --target-params 8M")
    return c.WidthPruneConfig(target_params=_count(target_params))


# --method → (module under pocketlm.compress.quant, its config class, the CLI options it takes). Imported
# when asked for, so a method is available as soon as its module is.
QUANT_METHODS = {
    "rtn": ("rtn", "RTNConfig", ("bits", "group_size", "sym", "head")),
    "gptq": ("gptq", "GPTQConfig", ("bits", "group_size", "sym", "head", "act_order")),
    "awq": ("awq", "AWQConfig", ("bits", "group_size", "sym", "head", "then")),
    "smoothquant": ("smoothquant", "SmoothQuantConfig", ("head",)),
    "progressive": ("progressive", "ProgressiveConfig", ("bits", "group_size", "sym", "head", "act_order")),
    "mixed": ("mixed", "MixedPrecisionConfig", ("target_bits", "max_size_mb", "group_size", "sym", "head")),
}
QUANT_DEFAULTS = {"bits": 4}  # the CLI's defaults where a method takes the option


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _quant_config(method: str, **options):
    """The config of `method` from the CLI options (None: not given), refusing options it does not take."""
    import importlib
    if method not in QUANT_METHODS:
        raise ConfigError(f"unknown --method '{method}'", f"use one of {', '.join(QUANT_METHODS)}")
    module, cls_name, takes = QUANT_METHODS[method]
    given = {k: v for k, v in options.items() if v is not None}
    extra = [k for k in given if k not in takes]
    if extra:
        raise ConfigError(f"--method {method} does not take {_option(extra[0])}",
                          f"{method} takes {', '.join(map(_option, takes))}")
    try:
        cls = getattr(importlib.import_module(f"pocketlm.compress.quant.{module}"), cls_name)
    except (ImportError, AttributeError):
        raise ConfigError(f"--method {method} is not available in this pocketlm installation",
                          "use --method rtn or upgrade pocketlm") from None
    return cls(**{k: given.get(k, QUANT_DEFAULTS.get(k)) for k in takes if k in given or k in QUANT_DEFAULTS})


def _check_quant_targets(model, cfg) -> None:
    """Refuse a model without linears to quantize, or a group size that does not divide a width, before
    calibration (the passes check again)."""
    from .compress.quant.primitives import Scheme
    from .compress.quant.swap import check_targets
    scheme = getattr(cfg, "scheme", None) or Scheme(8)  # SmoothQuant: int8 per channel
    if callable(scheme):  # mixed precision: its fewest bits
        scheme = scheme(min(cfg.candidates))
    check_targets(model, scheme)


def _calib_samples(samples: Optional[int], tokens: Optional[int], calib_len: int) -> int:
    from .config import check
    check(samples is None or tokens is None, "--calib-samples and --calib-tokens both given",
          "give one: --calib-tokens N means N // --calib-len sequences")
    check(calib_len >= 2, "--calib-len must be at least 2", "use e.g. --calib-len 512")
    if tokens is not None:
        check(tokens >= calib_len, f"--calib-tokens {tokens} is less than one sequence of {calib_len} tokens",
              "give more tokens or a smaller --calib-len")
        return tokens // calib_len
    check(samples is None or samples >= 1, "--calib-samples must be at least 1", "use e.g. --calib-samples 128")
    return 128 if samples is None else samples


def _gguf_note(model, qtype: str) -> str:
    """What the GGUF file holds, said plainly: its type, and that pocketlm's codes were rounded again."""
    from .gguf_export import quantized_bits
    bits = sorted(set(quantized_bits(model)))
    if not bits:
        return f"GGUF {qtype}"
    if qtype in ("F32", "F16"):
        return f"GGUF {qtype}: quantized layers written dequantized"
    kinds = ", ".join(f"int{b} groups" if b < 8 else "int8 rows" for b in bits)
    return f"GGUF {qtype}: {kinds} re-quantized to {qtype} blocks of 32 from the dequantized weights"


def _check_export(export: Optional[str], gguf_type: str) -> None:
    from .gguf_export import QTYPES
    if export not in (None, "gguf"):
        raise ConfigError(f"unknown --export format '{export}'", "use --export gguf")
    if gguf_type not in ("auto", *QTYPES):
        raise ConfigError(f"GGUF type {gguf_type} is not supported", f"use --gguf-type auto, {', '.join(QTYPES)}")
    if gguf_type != "auto" and export is None:
        raise ConfigError("--gguf-type given without --export gguf", "add --export gguf")


@app.command("compress")
def compress_cmd(
    model: str = typer.Argument(..., help="Model directory, embedded name or cached hub id."),
    output: Path = typer.Option(..., "-o", "--output", help="Artifact directory to write."),
    recipe: Optional[str] = typer.Option(None, help="A recipe YAML file or built-in name (edge-int8, edge-int4, "
                                                    "minitron-50): passes applied in order."),
    prune: Optional[str] = typer.Option(None, help="magnitude, wanda, sparsegpt, heads, mlp, layers or width."),
    method: Optional[str] = typer.Option(None, help="Quantize: rtn, gptq, awq, smoothquant, progressive or mixed."),
    sparsity: float = typer.Option(0.5, help="Unstructured: fraction of weights set to zero."),
    nm: Optional[str] = typer.Option(None, help="N:M pattern, e.g. 2:4 (keep 2 of every 4)."),
    scope: str = typer.Option("layer", help="layer (same share per layer) or global (ranked across layers)."),
    ratio: Optional[float] = typer.Option(None, help="heads/mlp: fraction removed (default 0.25 / 0.5)."),
    unit: str = typer.Option("query", help="heads: query (per KV group) or kv_group."),
    importance: str = typer.Option("activation", help="heads/mlp: activation or taylor."),
    drop: int = typer.Option(1, help="layers: how many decoder layers to remove."),
    metric: str = typer.Option("block_influence", help="layers: block_influence or last."),
    target_params: Optional[str] = typer.Option(None, help="width: parameter budget, e.g. 8M."),
    bits: Optional[int] = typer.Option(None, help="Quantize: 8, 4 or 3 bits per weight (default 4)."),
    group_size: Optional[int] = typer.Option(None, help="Quantize: inputs per scale group (default: 128 at int4/int3, per channel at int8; 32 = Q8_0's layout)."),
    sym: bool = typer.Option(False, "--sym", help="Quantize: codes centred on zero (no offset)."),
    head: bool = typer.Option(True, "--head/--no-head", help="Quantize the LM head and embedding to int8."),
    act_order: Optional[bool] = typer.Option(None, "--act-order/--no-act-order",
                                             help="gptq/progressive: round columns by activation energy."),
    then: Optional[str] = typer.Option(None, help="awq: rounding after the scale search, rtn (default) or gptq."),
    target_bits: Optional[float] = typer.Option(None, help="mixed: average bits per weight, e.g. 4.5."),
    max_size_mb: Optional[float] = typer.Option(None, help="mixed: size budget of the quantized weights."),
    calib: Optional[Path] = typer.Option(None, help="Calibration text (default: embedded train-split slice)."),
    calib_samples: Optional[int] = typer.Option(None, help="Calibration sequences (default 128)."),
    calib_tokens: Optional[int] = typer.Option(None, help="Calibration tokens in all (sequences = N // calib-len)."),
    calib_len: int = typer.Option(512, help="Tokens per calibration sequence."),
    export: Optional[str] = typer.Option(None, help="gguf: also write OUTPUT/model.gguf for llama.cpp."),
    gguf_type: str = typer.Option("auto", help="auto (Q8_0 if all 8-bit, else Q4_0), F32, F16, Q8_0 or Q4_0."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
):
    """Prune, quantize or apply a recipe; save the artifact with what was applied (optionally also as GGUF)."""
    from .compress import compress_
    from .compress.recipe import apply_recipe, is_quantization, load_recipe
    from .io import check_output, load, save

    if sum(x is not None for x in (recipe, prune, method)) != 1:
        raise ConfigError("give exactly one of --recipe, --prune or --method",
                          "e.g. --recipe edge-int4, --method rtn --bits 4, or --prune wanda")
    quant_options = dict(bits=bits, group_size=group_size, sym=sym or None, act_order=act_order, then=then,
                         target_bits=target_bits, max_size_mb=max_size_mb)
    if recipe is not None:
        given = [k for k, v in quant_options.items() if v is not None]
        if given or target_params is not None or ratio is not None:
            raise ConfigError("pass options are given with --recipe", "write them into the recipe's passes")
        cfg = load_recipe(recipe)  # every pass checked before any work
    elif prune is not None:
        given = [k for k, v in quant_options.items() if v is not None]
        if given:
            raise ConfigError(f"{_option(given[0])} is a quantization option, given with --prune",
                              "quantize with --method in a second `pocketlm compress` run")
        cfg = _prune_config(prune, sparsity=sparsity, nm=nm, scope=scope, ratio=ratio, unit=unit,
                            importance=importance, drop=drop, metric=metric, target_params=target_params)
    else:
        cfg = _quant_config(method, head=head, **quant_options)
    samples = _calib_samples(calib_samples, calib_tokens, calib_len)
    _check_export(export, gguf_type)
    m, tok = load(model, moe=False)  # a deployed MoE artifact is compressed as plain modules
    check_output(output, overwrite, protect=m.pocketlm_source.inputs)  # fail before the long work
    if export:
        from .gguf_export import auto_qtype, check_exportable, export_gguf
        check_exportable(m)  # the architecture; the layers once compressed
    first = cfg.passes[0] if recipe is not None else cfg
    if is_quantization(first):  # later quantization passes check the widths that pruning left
        _check_quant_targets(m, first)
    kwargs = dict(tok=tok, calib=calib, calib_samples=samples, calib_len=calib_len)
    applied = apply_recipe(m, cfg, **kwargs) if recipe is not None else compress_(m, cfg, **kwargs)
    if export:
        qtype = auto_qtype(m) if gguf_type == "auto" else gguf_type
        check_exportable(m, qtype)  # before anything is written
    save(m, tok, output, overwrite=overwrite)
    out.print(_compress_table(applied))
    out.print(f"wrote {output}")
    if export:
        export_gguf(m, tok, output / "model.gguf", qtype)
        out.print(f"wrote {output / 'model.gguf'} ({_gguf_note(m, qtype)})")


def _compress_table(applied: list[dict]):
    from rich.table import Table
    table = Table(title="pocketlm compress")
    table.add_column("pass")
    table.add_column("result", overflow="fold")
    for a in applied:
        stats = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in a["stats"].items() if k != "block_influence")
        table.add_row(a["kind"], stats)
    return table


@app.command("report")
def report_cmd(
    results: list[Path] = typer.Argument(..., help="EvalReport JSON files from `pocketlm eval --json`."),
    output: Path = typer.Option(..., "-o", "--output", help="Directory for report.md, report.html and plots."),
    w_time: float = typer.Option(0.2, help="Weight of normalized time per token in the score."),
    w_energy: float = typer.Option(0.2, help="Weight of normalized energy per token in the score."),
    kwh_price: Optional[float] = typer.Option(None, help="Add a cost table: electricity price per kWh."),
    hardware_price: float = typer.Option(1000.0, help="Cost table: price of the machine."),
    lifetime_years: float = typer.Option(3.0, help="Cost table: years the machine serves."),
    utilization: float = typer.Option(0.5, help="Cost table: share of that time it is busy."),
    tokens_per_request: float = typer.Option(256.0, help="Cost table: generated tokens per request."),
    cloud_price: Optional[float] = typer.Option(None, help="Cost table: a cloud price per 1M tokens to compare."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
):
    """Tables, weighted score and Pareto plots over several evaluation results (and cost, with --kwh-price)."""
    from .eval.report import load_reports, render_table, write_report
    from .eval.score import ScoreWeights

    cost = None
    if kwh_price is not None:
        from .fleet.cost import CostInputs
        cost = CostInputs(kwh_price, hardware_price, lifetime_years, utilization, tokens_per_request, cloud_price)
    reports = load_reports(results)
    path = write_report(reports, output, weights=ScoreWeights(w_time=w_time, w_energy=w_energy), overwrite=overwrite,
                        cost=cost)
    out.print(render_table(reports))
    out.print(f"wrote {path / 'report.html'}")


@app.command("demo")
def demo_cmd(
    output: Path = typer.Option(Path("pocketlm-demo"), "-o", "--output", help="Directory for results and report."),
    tokens: int = typer.Option(65536, help="Tokens of the embedded test text to score."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
):
    """Evaluate the embedded tiny model (fp32, bf16, fp16, MLP-pruned) against fp32; write the report."""
    from .demo import run_demo

    path = run_demo(output, tokens=tokens, overwrite=overwrite, console=out)
    out.print(f"report: {path / 'report.html'}")


from . import cli_distill, cli_fleet, cli_moe, cli_reason, cli_rl, cli_serve  # noqa: E402,F401  (register their commands on `app`)


def main(argv: list[str] | None = None) -> None:
    """Entry point: PocketErrors become one line on stderr and exit code 2 (`--debug` shows the traceback;
    `--allow-download` lets a hub id that is not in the local cache be downloaded)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    if "--allow-download" in argv:  # any command may name a hub id: downloading it is asked for once, here
        argv.remove("--allow-download")
        import os
        os.environ["POCKETLM_ALLOW_DOWNLOAD"] = "1"
    try:
        # Standalone mode: typer reports usage errors itself (exit 2) and exits 0 on success.
        typer.main.get_command(app).main(args=argv, prog_name="pocketlm", standalone_mode=True)
    except PocketError as e:
        if debug:
            traceback.print_exc()
        Console(stderr=True).print(Text.assemble(("error: ", "bold red"), str(e)), soft_wrap=True)
        sys.exit(2)

if __name__ == "__main__":  # `python -m pocketlm.cli`: run the package's app, where the other modules register
    from pocketlm.cli import main as package_main
    package_main()
