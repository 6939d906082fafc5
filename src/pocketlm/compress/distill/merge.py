"""Checkpoint merging: linear average, SLERP and TIES over models of one architecture.

- linear: sum_i w_i * theta_i, weights normalized to sum to 1 (equal by default).
- slerp (two models): per tensor, spherical interpolation at t between the two flattened weights
  (linear where they are nearly parallel), as mergekit does.
- ties (Yadav et al. 2023, needs the base the models were fine-tuned from): per tensor, task vectors
  tau_i = theta_i - base keep their top `density` share of entries by magnitude; each entry's sign is
  elected by the summed trimmed vectors; the entries that agree with it are averaged; base + that.

Every model must have the same tensors with the same shapes; integer tensors (quantized codes,
buffers) must be equal, since averaging codes is meaningless.
"""
from __future__ import annotations

import torch

from ...errors import ConfigError

METHODS = ("linear", "slerp", "ties")


def check_compatible(states: list[dict[str, torch.Tensor]], names: list[str]) -> None:
    """Same keys and shapes everywhere, else a ConfigError naming the first difference."""
    ref = states[0]
    for state, name in zip(states[1:], names[1:]):
        if state.keys() != ref.keys():
            diff = sorted(set(state) ^ set(ref))[:3]
            raise ConfigError(f"'{name}' and '{names[0]}' have different tensors ({', '.join(diff)})",
                              "merge models of one architecture and size")
        for key, t in state.items():
            if t.shape != ref[key].shape:
                raise ConfigError(f"incompatible merge shapes: {key} is {tuple(t.shape)} in '{name}' and "
                                  f"{tuple(ref[key].shape)} in '{names[0]}'", "merge models of one architecture and size")


def _slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-6) -> torch.Tensor:
    af, bf = a.flatten().double(), b.flatten().double()
    cos = (af @ bf) / (af.norm() * bf.norm()).clamp(min=eps)
    if cos.abs() > 1 - eps:  # (anti)parallel: the arc is a line
        return torch.lerp(a.double(), b.double(), t)
    omega = torch.arccos(cos.clamp(-1, 1))
    return ((torch.sin((1 - t) * omega) * a.double() + torch.sin(t * omega) * b.double()) / torch.sin(omega))


def _ties(base: torch.Tensor, thetas: list[torch.Tensor], density: float) -> torch.Tensor:
    taus = torch.stack([t.double() - base.double() for t in thetas])  # (n, ...)
    flat = taus.flatten(1)
    k = max(1, int(round(density * flat.shape[1])))
    cutoff = flat.abs().kthvalue(flat.shape[1] - k + 1, dim=1, keepdim=True).values  # each model's k-th largest |tau|
    trimmed = torch.where(flat.abs() >= cutoff, flat, torch.zeros_like(flat))
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    merged = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    return base.double() + merged.view(base.shape)


def check_options(n_models: int, method: str, *, weights: list[float] | None, t: float, has_base: bool,
                  density: float) -> None:
    """Refuse impossible settings before any model is loaded."""
    if method not in METHODS:
        raise ConfigError(f"unknown merge method '{method}'", f"use one of: {', '.join(METHODS)}")
    if n_models < 2:
        raise ConfigError("merging needs at least two models", "pass two or more model directories")
    if method == "slerp" and n_models != 2:
        raise ConfigError(f"slerp merges exactly two models ({n_models} given)", "use linear or ties for more")
    if method == "slerp" and not 0 <= t <= 1:
        raise ConfigError(f"slerp t {t} is outside [0, 1]", "use e.g. --t 0.5")
    if method == "ties" and not has_base:
        raise ConfigError("ties needs the base model the others were fine-tuned from", "pass --base BASE")
    if method == "ties" and not 0 < density <= 1:
        raise ConfigError(f"ties density {density} is outside (0, 1]", "use e.g. --density 0.5")
    if weights is not None and (len(weights) != n_models or any(w < 0 for w in weights) or sum(weights) <= 0):
        raise ConfigError(f"{len(weights)} weights for {n_models} models (or a negative one)",
                          "give one non-negative weight per model")


def merge_states(states: list[dict[str, torch.Tensor]], method: str, *, names: list[str] | None = None,
                 weights: list[float] | None = None, t: float = 0.5, base: dict[str, torch.Tensor] | None = None,
                 density: float = 0.5) -> dict[str, torch.Tensor]:
    """Merge state dicts (see the module docstring); float results keep the first model's dtype."""
    names = names or [f"model {i}" for i in range(len(states))]
    check_options(len(states), method, weights=weights, t=t, has_base=base is not None, density=density)
    check_compatible(states + ([base] if base is not None else []), names + (["base"] if base is not None else []))
    w = torch.tensor(weights or [1.0] * len(states), dtype=torch.float64)
    w = w / w.sum()
    out = {}
    for key, ref in states[0].items():
        tensors = [s[key] for s in states]
        if not ref.is_floating_point():
            if any(not torch.equal(x, ref) for x in tensors[1:]):
                raise ConfigError(f"'{key}' holds integer values (quantized codes?) that differ between models",
                                  "merge the float models, then quantize the result")
            out[key] = ref.clone()
            continue
        if method == "linear":
            merged = sum(wi * x.double() for wi, x in zip(w.tolist(), tensors))
        elif method == "slerp":
            merged = _slerp(tensors[0], tensors[1], t)
        else:
            merged = _ties(base[key], tensors, density)
        out[key] = merged.to(ref.dtype)
    return out


def merge_models(sources: list[str], method: str, *, weights: list[float] | None = None, t: float = 0.5,
                 base: str | None = None, density: float = 0.5, dtype: str = "float32"):
    """Load `sources` (and `base` for TIES), merge them, and return (model, tokenizer, record entry):
    the first source's model holding the merged weights, ready for `pocketlm.save`."""
    from ...io import load
    check_options(len(sources), method, weights=weights, t=t, has_base=base is not None, density=density)
    models = [load(s, dtype=dtype) for s in sources]
    base_model = load(base, dtype=dtype)[0] if base is not None else None
    vocab = models[0][1].get_vocab()
    for (_, tok), name in zip(models[1:], sources[1:]):
        if tok.get_vocab() != vocab:
            raise ConfigError(f"'{name}' has another tokenizer than '{sources[0]}'",
                              "merge models that share a tokenizer")
    states = [{k: v.detach() for k, v in m.state_dict().items()} for m, _ in models]
    merged = merge_states(states, method, names=list(sources), weights=weights, t=t, density=density,
                          base={k: v.detach() for k, v in base_model.state_dict().items()} if base_model else None)
    model, tok = models[0]
    with torch.no_grad():
        model.load_state_dict(merged)
    entry = {"kind": "merge", "method": method, "sources": list(sources), "weights": weights,
             "t": t if method == "slerp" else None, "base": base, "density": density if method == "ties" else None}
    return model, tok, entry
