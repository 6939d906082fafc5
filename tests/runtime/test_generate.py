import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import pocketlm
from pocketlm.compress.prune.configs import MlpPruneConfig
from pocketlm.compress.prune.structured import layer_shapes, prune_heads_
from pocketlm.errors import ConfigError, DataError
from pocketlm.eval.data import DEFAULT_TEXT
from pocketlm.runtime import Generator, SamplingConfig, cpu_linear

TEXT = DEFAULT_TEXT.read_text()


def prompts(tok, n, chars=90):
    """n prompts cut from the held-out text at spread offsets, as token ids of different lengths."""
    step = len(TEXT) // n
    return [tok(TEXT[i * step: i * step + chars + 7 * (i % 5)])["input_ids"] for i in range(n)]


def hf_greedy(model, ids, n):
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                         min_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return out[0, x.shape[1]:].tolist()


def engine_greedy(gen, ids, n):
    return [int(t[0]) for t, _ in gen.generate_step([ids], n, stop_tokens=set())]


@pytest.mark.parametrize("which", ["tiny", "reasoner"])
def test_greedy_equals_transformers_on_64_prompts(which, tiny, reasoner):
    model, tok = tiny if which == "tiny" else reasoner
    gen = Generator(model, tok)
    for ids in prompts(tok, 64):
        assert engine_greedy(gen, ids, 16) == hf_greedy(model, ids, 16)


def test_left_padded_batch_equals_one_by_one(tiny):
    model, tok = tiny
    gen = Generator(model, tok)
    batch = prompts(tok, 8)
    assert len({len(p) for p in batch}) > 1  # the batch really needs padding
    rows = [[] for _ in batch]
    for tokens, _ in gen.generate_step(batch, 20, stop_tokens=set()):
        for r, t in enumerate(tokens.tolist()):
            rows[r].append(t)
    assert rows == [engine_greedy(gen, p, 20) for p in batch]


FAMILIES = {
    "qwen2": {},  # q/k/v biases
    "qwen3": {"head_dim": 16},  # q/k RMSNorm per head
    "mistral": {},
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64),
}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_other_families_match_transformers(tiny, model_type):
    cfg = AutoConfig.for_model(model_type, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=96, vocab_size=8192, **FAMILIES[model_type])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    if model_type == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    gen = Generator(model, tiny[1])
    for ids in prompts(tiny[1], 4):
        assert engine_greedy(gen, ids, 12) == hf_greedy(model, ids, 12)


def test_embedded_moe_matches_transformers(tiny):
    model, tok = pocketlm.load("moe")
    gen = Generator(model, tok)
    for ids in prompts(tok, 6):
        assert engine_greedy(gen, ids, 12) == hf_greedy(model, ids, 12)


def test_pruned_model_with_uneven_layers(tiny):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    pocketlm.compress_(model, MlpPruneConfig(ratio=0.5, scope="global"), tok=tok, calib_samples=4, calib_len=64,
                       show_progress=False)
    prune_heads_(model.model.layers[1].self_attn, keep_q=[0, 2], keep_kv=[0, 1])  # layer 1 only: 2 of 4 heads
    shapes = layer_shapes(model)
    assert len({s["q_heads"] for s in shapes}) > 1 and len({s["intermediate"] for s in shapes}) > 1
    gen = Generator(model, tok)
    for ids in prompts(tok, 4):
        assert engine_greedy(gen, ids, 12) == hf_greedy(model, ids, 12)


def test_compiled_decode_matches_eager(tiny):
    model, tok = tiny
    eager, compiled = Generator(model, tok), Generator(model, tok, compile=True)
    batch = prompts(tok, 3)
    for ids in batch:
        assert engine_greedy(compiled, ids, 10) == engine_greedy(eager, ids, 10)
    assert compiled.compile_s > 0 and eager.compile_s == 0
    padded_c = [t.tolist() for t, _ in compiled.generate_step(batch, 6, stop_tokens=set())]
    padded_e = [t.tolist() for t, _ in eager.generate_step(batch, 6, stop_tokens=set())]
    assert padded_c == padded_e


