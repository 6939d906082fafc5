import pytest
import torch

from pocketlm.errors import ConfigError
from pocketlm.eval.data import DEFAULT_TEXT
from pocketlm.runtime import Generator
from pocketlm.runtime.repair import RepairConfig, find_loop, has_loop
from pocketlm.runtime.rows import decode_rows

TEXT = DEFAULT_TEXT.read_text()


@pytest.mark.parametrize("tokens, start", [
    ([1, 2, 3, 9, 8, 7, 9, 8, 7, 9, 8, 7, 9, 8, 7], 6),   # period 3, the first repeat begins at 6
    ([5] * 12, 1),                                          # one token 12 times (min_span 12)
    ([1, 2, 3, 4, 5, 6, 7], None),
    ([4, 0, 0, 0, 1], None),                                # '000' inside a number is no loop
    ([5] * 11, None),
])
def test_find_loop_periodic(tokens, start):
    assert find_loop(tokens, RepairConfig(ngram=0)) == start


def test_find_loop_exact_earlier_repeat():
    cfg = RepairConfig(ngram=6, min_repeats=3)
    span = [11, 12, 13, 14, 15, 16]
    tokens = [1, *span, 2, 3, *span]
    assert find_loop(tokens, cfg) == len(tokens) - 6
    assert find_loop(tokens, cfg.replace(ngram=0)) is None
    assert has_loop(tokens, cfg) and not has_loop(tokens[:-1], cfg)


def test_repair_config_rejects_impossible_values():
    with pytest.raises(ConfigError):
        RepairConfig(min_repeats=1)
    with pytest.raises(ConfigError):
        RepairConfig(ngram=2)


def _prompts(tok, n):
    step = len(TEXT) // n
    return [tok(TEXT[i * step: i * step + 80])["input_ids"] for i in range(n)]


def test_repair_removes_loops_and_leaves_other_outputs_identical(tiny):
    model, tok = tiny
    gen = Generator(model, tok)
    batch = _prompts(tok, 16)
    cfg = RepairConfig()
    for plain in decode_rows(gen, batch, 96, stops=set()):
        pass
    for fixed in decode_rows(gen, batch, 96, repair=cfg, stops=set()):
        pass
    looped = [has_loop(r.tokens, cfg) for r in plain]
    assert sum(looped) >= 4  # tiny loops often: the test has something to repair
    for before, after in zip(plain, fixed):
        if after.repairs == 0:
            assert after.tokens == before.tokens  # never rolled back: not changed
        else:
            assert after.tokens != before.tokens and after.dropped > 0
    assert sum(has_loop(r.tokens, cfg) for r in fixed) < sum(looped)
    assert all(len(r.tokens) == 96 for r in fixed)  # a repaired row still gets its full length


def test_forget_equals_rewinding(tiny):
    """After forgetting a row's last tokens and feeding the last kept one again, the logits are those
    that followed it the first time (a padded batch, so positions and masks are per row)."""
    model, tok = tiny
    gen = Generator(model, tok)
    batch = _prompts(tok, 3)
    run = gen.start(batch, 24, logits=True)
    fed, seen = [], []
    for _ in range(8):
        tokens, _ = run.choose()
        seen.append(run.logits().clone())
        fed.append(tokens)
        run.advance(tokens)
    run.forget(1, 4)  # row 1 drops fed[4:8]; fed[3] goes again to get the logits after it
    again = torch.stack(fed[7:8])[0].clone()
    again[1] = fed[3][1]
    run.forget(1, 1)
    run.advance(again)
    torch.testing.assert_close(run.logits()[1], seen[4][1], atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError):
        run.forget(0, 100)
