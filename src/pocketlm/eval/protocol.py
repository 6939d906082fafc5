"""One evaluation protocol for every artifact: EvalProtocol (settings) -> evaluate -> EvalReport."""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..config import BaseConfig, check, register_config
from ..errors import DataError
from ..io import (atomic_write_text, check_weights, file_hash, load, load_tokenizer, pick_dtype, read_config,
                  resolve)
from ..moe.routing import count_routing
from . import data
from .efficiency import measure_efficiency
from .quality import score_windows, task_accuracy, word_tables


ENGINES = ("pocketlm", "transformers")


@register_config
@dataclasses.dataclass(frozen=True)
class EvalProtocol(BaseConfig):
    """How every number in an EvalReport is measured (defaults from DESIGN.md).

    Quality:
        text: evaluation text file (None: the embedded held-out test split of the reference corpus;
            "pydoc": the English prose of the standard library's pydoc_data/topics.py).
        tokens: the first N tokens of the text are scored (65,536), cut into non-overlapping windows
            of `ctx` (512) tokens, each scored from its own start, fp32 logits; `batch_size` windows
            per forward (4).
        cloze_min_context: next-word cloze counts words starting at least this far into a window (32).
        tasks: JSONL of question/answer items for chat models (None: no task accuracy);
            task_limit: first N items (None: all); task_max_new_tokens (64); task_thinking: slow mode (False);
            task_soft_switch: end the user turn with " /think" or " /no_think" to match the mode (True).
    Speed (skipped with speed=False):
        prefill_tokens (512) at batch 1; decode at `decode_batch_sizes` (1, 8) from a
        `decode_prompt_tokens` (32) prompt, `decode_new_tokens` (128) forced, greedy; `warmup` (1)
        untimed runs then the median of `repeats` (5). threads: torch CPU threads (None: all cores).
        engine: 'pocketlm' (the runtime's static-cache engine, default) or 'transformers' (HF generate);
        compile: compile the engine's decode step (False; compile time is reported apart).
    Energy:
        watts_per_core (10.0): used only by the CPU-time estimate when no counter is readable.
    """

    kind = "eval_protocol"

    text: str | None = None
    tokens: int = 65536
    ctx: int = 512
    batch_size: int = 4
    cloze_min_context: int = 32
    tasks: str | None = None
    task_limit: int | None = None
    task_max_new_tokens: int = 64
    task_thinking: bool = False
    task_soft_switch: bool = True
    speed: bool = True
    prefill_tokens: int = 512
    decode_prompt_tokens: int = 32
    decode_new_tokens: int = 128
    decode_batch_sizes: tuple[int, ...] = (1, 8)
    warmup: int = 1
    repeats: int = 5
    threads: int | None = None
    engine: str = "pocketlm"
    compile: bool = False
    watts_per_core: float = 10.0

    def validate(self) -> None:
        object.__setattr__(self, "decode_batch_sizes", tuple(self.decode_batch_sizes))
        check(self.ctx >= 2, f"--ctx must be at least 2 (got {self.ctx})", "use a window of 2 or more tokens, e.g. 512")
        check(self.tokens >= self.ctx, f"--tokens {self.tokens} is smaller than one window (--ctx {self.ctx})",
              "raise --tokens or lower --ctx")
        check(self.batch_size >= 1, f"batch_size must be at least 1 (got {self.batch_size})", "use 1 or more")
        check(self.cloze_min_context >= 1, "cloze_min_context must be at least 1", "use 1 or more")
        check(self.task_limit is None or self.task_limit >= 1, "task_limit must be at least 1", "use 1 or more, or none")
        check(self.task_max_new_tokens >= 1, "task_max_new_tokens must be at least 1", "use 1 or more")
        check(self.prefill_tokens >= 1, "prefill_tokens must be at least 1", "use 1 or more")
        check(self.decode_prompt_tokens >= 1, "decode_prompt_tokens must be at least 1", "use 1 or more")
        check(self.decode_new_tokens >= 2, f"decode_new_tokens must be at least 2 (got {self.decode_new_tokens})",
              "use 2 or more (decode rate is measured between the first and the last token)")
        check(len(self.decode_batch_sizes) > 0 and all(b >= 1 for b in self.decode_batch_sizes),
              f"decode batch sizes must be positive (got {self.decode_batch_sizes})", "use e.g. 1,8")
        check(self.warmup >= 0, "warmup must be 0 or more", "use 0 or more")
        check(self.repeats >= 1, f"repeats must be at least 1 (got {self.repeats})", "use 1 or more")
        check(self.threads is None or self.threads >= 1, f"threads must be at least 1 (got {self.threads})",
              "use 1 or more, or leave unset for all cores")
        check(self.engine in ENGINES, f"unknown engine '{self.engine}'", f"use one of: {', '.join(ENGINES)}")
        check(self.watts_per_core > 0, f"watts_per_core must be positive (got {self.watts_per_core})",
              "use the CPU's power per busy core, e.g. 10")


