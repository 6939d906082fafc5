import pytest
import torch

import pocketlm
from pocketlm.runtime import Generator
from pocketlm.eval.efficiency import decode_tok_s, disk_bytes, measure_efficiency, weight_bytes
from pocketlm.eval.energy import CpuTimeEstimate
from pocketlm.eval.protocol import EvalProtocol
from pocketlm.io import ASSETS

QUICK = EvalProtocol(tokens=512, prefill_tokens=64, decode_new_tokens=8, decode_batch_sizes=(1, 2),
                     warmup=0, repeats=2)


def test_weight_bytes_counts_tied_embedding_once(tiny):
    model, _ = tiny
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    params = sum(p.numel() for p in model.parameters())  # parameters() already yields a tied weight once
    assert params == 1_787_008
    assert 4 * params <= weight_bytes(model) < 4 * params * 1.01  # plus the small rotary buffer


def test_bf16_weights_are_half_of_fp32(tiny):
    bf16, _ = pocketlm.load("tiny", dtype="bfloat16")
    ratio = weight_bytes(bf16) / weight_bytes(tiny[0])
    assert 0.49 < ratio < 0.51


def test_disk_bytes_is_the_safetensors_file():
    path = ASSETS / "models" / "tiny"
    assert disk_bytes(path) == (path / "model.safetensors").stat().st_size
    assert disk_bytes(None) is None


def test_speed_fields_and_estimated_energy(tiny):
    model, tok = tiny
    windows = torch.randint(0, 8192, (1, 512))
    eff, energy = measure_efficiency(model, tok, windows, QUICK, show_progress=False)
    assert eff["engine"] == "pocketlm (eager)" and eff["compile_s"] is None
    assert set(eff["decode_tok_s_batch"]) == {"1", "2"}
    assert eff["decode_tok_s"] == eff["decode_tok_s_batch"]["1"] > 0
    assert eff["prefill_ms"] > 0 and eff["peak_rss_mb"] > eff["weights_mb"]
    # This machine has no readable counter: the estimate must say so, never 'measured'.
    assert energy["kind"] == "estimated" and energy["watts_per_core"] == 10.0
    assert energy["tokens"] == QUICK.repeats * 1 * (1 + QUICK.decode_new_tokens)
    assert energy["joules_per_token"] == pytest.approx(energy["joules"] / energy["tokens"])


def test_no_speed_skips_timing(tiny):
    eff, energy = measure_efficiency(*tiny, torch.zeros(1, 512, dtype=torch.long),
                                     QUICK.replace(speed=False), show_progress=False)
    assert eff["decode_tok_s"] is None and eff["prefill_ms"] is None and energy is None
    assert eff["weights_mb"] > 0


def test_decode_generates_forced_length(tiny, monkeypatch):
    model, _ = tiny
    lengths = []
    real = model.generate

    def spy(**kwargs):
        result = real(**kwargs)
        lengths.append(result.shape[1] - kwargs["input_ids"].shape[1])
        return result
    monkeypatch.setattr(model, "generate", spy)
    rate, reading = decode_tok_s(model, torch.randint(0, 8192, (1, 64)), batch=2, prompt_len=16, new_tokens=12,
                                 warmup=1, repeats=2, meter=CpuTimeEstimate(5.0))
    assert lengths == [1, 12] * 3  # warm-up pair + two timed pairs, eos never stops it early
    assert rate > 0 and reading["tokens"] == 2 * 2 * 13


def test_engine_decode_generates_forced_length(tiny):
    model, tok = tiny
    gen = Generator(model, tok)
    gen.stop_tokens = set(range(8192))  # every token is a stop token: the timing must ignore them
    steps = []
    real = gen.generate_step

    def spy(*args, **kwargs):
        n = 0
        for out in real(*args, **kwargs):
            n += 1
            yield out
        steps.append(n)
    gen.generate_step = spy
    rate, _ = decode_tok_s(gen, torch.randint(0, 8192, (1, 64)), batch=2, prompt_len=16, new_tokens=12,
                           warmup=1, repeats=2)
    assert steps == [1, 12] * 3 and rate > 0


def test_transformers_engine_is_named(tiny):
    eff, _ = measure_efficiency(*tiny, torch.randint(0, 8192, (1, 512)),
                                QUICK.replace(engine="transformers", decode_batch_sizes=(1,)), show_progress=False)
    assert eff["engine"] == "transformers.generate" and eff["decode_tok_s"] > 0


def test_compiled_engine_reports_compile_time_apart(tiny):
    eff, _ = measure_efficiency(*tiny, torch.randint(0, 8192, (1, 512)),
                                QUICK.replace(compile=True, decode_batch_sizes=(1,)), show_progress=False)
    assert eff["engine"] == "pocketlm (compiled)" and eff["compile_s"] > 0 and eff["decode_tok_s"] > 0
