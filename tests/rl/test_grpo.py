import pytest
import torch

from pocketlm.rl.grpo import group_advantages, pack, policy_loss


def test_group_advantages_are_normalized_per_group():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0]]))
    assert adv[0].mean().abs() < 1e-6 and adv[0, 0] > 0 > adv[0, 1]
    assert torch.all(adv[1] == 0)  # all alike: nothing to learn from this group


def test_pack_marks_completion_targets():
    ids, attn, target = pack([[5, 6], [7]], [[8, 9, 10], [11]], pad=0)
    assert ids.tolist() == [[5, 6, 8, 9, 10], [7, 11, 0, 0, 0]]
    assert attn.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    # position t predicts token t+1: row 0's completion tokens are predicted at 1, 2, 3
    assert target.tolist() == [[False, True, True, True], [True, False, False, False]]


def _loss(logp, prox, behaviour, adv, **kw):
    mask = torch.ones_like(logp, dtype=torch.bool)
    opts = {"clip": 0.2, "is_cap": 2.0, "kl_coef": 0.0, **kw}
    return policy_loss(logp, prox, behaviour, None, adv, mask, logp.numel(), **opts)


def test_positive_advantage_raises_the_tokens_probability():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _ = _loss(logp, logp.detach(), logp.detach(), torch.tensor([1.0]))
    loss.backward()
    assert torch.all(logp.grad < 0)  # descending the loss raises logp
    logp.grad = None
    loss, _ = _loss(logp, logp.detach(), logp.detach(), torch.tensor([-1.0]))
    loss.backward()
    assert torch.all(logp.grad > 0)


def test_clipping_stops_the_gradient_beyond_the_trust_region():
    prox = torch.tensor([[-1.0]])
    far = (prox + 0.5).requires_grad_(True)  # ratio e^0.5 > 1.2 with a positive advantage: clipped
    loss, stats = _loss(far, prox, prox, torch.tensor([1.0]))
    loss.backward()
    assert far.grad.abs().item() == 0 and stats["clipped"] == 1
    near = (prox + 0.1).requires_grad_(True)
    _loss(near, prox, prox, torch.tensor([1.0]))[0].backward()
    assert near.grad.abs().item() > 0


def test_importance_weight_is_truncated():
    logp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    behaviour = torch.tensor([[-1.0 - 5.0, -1.0 + 0.5]])  # token 0 far likelier now than when sampled
    loss, stats = _loss(logp, logp.detach(), behaviour, torch.tensor([1.0]), is_cap=2.0)
    loss.backward()
    w = -logp.grad * logp.numel()  # d loss / d logp = -w·A/N at ratio 1
    assert w[0, 0].item() == pytest.approx(2.0) and w[0, 1].item() == pytest.approx(torch.exp(torch.tensor(-0.5)).item())
    assert stats["is_truncated"] == 1


def test_kl_to_the_reference_is_zero_at_the_reference_and_positive_away():
    logp = torch.tensor([[-1.0, -2.0]])
    mask = torch.ones_like(logp, dtype=torch.bool)
    kw = {"clip": 0.2, "is_cap": 2.0, "kl_coef": 1.0}
    _, same = policy_loss(logp, logp, logp, logp, torch.zeros(1), mask, 2, **kw)
    _, away = policy_loss(logp, logp, logp, logp - 0.3, torch.zeros(1), mask, 2, **kw)
    assert same["kl"] == pytest.approx(0.0, abs=1e-7) and away["kl"] > 0
