"""Knowledge distillation, teacher → student, on `accelerate`.

loss = alpha · KL_T(teacher || student) · T² + (1 − alpha) · LM loss + hidden_weight · hidden-state MSE

The same function runs on the CPU, one GPU, or several processes under `accelerate launch` or
`torchrun` (DDP; on CPU set ACCELERATE_USE_CPU=true, or accelerate sees one process):
each process takes its share of every batch, gradients are averaged, and the main process writes
checkpoints. Teacher and student must share a tokenizer (no cross-tokenizer KD). Checkpoints hold the
student, optimizer, schedule and RNG states (`accelerator.save_state`); `resume` continues from the
last one at its step, on the same data order (the batches already seen are skipped).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import ClassVar

import torch

from ...config import check, register_config
from ...errors import ConfigError, DataError
from ...progress import progress_bar
from ..api import PassConfig
from .losses import HiddenProjection, kd_loss, pair_layers

CHECKPOINT = "checkpoint"


@register_config
@dataclasses.dataclass(frozen=True)
class KDConfig(PassConfig):
    """steps of AdamW (lr, linear warm-up then cosine to 10%) on batches of batch_size × seq_len
    tokens; temperature T and alpha (KD share) of the loss; hidden_weight > 0 adds hidden-state MSE
    (student layer i against the teacher layer at the same depth); checkpoint_every steps.

    As a compression pass (a recovery step in a recipe) the teacher is the model as it entered
    `compress_`, the data `text` (default: the calibration text), and a quantized student trains
    its scales, zeros and float parameters with the codes fixed (see recover.py)."""

    steps: int = 300
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 5e-4
    warmup_steps: int = 10
    temperature: float = 2.0
    alpha: float = 0.9
    hidden_weight: float = 0.0
    checkpoint_every: int = 100
    seed: int = 0
    text: str | None = None

    kind: ClassVar[str] = "kd"
    needs_teacher: ClassVar[bool] = True

    def validate(self) -> None:
        check(self.steps >= 1 and self.batch_size >= 1 and self.seq_len >= 2, "steps, batch size and length must be "
              "positive (length ≥ 2)", "use e.g. steps 300, batch 8, length 256")
        check(self.lr > 0 and self.temperature > 0, "lr and temperature must be positive", "use e.g. lr 5e-4, T 2")
        check(0 <= self.alpha <= 1, f"alpha {self.alpha} is outside [0, 1]", "use 0 (LM loss only) to 1 (KD only)")
        check(self.hidden_weight >= 0 and self.warmup_steps >= 0 and self.checkpoint_every >= 1,
              "hidden_weight and warmup_steps must be ≥ 0, checkpoint_every ≥ 1", "fix the KD settings")


def check_same_tokenizer(student_tok, teacher_tok) -> None:
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise ConfigError("teacher and student tokenizers differ, and pocketlm has no cross-tokenizer KD",
                          "distill into a student that uses the teacher's tokenizer")


def packed_sequences(tok, text: str, seq_len: int) -> torch.Tensor:
    """A text as consecutive (N, seq_len) token rows (the tail that does not fill a row is dropped)."""
    ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    n = len(ids) // seq_len
    if n == 0:
        raise DataError(f"the training text has {len(ids)} tokens, fewer than one sequence of {seq_len}",
                        "pass more text or a shorter sequence length")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _schedule(cfg: KDConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def distill(student, teacher, data: torch.Tensor, cfg: KDConfig = KDConfig(), *, mask: torch.Tensor | None = None,
            workdir: str | Path | None = None, resume: bool = False, show_progress: bool = True) -> dict:
    """Train `student` (in place) toward `teacher` on token rows `data` (N, ≥ seq_len).

    mask: (N, ≥ seq_len) bool, True on the tokens to learn (sequence-level KD: the teacher-written
    targets, not the prompts or padding); None learns every token. workdir: where checkpoints go (none
    without it). Returns the loss curve and run facts."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if data.ndim != 2 or data.shape[0] < cfg.batch_size or data.shape[1] < cfg.seq_len:
        raise DataError(f"distillation data of shape {tuple(data.shape)} holds no batch of "
                        f"{cfg.batch_size} × {cfg.seq_len} tokens", "pass more text or smaller batches")
    if student.config.vocab_size != teacher.config.vocab_size:
        raise ConfigError("teacher and student have different vocabularies", "use a student built from the teacher")
    accelerator = Accelerator()
    set_seed(cfg.seed)
    hidden = cfg.hidden_weight > 0
    pairs = pair_layers(student.config.num_hidden_layers, teacher.config.num_hidden_layers) if hidden else []
    proj = HiddenProjection(student.config.hidden_size, teacher.config.hidden_size, len(pairs)) if hidden else None
    params = list(student.parameters()) + (list(proj.parameters()) if proj is not None else [])
    if not any(p.requires_grad for p in student.parameters()):
        raise ConfigError("the student has no trainable parameters (a frozen copy?)",
                          "call student.requires_grad_(True) before distilling")
    optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg))
    if mask is None:
        mask = torch.ones_like(data, dtype=torch.bool)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data[:, :cfg.seq_len], mask[:, :cfg.seq_len]),
                                         batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    student.train()
    model, optimizer, loader, scheduler = accelerator.prepare(student, optimizer, loader, scheduler)
    if proj is not None:  # not wrapped (it may have no parameters); its gradients are averaged by hand below
        proj.to(accelerator.device)
    teacher.to(accelerator.device).eval()  # run under no_grad; its requires_grad flags are the caller's

    start, curve = 0, []
    ckpt = Path(workdir) / CHECKPOINT if workdir is not None else None
    if resume and ckpt is not None and (ckpt / "step.json").is_file():
        accelerator.load_state(str(ckpt))
        saved = json.loads((ckpt / "step.json").read_text())
        start, curve = saved["step"], saved["curve"]
    t0 = time.perf_counter()
    batches = _cycle(loader, start)
    steps = range(start, cfg.steps)
    for step in progress_bar(steps, "distill", show=show_progress and accelerator.is_main_process):
        ids, learn = next(batches)
        with torch.no_grad():
            t_out = teacher(input_ids=ids, output_hidden_states=hidden)
        labels = ids.masked_fill(~learn, -100) if cfg.alpha < 1 else None
        s_out = model(input_ids=ids, labels=labels, output_hidden_states=hidden)
        # position t predicts token t + 1: it is learned when token t + 1 is
        loss = cfg.alpha * kd_loss(s_out.logits[:, :-1], t_out.logits[:, :-1], cfg.temperature, learn[:, 1:])
        if cfg.alpha < 1:
            loss = loss + (1 - cfg.alpha) * s_out.loss
        if proj is not None:
            loss = loss + cfg.hidden_weight * proj.loss([s_out.hidden_states[i] for i, _ in pairs],
                                                        [t_out.hidden_states[j] for _, j in pairs])
        accelerator.backward(loss)
        for p in proj.parameters() if proj is not None else ():
            if p.grad is not None and accelerator.num_processes > 1:
                p.grad = accelerator.reduce(p.grad, "mean")
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        curve.append(accelerator.reduce(loss.detach(), "mean").item())
        if ckpt is not None and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            accelerator.save_state(str(ckpt))
            if accelerator.is_main_process:
                (ckpt / "step.json").write_text(json.dumps({"step": step + 1, "curve": curve}))
    accelerator.wait_for_everyone()
    student.eval()
    return {"config": cfg.to_dict(), "steps": cfg.steps, "resumed_at": start, "loss_curve": curve,
            "processes": accelerator.num_processes, "device": str(accelerator.device),
            "wall_s": time.perf_counter() - t0}


def _cycle(loader, skip: int):
    """Batches without end, starting `skip` batches in (as a resumed run left off)."""
    seen = 0
    while True:
        for batch in loader:
            if seen >= skip:
                yield batch
            seen += 1