def _storage_bytes(model) -> int:
    return sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}.values())


def test_fp32_linears_run_on_the_cpu_kernels_without_a_weight_copy(tiny):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    before = _storage_bytes(model)
    gen = Generator(model, tok, compile=True)
    attn = model.model.layers[0].self_attn
    qkv = gen.decoder.layers[0].qkv
    assert qkv.out_major and attn.k_proj.weight.data_ptr() == qkv.packed[attn.q_proj.out_features:].data_ptr()
    assert _storage_bytes(model) == before  # the HF modules hold views of the packed buffers
    ids = prompts(tok, 2)
    with torch.profiler.profile() as prof:
        steps = [t.tolist() for t, _ in gen.generate_step(ids, 4, stop_tokens=set())]
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get("pocketlm_cpu::linear", 0) > 0  # compiled steps call the C++ kernel...
    assert steps == [t.tolist() for t, _ in Generator(model, tok).generate_step(ids, 4, stop_tokens=set())]
    half = copy.deepcopy(tiny[0]).to(torch.bfloat16)  # ...and other dtypes keep MKL's input-major layout
    assert not Generator(half, tok).decoder.layers[0].qkv.out_major


def test_compiled_step_says_when_the_cpu_kernel_cannot_be_built(tiny, monkeypatch):
    from torch.utils import cpp_extension

    def no_compiler(*a, **k):
        raise RuntimeError("Ninja is required to load C++ extensions")
    monkeypatch.setattr(cpu_linear, "_built", False)
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    gen = Generator(copy.deepcopy(tiny[0]), tiny[1], compile=True)
    with pytest.raises(ConfigError, match="CPU linear kernel.*Ninja is required"):
        list(gen.generate_step(prompts(tiny[1], 1), 3))


def test_logprobs_are_the_model_log_softmax(tiny):
    model, tok = tiny
    ids = prompts(tok, 1)[0]
    (token, logprob), = list(Generator(model, tok).generate_step([ids], 1))
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
    assert int(token[0]) == int(ref.argmax())
    assert float(logprob[0]) == pytest.approx(float(ref.max()), abs=1e-4)


def test_seeded_sampling_repeats_and_differs_across_seeds(tiny):
    model, tok = tiny
    gen = Generator(model, tok)
    ids = prompts(tok, 1)[0]

    def run(seed):
        cfg = SamplingConfig(temperature=1.0, top_p=0.95, seed=seed)
        return [int(t[0]) for t, _ in gen.generate_step([ids], 24, cfg, stop_tokens=set())]
    assert run(1) == run(1)
    assert run(1) != run(2)
    # top_k=1 leaves only the argmax, whatever the temperature
    k1 = SamplingConfig(temperature=5.0, top_k=1, seed=3)
    assert [int(t[0]) for t, _ in gen.generate_step([ids], 10, k1, stop_tokens=set())] == engine_greedy(gen, ids, 10)


def test_repetition_penalty_matches_transformers(tiny):
    model, tok = tiny
    ids = prompts(tok, 1)[0]
    x = torch.tensor([ids])
    ref = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=16,
                         repetition_penalty=1.3, pad_token_id=0)[0, len(ids):].tolist()
    cfg = SamplingConfig(repetition_penalty=1.3)
    mine = [int(t[0]) for t, _ in Generator(model, tok).generate_step([ids], 16, cfg)]
    assert mine == ref[:len(mine)]
    assert mine != engine_greedy(Generator(model, tok), ids, 16)  # the penalty changed something


def test_stream_concatenates_to_generate_and_stops_at_strings(tiny):
    model, tok = tiny
    gen = Generator(model, tok)
    prompt = TEXT[:80]
    full = gen.generate(prompt, 30)
    responses = list(gen.stream_generate(prompt, 30))
    assert "".join(r.text for r in responses) == full
    assert responses[-1].finish_reason == "length" and responses[-1].generation_tokens == 30
    assert all(r.finish_reason is None for r in responses[:-1])
    stop = full[10:14]
    cut = gen.generate(prompt, 30, stop_strings=[stop])
    assert cut == full[:full.find(stop)]
    streamed = list(gen.stream_generate(prompt, 30, stop_strings=[stop]))
    assert "".join(r.text for r in streamed) == cut and streamed[-1].finish_reason == "stop"


