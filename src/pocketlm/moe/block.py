"""MoEBlock: a sparse MoE layer whose experts come from the expert cache, with static or dynamic top-k.

It replaces transformers' fused sparse-MoE blocks (Mixtral, Qwen2/3-MoE: a `gate` router with an
(E, H) weight and `experts.gate_up_proj` (E, 2I, H) / `experts.down_proj` (E, H, I)) and computes what
they compute: softmax router probabilities in fp32, top-k, weights renormalized (Mixtral, or when
`norm_topk_prob`), each expert's output scaled by its weight and summed over experts in ascending
order; Qwen2-MoE's shared expert is added as it adds it. Experts are computed resident-first (while
prefetches land) but always summed in the same order, so the output does not depend on what the
cache held: offloaded decoding gives the same tokens as all-resident.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BaseConfig, check, register_config
from .cache import ExpertCache

PREFETCH_MIN_PROB = 0.5


@register_config
@dataclasses.dataclass(frozen=True)
class Routing(BaseConfig):
    """How many experts each token runs. Static (default): the model's top-k. Dynamic: per token, the
    fewest experts whose probabilities sum to `top_p`, or every expert with probability ≥ `threshold`,
    clamped to [k_min, k_max] (k_max defaults to the model's top-k)."""

    kind = "moe_routing"
    top_p: float | None = None
    threshold: float | None = None
    k_min: int = 1
    k_max: int | None = None

    def validate(self) -> None:
        check(self.top_p is None or self.threshold is None, "top_p and threshold both set",
              "choose one dynamic top-k rule")
        check(self.top_p is None or 0 < self.top_p <= 1, f"top_p {self.top_p} is outside (0, 1]",
              "use e.g. --top-p 0.8")
        check(self.threshold is None or 0 <= self.threshold < 1, f"threshold {self.threshold} is outside [0, 1)",
              "use e.g. --threshold 0.2")
        check(self.k_min >= 1 and (self.k_max is None or self.k_max >= self.k_min),
              f"k_min {self.k_min} / k_max {self.k_max} is not 1 <= k_min <= k_max", "fix k_min/k_max")

    @property
    def dynamic(self) -> bool:
        return self.top_p is not None or self.threshold is not None


def moe_blocks(model) -> list[tuple[nn.Module, str, nn.Module]]:
    """(decoder layer, attribute, block) for every fused sparse-MoE block of an HF model."""
    out = []
    for layer in getattr(getattr(model, "model", None), "layers", []):
        for attr in ("mlp", "block_sparse_moe"):
            block = getattr(layer, attr, None)
            experts = getattr(block, "experts", None)
            if getattr(getattr(block, "gate", None), "weight", None) is not None and \
                    getattr(experts, "gate_up_proj", None) is not None and experts.gate_up_proj.dim() == 3:
                out.append((layer, attr, block))
    return out


class MoEBlock(nn.Module):
    """One MoE layer; `layer` is its index in the expert store. Counts routed tokens per expert."""

    def __init__(self, block: nn.Module, layer: int, cache: ExpertCache, routing: Routing):
        super().__init__()
        gate = block.gate
        self.router = nn.Parameter(gate.weight.detach(), requires_grad=False)
        self.n_experts, self.top_k = self.router.shape[0], int(getattr(gate, "top_k", getattr(block, "top_k", 2)))
        # Mixtral always renormalizes and keeps fp32 weights; Qwen-MoE renormalizes when asked, then casts
        self.qwen_style = hasattr(gate, "norm_topk_prob")
        self.renormalize = bool(getattr(gate, "norm_topk_prob", True))
        self.act = block.experts.act_fn
        self.shared_expert = getattr(block, "shared_expert", None)
        self.shared_expert_gate = getattr(block, "shared_expert_gate", None)
        self.layer, self.cache, self.routing = layer, cache, routing
        self.k_max = routing.k_max or self.top_k
        check(self.k_max <= self.n_experts, f"k_max {self.k_max} is above the {self.n_experts} experts per layer",
              f"use k_max <= {self.n_experts}")
        self.next_router: torch.Tensor | None = None  # the next MoE layer's router, for prefetch
        self.register_buffer("counts", torch.zeros(self.n_experts, dtype=torch.long), persistent=False)
        self.tokens = 0

    def route(self, probs: torch.Tensor) -> torch.Tensor:
        """(N, E) fp32 router probabilities → (N, E) weight of each token's experts (0: not routed)."""
        r = self.routing
        if not r.dynamic:
            top, idx = torch.topk(probs, self.top_k, dim=-1)
            if self.renormalize:
                top = top / top.sum(dim=-1, keepdim=True)
        else:
            top, idx = torch.sort(probs, dim=-1, descending=True)
            top, idx = top[:, :self.k_max], idx[:, :self.k_max]
            if r.top_p is not None:  # keep expert j while the mass before it is under top_p
                keep = (top.cumsum(-1) - top) < r.top_p
            else:
                keep = top >= r.threshold
            keep[:, :r.k_min] = True
            top = top * keep
            if self.renormalize:
                top = top / top.sum(dim=-1, keepdim=True)
        if self.qwen_style:
            top = top.to(self.router.dtype)
        return torch.zeros_like(probs, dtype=top.dtype).scatter_(1, idx, top)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        probs = F.softmax(F.linear(x, self.router).float(), dim=-1)
        weights = self.route(probs)
        routed = weights != 0
        self.counts += routed.sum(0)
        self.tokens += x.shape[0]
        experts = routed.any(0).nonzero()[:, 0].tolist()
        cache = self.cache
        cache.begin(self.layer, experts)
        if self.next_router is not None:
            # The next layer's router applied to this layer's input guesses its experts; the top guess
            # is prefetched when the guess is confident. On `moe` (25% resident, LFU) the top guess is
            # right 61% of the time, 75% when its probability is >= 0.5; a wrong one costs a load and
            # evicts an expert that may have been used (the top two were right 58% of the time).
            guess = F.softmax(F.linear(x, self.next_router).float(), dim=-1).mean(0)
            top = int(guess.argmax())
            if guess[top] >= PREFETCH_MIN_PROB:
                cache.prefetch(self.layer + 1, guess.tolist(), [top])
        ready = cache.ready(self.layer, experts)
        outputs = {}
        for e in ready + [e for e in experts if e not in ready]:
            tokens = routed[:, e].nonzero()[:, 0]
            out = cache.fetch(self.layer, e)(x[tokens], self.act)
            outputs[e] = (tokens, out * weights[tokens, e, None])
        final = torch.zeros_like(x)
        for e in experts:  # ascending, whatever order they were computed in
            tokens, out = outputs[e]
            final.index_add_(0, tokens, out.to(final.dtype))
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            final = final + shared
        return final.view(shape)

    def reset_counts(self) -> None:
        self.counts.zero_()
        self.tokens = 0
