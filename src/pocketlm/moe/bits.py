"""Expert-wise bit widths (EdgeMoE): each expert gets 8 or 4 bits by its importance, to meet a size budget.

An expert's importance at a bit width is the output error its quantization causes on calibration
data, as the model weights it: sum over the tokens routed to it of (router weight x |f(x) - f_q(x)|)^2.
That is routing frequency times output sensitivity, measured together. Every expert starts at the
lowest width; upgrades are taken in order of error removed per byte added while the budget allows
(the greedy knapsack), so frequently used, sensitive experts keep 8 bits.
"""
from __future__ import annotations

import torch

from ..compress.calibration import calibration_tokens
from ..errors import ConfigError
from ..progress import progress_bar
from .experts import Expert, expert_bytes, quantize_expert
from .runtime import fused_experts, require_moe

WIDTHS = (8, 4)


@torch.no_grad()
def expert_errors(model, tokens: torch.Tensor, widths: tuple[int, ...] = WIDTHS, group_size: int = 64,
                  batch_size: int = 4, show_progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted output error of every expert at each width, and how many tokens each one got.

    tokens: (n, ctx) calibration windows. Returns errors (layers, experts, widths) and counts
    (layers, experts)."""
    blocks = require_moe(model)
    n_exp = len(fused_experts(blocks[0][2]))
    errors = torch.zeros(len(blocks), n_exp, len(widths), dtype=torch.float64)
    counts = torch.zeros(len(blocks), n_exp, dtype=torch.long)
    handles = []
    for i, (_, _, block) in enumerate(blocks):
        weights = fused_experts(block)
        exact = [Expert(w) for w in weights]
        quant = [[quantize_expert(w, b, group_size) for b in widths] for w in weights]

        def hook(mod, args, i=i, exact=exact, quant=quant):
            x = args[0].reshape(-1, args[0].shape[-1])
            _, scores, idx = mod.gate(x)
            routed = torch.zeros(x.shape[0], n_exp, dtype=torch.float32).scatter_(1, idx, scores.float())
            for e in range(n_exp):
                rows = routed[:, e].nonzero()[:, 0]
                if rows.numel() == 0:
                    continue
                xe, we = x[rows], routed[rows, e, None]
                y = exact[e](xe, mod.experts.act_fn).float()
                counts[i, e] += rows.numel()
                for j, q in enumerate(quant[e]):
                    errors[i, e, j] += ((y - q(xe, mod.experts.act_fn).float()) * we).pow(2).sum().item()
        handles.append(block.register_forward_pre_hook(hook))
    try:
        for batch in progress_bar(tokens.split(batch_size), "expert sensitivity", show=show_progress):
            model(input_ids=batch)
    finally:
        for h in handles:
            h.remove()
    return errors, counts


def allocate_bits(errors: torch.Tensor, sizes: torch.Tensor, budget_bytes: int,
                  widths: tuple[int, ...] = WIDTHS) -> list[list[int]]:
    """The plan (per layer, per expert: bits) of least total error within `budget_bytes`.

    errors, sizes: (layers, experts, widths), widths in decreasing order (sizes decreasing too)."""
    lowest = len(widths) - 1
    choice = torch.full(errors.shape[:2], lowest, dtype=torch.long)
    total = sizes[..., lowest].sum().item()
    if total > budget_bytes:
        raise ConfigError(f"a bit budget of {budget_bytes / 2**20:.2f} MB is below the experts at "
                          f"{widths[lowest]} bits ({total / 2**20:.2f} MB)",
                          f"raise the expert bit budget to at least {total / 2**20:.2f} MB")
    while True:  # best remaining upgrade by error removed per byte; one step up at a time
        j = choice.clamp(min=1) - 1
        gain = errors.gather(2, choice[..., None])[..., 0] - errors.gather(2, j[..., None])[..., 0]
        cost = (sizes.gather(2, j[..., None]) - sizes.gather(2, choice[..., None]))[..., 0].double()
        ratio = torch.where((choice > 0) & (gain > 0) & (total + cost <= budget_bytes), gain / cost.clamp(min=1), -1.0)
        best = int(ratio.argmax())
        layer, expert = divmod(best, errors.shape[1])
        if ratio[layer, expert] < 0:
            break
        total += cost[layer, expert].item()
        choice[layer, expert] -= 1
    return [[widths[c] for c in row] for row in choice.tolist()]


def plan_bits(model, tok, budget_mb: float, group_size: int, samples: int, show_progress: bool = True):
    """The expert-wise 8/4-bit plan within `budget_mb`, from calibration on the embedded training text."""
    blocks = require_moe(model)
    w = fused_experts(blocks[0][2])[0]
    hidden, inter = w["gate_up"].shape[1], w["down"].shape[1]
    shape = (len(blocks), len(fused_experts(blocks[0][2])), 2)
    sizes = torch.tensor([expert_bytes(hidden, inter, b, group_size) for b in (8, 4)]).expand(*shape)
    allocate_bits(torch.zeros(shape, dtype=torch.float64), sizes, int(budget_mb * 2**20))  # a budget too small fails now
    tokens, _ = calibration_tokens(tok, samples=samples, seq_len=512)
    errors, _ = expert_errors(model, tokens, group_size=group_size, show_progress=show_progress)
    return allocate_bits(errors, sizes, int(budget_mb * 2**20))
