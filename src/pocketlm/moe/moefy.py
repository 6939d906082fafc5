"""MoEfication: split each dense gated FFN into experts and add a router, so a token runs only top-k of them.

Per layer, on calibration data of the dense model (MoEfication, Zhang et al. 2022; LLaMA-MoE):
1. Neurons that fire together go together: each intermediate neuron is described by its |activation|
   over calibration tokens, and balanced k-means (cosine, equal-size clusters) splits them into E experts.
2. The FFN's rows/columns are permuted so each expert is one contiguous block: the model is the same
   function, and with all E experts active it is the dense model.
3. A linear router is trained to predict how the activation mass (sum of |activation|) spreads over the
   experts (cross-entropy against that distribution); at run time a token computes its top-k experts.

Selected experts are computed exactly and summed unweighted (the dense FFN's sum, minus the experts
left out), so no retraining of the FFN is needed. The result saves as an artifact that `pocketlm.load`
rebuilds (transformers has no class for it: Mixtral weights experts by router probabilities).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ..progress import progress_bar


class MoEfiedFFN(nn.Module):
    """A gated FFN whose intermediate neurons form `experts` equal contiguous blocks, top-k per token."""

    def __init__(self, hidden: int, intermediate: int, experts: int, top_k: int, act, dtype=torch.float32):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, dtype=dtype)
        self.router = nn.Linear(hidden, experts, dtype=dtype)
        self.experts, self.top_k, self.act_fn = experts, top_k, act
        self.size = intermediate // experts

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        chosen = torch.topk(self.router(x), self.top_k, dim=-1).indices  # (N, k)
        routed = torch.zeros(x.shape[0], self.experts, dtype=torch.bool, device=x.device).scatter_(1, chosen, True)
        out = torch.zeros_like(x)
        for e in routed.any(0).nonzero()[:, 0].tolist():
            rows = routed[:, e].nonzero()[:, 0]
            part = slice(e * self.size, (e + 1) * self.size)
            xe = x[rows]
            h = self.act_fn(F.linear(xe, self.gate_proj.weight[part])) * F.linear(xe, self.up_proj.weight[part])
            out.index_add_(0, rows, F.linear(h, self.down_proj.weight[:, part]))
        return out.view(shape)


def _dense_mlps(model) -> list:
    layers = getattr(getattr(model, "model", None), "layers", None)
    mlps = [getattr(layer, "mlp", None) for layer in layers or []]
    if not mlps or any(not all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")) for m in mlps):
        raise UnsupportedModelError(f"{type(model).__name__} has no dense gated FFN in every layer",
                                    "moefy a dense Llama/Qwen/Mistral model (an MoE model is already one)")
    if any(type(getattr(m, n)) is not nn.Linear for m in mlps for n in ("gate_proj", "up_proj", "down_proj")):
        raise UnsupportedModelError("moefy needs float FFN weights and this model's are quantized",
                                    "moefy the float model (quantized MoEfied FFNs do not exist yet)")
    return mlps


def install_moefied(model, experts: int, top_k: int) -> list[MoEfiedFFN]:
    """Replace every dense FFN by an (empty) MoEfiedFFN of the same shape: the loader's path."""
    new = []
    for layer, mlp in zip(model.model.layers, _dense_mlps(model)):
        w = mlp.gate_proj.weight
        ffn = MoEfiedFFN(w.shape[1], w.shape[0], experts, top_k, mlp.act_fn, w.dtype)
        layer.mlp = ffn
        new.append(ffn)
    return new


def set_top_k(model, top_k: int) -> None:
    """Change how many experts every MoEfied FFN runs per token."""
    for layer in model.model.layers:
        if isinstance(layer.mlp, MoEfiedFFN):
            if not 1 <= top_k <= layer.mlp.experts:
                raise ConfigError(f"top-k {top_k} is outside 1..{layer.mlp.experts}", "pick k among the experts")
            layer.mlp.top_k = top_k


