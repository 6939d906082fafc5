"""GRPO's tensor math: group-normalized advantages, token log-probabilities, the clipped policy loss.

loss = -sum_t w_t * min(r_t A, clip(r_t, 1-eps, 1+eps) A) / N  +  beta * sum_t KL_t / N
  r_t = pi_theta / pi_prox (pi_prox: the learner's policy before this batch's update), w_t =
  min(pi_prox / pi_behaviour, is_cap) the truncated importance weight for tokens sampled by an older
  or a forced behaviour policy (decoupled PPO as in verl's rollout importance sampling), KL_t the k3
  estimator of KL(pi_theta || pi_ref), N the batch's completion tokens (a token-level mean, as DAPO).
"""
from __future__ import annotations

from typing import Sequence

import torch


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """rewards (groups, G) -> (r - group mean) / (group std + eps); a group whose rewards are all equal gets 0."""
    mean, std = rewards.mean(1, keepdim=True), rewards.std(1, keepdim=True)
    return (rewards - mean) / (std + eps)


def pack(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad: int
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids, attention mask, and the mask (B, T-1) of completion targets."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    target = torch.zeros((len(seqs), T - 1), dtype=torch.bool)
    for i, (s, p) in enumerate(zip(seqs, prompts)):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
        target[i, len(p) - 1:len(s) - 1] = True  # position t predicts token t+1
    return ids, attn, target


def next_logprobs(model, ids: torch.Tensor, attn: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T-1, V) log-probabilities of the next token under `model` at `temperature` (fp32)."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    return (logits / temperature).log_softmax(-1)


def token_logprobs(model, ids: torch.Tensor, attn: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T-1) log-probability of each next token under `model` at `temperature` (the policy RL trains
    is the one it samples from: softmax(logits / temperature), as verl)."""
    return next_logprobs(model, ids, attn, temperature).gather(2, ids[:, 1:, None])[..., 0]


def policy_loss(logp: torch.Tensor, prox: torch.Tensor, behaviour: torch.Tensor, ref: torch.Tensor | None,
                adv: torch.Tensor, mask: torch.Tensor, n_tokens: int, *, clip: float, is_cap: float,
                kl_coef: float) -> tuple[torch.Tensor, dict]:
    """The loss of one micro-batch (its share of the batch's token mean) and its statistics.

    logp (B, T) with grad; prox, behaviour, ref (B, T) detached; adv (B,); mask (B, T) completion tokens."""
    m = mask.float()
    ratio = torch.exp(logp - prox)
    weight = torch.exp(prox - behaviour).clamp(max=is_cap)
    a = adv[:, None]
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    pg = -(weight * surrogate * m).sum() / n_tokens
    loss, kl = pg, torch.zeros(())
    if ref is not None and kl_coef > 0:
        d = ref - logp
        kl = ((torch.exp(d) - d - 1) * m).sum() / n_tokens
        loss = loss + kl_coef * kl
    clipped = (((ratio - 1).abs() > clip).float() * m).sum()
    return loss, {"pg": pg.item(), "kl": kl.item(), "clipped": clipped.item(),
                  "is_weight": (weight * m).sum().item(), "is_truncated": (((prox - behaviour).exp() > is_cap).float() * m).sum().item()}
