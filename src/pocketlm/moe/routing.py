"""Routing diagnostics of MoE models: how often each expert is chosen, per layer, and how evenly.

`count_routing(model)` counts while the model runs (transformers' fused sparse-MoE blocks through a
hook on their router, pocketlm's MoEBlocks by their own counters); `routing_report` summarises:
per layer the share of tokens routed to each expert, the coefficient of variation of the counts
(0 = perfectly balanced; sqrt(E - 1) = one expert takes everything) and the mean active experts.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def routing_report(layers: list[tuple[torch.Tensor, int]]) -> dict:
    """layers: (counts per expert, tokens) per MoE layer."""
    out = []
    for i, (counts, tokens) in enumerate(layers):
        c = counts.double()
        mean = c.mean().item()
        out.append({"layer": i, "tokens": tokens, "share": (c / max(tokens, 1)).tolist(),
                    "cv": (c.std(unbiased=False) / mean).item() if mean else None,
                    "active": c.sum().item() / tokens if tokens else None})
    tokens = sum(t for _, t in layers)
    cvs = [x["cv"] for x in out if x["cv"] is not None]
    return {"mean_active_experts": sum(c.sum().item() for c, _ in layers) / tokens if tokens else None,
            "mean_cv": sum(cvs) / len(cvs) if cvs else None, "layers": out}


@contextlib.contextmanager
def count_routing(model) -> Iterator[list]:
    """Yield a list that holds, after the block, one routing_report dict (nothing for a dense model)."""
    from .block import MoEBlock, moe_blocks
    hf = [block for _, _, block in moe_blocks(model)]
    ours = [m for m in model.modules() if isinstance(m, MoEBlock)]
    result: list = []
    if not hf and not ours:
        yield result
        return
    counts = [torch.zeros(b.experts.gate_up_proj.shape[0], dtype=torch.long) for b in hf]
    tokens = [0] * len(hf)

    def hook(i):
        def count(_mod, _args, output):
            idx = output[2]  # (tokens, k) chosen experts
            counts[i].index_add_(0, idx.flatten().cpu(), torch.ones(idx.numel(), dtype=torch.long))
            tokens[i] += idx.shape[0]
        return count
    handles = [b.gate.register_forward_hook(hook(i)) for i, b in enumerate(hf)]
    before = [(b.counts.clone(), b.tokens) for b in ours]
    try:
        yield result
    finally:
        for h in handles:
            h.remove()
    layers = list(zip(counts, tokens)) + [(b.counts.cpu() - c0, b.tokens - t0) for b, (c0, t0) in zip(ours, before)]
    result.append(routing_report(layers))