@dataclasses.dataclass
class EvalReport:
    """What `evaluate` measured, as plain data; `to_dict` is the JSON written by `pocketlm eval --json`."""

    label: str
    model: dict
    baseline: dict | None
    protocol: dict
    quality: dict
    efficiency: dict
    energy: dict | None
    machine: dict
    wall_s: float
    task_rows: list[dict] = dataclasses.field(default_factory=list)
    pocketlm_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EvalReport":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def get(self, dotted: str) -> Any:
        """A value by dotted path, e.g. report.get('quality.ppl')."""
        value: Any = self.to_dict()
        for key in dotted.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        return value

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


def machine_info(device: torch.device) -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def describe(model) -> dict:
    source = getattr(model, "pocketlm_source", None)
    cfg = model.config
    return {"name": source.name if source else cfg.name_or_path, "path": str(source.inputs[-1]) if source else None,
            "format": "gguf" if source and source.gguf else "hf",
            "gguf_quantization": source.gguf["quantization"] if source and source.gguf else None,
            "model_type": cfg.model_type, "architecture": (cfg.architectures or [type(model).__name__])[0],
            "params": sum(p.numel() for p in model.parameters()), "dtype": str(model.dtype).removeprefix("torch."),
            "device": str(next(model.parameters()).device), "recipe": getattr(model, "pocketlm_record", {}).get("recipe", [])}


def _check_same_tokenizer(tok, base_tok, base_name: str) -> None:
    if tok.get_vocab() != base_tok.get_vocab():
        raise DataError(f"tokenizer of the baseline '{base_name}' differs from the model's",
                        "KL and top-1 need the same tokenizer: pass a baseline with the model's tokenizer")


def evaluate(model, tok, protocol: EvalProtocol = EvalProtocol(), *, baseline=None,
             baseline_dtype: str = "float32", label: str | None = None, show_progress: bool = True) -> EvalReport:
    """Measure a model under one protocol.

    Args:
        model, tok: a causal LM (eval mode) and its tokenizer, e.g. from `pocketlm.load`.
        protocol: the EvalProtocol (defaults as documented there).
        baseline: None; a (model, tokenizer) pair; or a name/path, loaded after the speed runs (so the
            peak memory is the model's own) on the model's device in `baseline_dtype`.
        baseline_dtype: dtype of a baseline given by name (default float32, the exact reference).
        label: display name in tables and plots (default: model directory name and dtype).
    """
    t_start = time.perf_counter()
    if protocol.threads:
        torch.set_num_threads(protocol.threads)
    dev = next(model.parameters()).device
    # Check every input before the long work, so a bad one fails fast and nothing is written.
    text_path, text = data.read_text(protocol.text)
    windows = data.token_windows(tok, text, text_path, protocol.tokens, protocol.ctx)
    items = data.read_tasks(protocol.tasks, protocol.task_limit) if protocol.tasks else None
    if items and not getattr(tok, "chat_template", None):
        raise DataError("--tasks needs a chat model, and this tokenizer has no chat template",
                        "evaluate tasks with a chat model (e.g. reasoner) or drop --tasks")
    base_model = base_name = None
    if baseline is not None:
        if isinstance(baseline, tuple):
            base_model, base_tok = baseline
            base_name = describe(base_model)["name"]
        else:
            pick_dtype(baseline_dtype)
            src = resolve(baseline)
            read_config(src.path)
            check_weights(src.path)
            base_name, base_tok = str(baseline), load_tokenizer(src.path)
        _check_same_tokenizer(tok, base_tok, base_name)

    source = getattr(model, "pocketlm_source", None)
    efficiency, energy = measure_efficiency(model, tok, windows, protocol, source_path=source.inputs[-1] if source else None,
                                            show_progress=show_progress)
    if baseline is not None and base_model is None:
        base_model, _ = load(baseline, dtype=baseline_dtype, device=str(dev))
    with count_routing(model) as routing:  # MoE models: expert frequency and balance over the same text
        quality = score_windows(model, windows, baseline=base_model, batch_size=protocol.batch_size,
                                cloze_table=word_tables(tok, model.config.vocab_size),
                                cloze_min_context=protocol.cloze_min_context, show_progress=show_progress)
    quality["routing"] = routing[0] if routing else None
    quality.update(task_accuracy=None, task_items=None, task_mean_tokens=None)
    rows = []
    if items:
        result = task_accuracy(model, tok, items, thinking=protocol.task_thinking, soft_switch=protocol.task_soft_switch,
                               max_new_tokens=protocol.task_max_new_tokens, show_progress=show_progress)
        rows = result.pop("rows")
        quality.update(result)
    desc = describe(model)
    prot = protocol.to_dict()
    prot.update(text=str(text_path), text_hash=file_hash(text_path),
                threads=torch.get_num_threads(),
                tasks_hash=file_hash(protocol.tasks) if protocol.tasks else None)
    return EvalReport(
        label=label or f"{Path(desc['name']).name}-{desc['dtype']}", model=desc,
        baseline=describe(base_model) if base_model is not None else None,
        protocol=prot, quality=quality, efficiency=efficiency, energy=energy,
        machine=machine_info(dev), wall_s=time.perf_counter() - t_start, task_rows=rows)