def test_stop_token_ends_the_stream(tiny):
    model, tok = tiny
    gen = Generator(model, tok)
    ids = prompts(tok, 1)[0]
    greedy = engine_greedy(gen, ids, 8)
    gen.stop_tokens = {greedy[3]}
    out = list(gen.stream_generate(ids, 8))
    assert [r.token for r in out] == greedy[:greedy.index(greedy[3]) + 1]
    assert out[-1].finish_reason == "stop"


def test_bad_requests(tiny):
    model, tok = tiny
    gen = Generator(model, tok, max_context=64)
    with pytest.raises(ConfigError, match="exceed the context of 64"):
        list(gen.generate_step([[1] * 60], 10))
    with pytest.raises(DataError, match="no tokens"):
        list(gen.generate_step([[]], 10))
    with pytest.raises(ConfigError, match="below 1"):
        list(gen.generate_step([[1, 2]], 0))
    with pytest.raises(ConfigError, match="top_p"):
        SamplingConfig(top_p=0)


def test_packing_keeps_the_model_and_its_saves_unchanged(tmp_path):
    model, tok = pocketlm.load("tiny")
    x = torch.randint(0, 8192, (1, 12))
    with torch.no_grad():
        before = model(x).logits
    size = pocketlm.eval.efficiency.weight_bytes(model)
    Generator(model, tok)  # packs q/k/v and gate/up into shared buffers, modules keep views
    assert model.model.layers[0].self_attn.k_proj.weight.untyped_storage().data_ptr() == \
        model.model.layers[0].self_attn.q_proj.weight.untyped_storage().data_ptr()
    assert pocketlm.eval.efficiency.weight_bytes(model) == size  # no copy kept
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tie intact
    pocketlm.save(model, tok, tmp_path / "art")
    weights = (tmp_path / "art" / "model.safetensors").stat().st_size
    assert abs(weights - size) < 64 * 1024  # the tied head is written once, nothing twice
    reloaded, _ = pocketlm.load(tmp_path / "art")
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)
        assert torch.equal(reloaded(x).logits, before)


def test_fp16_on_cpu_keeps_its_layout():
    model, tok = pocketlm.load("tiny", dtype="float16")
    Generator(model, tok)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.is_contiguous() and model.lm_head.weight.is_contiguous()


def test_a_second_generator_shares_the_packed_weights(tiny):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    Generator(model, tok)
    attn = model.model.layers[0].self_attn
    ptr = attn.q_proj.weight.untyped_storage().data_ptr()
    gen = Generator(model, tok)
    assert attn.q_proj.weight.untyped_storage().data_ptr() == ptr  # no second copy
    ids = prompts(tok, 1)[0]
    assert engine_greedy(gen, ids, 8) == hf_greedy(model, ids, 8)
    # a module replaced since (structured pruning) is packed afresh
    pocketlm.compress_(model, MlpPruneConfig(ratio=0.5), tok=tok, calib_samples=4, calib_len=64, show_progress=False)
    gen = Generator(model, tok)
    assert engine_greedy(gen, ids, 8) == hf_greedy(model, ids, 8)


def test_streamed_text_across_lines_equals_one_decode(tiny):
    model, tok = tiny
    gen = Generator(model, tok)
    checked = 0
    for ids in prompts(tok, 6):
        tokens = [int(t[0]) for t, _ in gen.generate_step([ids], 80, stop_tokens=set())]
        if any(t in gen.stop_tokens for t in tokens):
            tokens = tokens[:next(i for i, t in enumerate(tokens) if t in gen.stop_tokens)]
        full = tok.decode(tokens, skip_special_tokens=True)
        checked += "\n" in full  # the per-line decoding window is really exercised
        assert "".join(r.text for r in gen.stream_generate(ids, 80)) == full
    assert checked > 0