def balanced_clusters(features: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """Cluster the rows of `features` (n, d) into k equal groups by cosine similarity (balanced k-means:
    each round assigns the most similar (row, centroid) pairs first, up to n/k rows per centroid)."""
    n = features.shape[0]
    if n % k:
        raise ConfigError(f"{n} FFN neurons do not split into {k} equal experts", f"pick an expert count dividing {n}")
    f = F.normalize(features.float(), dim=1)
    g = torch.Generator().manual_seed(seed)
    centroids = f[torch.randperm(n, generator=g)[:k]]
    assign = torch.empty(n, dtype=torch.long)
    for _ in range(iters):
        sim = f @ centroids.t()  # (n, k)
        order = sim.flatten().argsort(descending=True)
        assign.fill_(-1)
        room = torch.full((k,), n // k)
        for flat in order.tolist():  # n*k pairs, at most a few thousand neurons per layer
            i, c = divmod(flat, k)
            if assign[i] < 0 and room[c] > 0:
                assign[i] = c
                room[c] -= 1
        new = torch.stack([F.normalize(f[assign == c].mean(0), dim=0) for c in range(k)])
        if torch.allclose(new, centroids):
            break
        centroids = new
    return assign


@torch.no_grad()
def _capture_inputs(model, mlps, tokens: torch.Tensor, batch_size: int, max_tokens: int) -> list[torch.Tensor]:
    """Each dense FFN's inputs for a random `max_tokens` of the calibration tokens (the same tokens in
    every layer), sampled batch by batch so no more than that is ever held."""
    batches = tokens.split(batch_size)
    per_batch = -(-max_tokens // len(batches))
    g = torch.Generator().manual_seed(0)
    seen: list[list[torch.Tensor]] = [[] for _ in mlps]
    rows: list[torch.Tensor] = []

    def keep(mod, args, i):
        seen[i].append(args[0].reshape(-1, args[0].shape[-1])[rows[-1]].float())
    hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: keep(mod, args, i)) for i, m in enumerate(mlps)]
    try:
        for batch in batches:
            rows.append(torch.randperm(batch.numel(), generator=g)[:per_batch])
            model(input_ids=batch)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(s) for s in seen]


def _fit_router(x: torch.Tensor, mass: torch.Tensor, experts: int, steps: int) -> nn.Linear:
    """Linear router x → log-distribution of the activation mass over experts (soft cross-entropy)."""
    target = mass / mass.sum(-1, keepdim=True).clamp(min=1e-12)
    router = nn.Linear(x.shape[1], experts)
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = -(target * F.log_softmax(router(x), -1)).sum(-1).mean()
            loss.backward()
            opt.step()
    return router


@torch.no_grad()
def moefy(model, tokens: torch.Tensor, experts: int = 8, top_k: int = 2, *, router_steps: int = 300,
          max_tokens: int = 8192, batch_size: int = 4, show_progress: bool = True) -> list[MoEfiedFFN]:
    """Turn every dense FFN of `model` into an MoEfiedFFN (in place) and return them.

    tokens: (n, ctx) calibration windows from the model's domain."""
    mlps = _dense_mlps(model)
    inter = mlps[0].gate_proj.out_features
    if experts < 2 or inter % experts:
        raise ConfigError(f"{experts} experts do not split the FFN's {inter} neurons into equal parts",
                          f"pick an expert count of at least 2 that divides {inter}")
    if not 1 <= top_k <= experts:
        raise ConfigError(f"top-k {top_k} is outside 1..{experts}", "pick k among the experts")
    inputs = _capture_inputs(model, mlps, tokens, batch_size, max_tokens)
    new = install_moefied(model, experts, top_k)
    for mlp, ffn, x in progress_bar(list(zip(mlps, new, inputs)), "moefy", show=show_progress):
        dtype = mlp.gate_proj.weight.dtype
        wg, wu, wd = (m.weight.detach().float() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        h = (mlp.act_fn(x @ wg.t()) * (x @ wu.t())).abs()  # (T, I)
        assign = balanced_clusters(h.t(), experts)
        order = torch.cat([(assign == c).nonzero()[:, 0] for c in range(experts)])
        ffn.gate_proj.weight.copy_(wg[order].to(dtype))
        ffn.up_proj.weight.copy_(wu[order].to(dtype))
        ffn.down_proj.weight.copy_(wd[:, order].to(dtype))
        mass = h[:, order].view(h.shape[0], experts, -1).sum(-1)
        router = _fit_router(x, mass, experts, router_steps)
        ffn.router.weight.copy_(router.weight.to(dtype))
        ffn.router.bias.copy_(router.bias.to(dtype))
    record = dict(getattr(model, "pocketlm_record", {}) or {})
    record["moefy"] = {"experts": experts, "top_k": top_k}
    model.pocketlm_record = record
    return new


def ffn_flops_saved(hidden: int, intermediate: int, experts: int, top_k: int) -> float:
    """Share of a dense FFN's multiply-adds per token that the top-k experts skip, net of the router."""
    dense = 3 * hidden * intermediate
    return 1 - (dense * top_k / experts + hidden * experts) / dense
