import copy

import pytest
import torch

import pocketlm
from pocketlm.compress.quant.linear import QuantLinear
from pocketlm.compress.quant.mixed import MixedPrecisionConfig, allocate, apply_bits_
from pocketlm.compress.quant.swap import decoder_linears
from pocketlm.errors import ConfigError

CALIB = dict(calib_samples=4, calib_len=64, show_progress=False)


def test_allocation_is_the_exact_knapsack_optimum():
    costs = {"a": {3: 5.0, 4: 1.0, 8: 0.0}, "b": {3: 0.2, 4: 0.1, 8: 0.0}, "c": {3: 3.0, 4: 2.0, 8: 0.0}}
    sizes = {n: {3: 300, 4: 400, 8: 800} for n in costs}
    # 1500 bytes: upgrading a (3->4 saves 4.0) and c (3->8 saves 3.0) beats any other mix
    assert allocate(costs, sizes, 1500) == {"a": 4, "b": 3, "c": 8}
    assert allocate(costs, sizes, 1600) == {"a": 4, "b": 4, "c": 8}
    assert allocate(costs, sizes, 900) == {"a": 3, "b": 3, "c": 3}
    assert allocate(costs, sizes, 10_000) == {"a": 8, "b": 8, "c": 8}
    with pytest.raises(ValueError, match="below the smallest"):
        allocate(costs, sizes, 800)


def test_budget_is_met_and_sensitive_layers_get_more_bits(tiny):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    cfg = MixedPrecisionConfig(target_bits=5.0, group_size=32, head=False)
    stats = pocketlm.compress_(model, cfg, tok=tok, **CALIB)[0]["stats"]
    bits, sens = stats["bits"], stats["sensitivity"]
    assert stats["mean_bits"] <= 5.0 and len(set(bits.values())) > 1
    for name, b in bits.items():  # each layer is a QuantLinear at its chosen width
        assert model.get_submodule(name).bits == b
    for s in sens.values():  # quantizing one layer harder never helps
        assert s[3] >= s[4] >= s[8] - 1e-6
    # layers given 8 bits are on average more sensitive at 3 bits than layers left at 3
    hi = [sens[n][3] for n, b in bits.items() if b == 8]
    lo = [sens[n][3] for n, b in bits.items() if b == 3]
    assert hi and lo and sum(hi) / len(hi) > sum(lo) / len(lo)


def test_sensitivity_ranking_beats_the_reverse_ranking(tiny):
    """The same widths handed out against the measured sensitivity do clearly worse on held-out text."""
    tok = tiny[1]
    x = torch.tensor([tok((pocketlm.io.ASSETS / "data" / "test.txt").read_text()[:3000])["input_ids"][:256]])
    with torch.no_grad():
        ref = tiny[0](x).logits.log_softmax(-1)

    def kl(m):
        with torch.no_grad():
            logp = m(x).logits.log_softmax(-1)
        return (ref.exp() * (ref - logp)).sum(-1).mean().item()
    cfg = MixedPrecisionConfig(target_bits=4.5, group_size=32, head=False)
    mixed = copy.deepcopy(tiny[0])
    stats = pocketlm.compress_(mixed, cfg, tok=tok, **CALIB)[0]["stats"]
    order = sorted(stats["bits"], key=lambda n: stats["sensitivity"][n][3])  # least sensitive first
    widths = sorted(stats["bits"].values(), reverse=True)  # most bits first
    reverse = copy.deepcopy(tiny[0])
    linears = decoder_linears(reverse)
    apply_bits_(reverse, linears, {n: cfg.scheme(b) for n, b in zip(order, widths)}, cfg, None)
    assert kl(mixed) < 0.8 * kl(reverse)


def test_impossible_budgets_are_refused_before_any_change(tiny):
    with pytest.raises(ConfigError, match="exactly one budget"):
        MixedPrecisionConfig()
    with pytest.raises(ConfigError, match="exactly one budget"):
        MixedPrecisionConfig(target_bits=4, max_size_mb=3)
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    with pytest.raises(ConfigError, match="below the smallest mix"):
        pocketlm.compress_(model, MixedPrecisionConfig(target_bits=2.5, group_size=32), tok=tok, **CALIB)
    with pytest.raises(ConfigError, match="leaves nothing"):
        pocketlm.compress_(model, MixedPrecisionConfig(max_size_mb=0.5, group_size=32), tok=tok, **CALIB)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_gptq_rounding_keeps_the_allocation_and_lowers_the_error(tiny):
    tok = tiny[1]
    x = torch.tensor([tok((pocketlm.io.ASSETS / "data" / "test.txt").read_text()[:3000])["input_ids"][:256]])
    with torch.no_grad():
        ref = tiny[0](x).logits.log_softmax(-1)
    kls, bits = {}, {}
    for method in ("rtn", "gptq"):
        model = copy.deepcopy(tiny[0])
        cfg = MixedPrecisionConfig(target_bits=4.5, group_size=32, head=False, method=method)
        # GPTQ needs more calibration tokens than the sensitivity does (256 tokens overfit)
        bits[method] = pocketlm.compress_(model, cfg, tok=tok, calib_samples=32, calib_len=64,
                                          show_progress=False)[0]["stats"]["bits"]
        with torch.no_grad():
            logp = model(x).logits.log_softmax(-1)
        kls[method] = (ref.exp() * (ref - logp)).sum(-1).mean().item()
        assert all(model.get_submodule(n).bits == b for n, b in bits[method].items())
    assert bits["rtn"] == bits["gptq"] and kls["gptq"] < kls["rtn"]
