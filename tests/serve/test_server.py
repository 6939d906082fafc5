"""The OpenAI-compatible server, driven by the official `openai` client on a free loopback port."""
import concurrent.futures as cf
import json
import threading
import time

import httpx
import openai
import pytest
import torch

from pocketlm.runtime import Generator
from pocketlm.runtime.repair import has_loop
from pocketlm.runtime.router import Router
from pocketlm.serve.engine import Engine

PROMPTS = ["Once upon a time", "The function returns", "In the beginning", "A list of"]


def client(server, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def metric(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} missing from /metrics")


@pytest.mark.parametrize("native", [False, True])
def test_greedy_completions_equal_the_engine_and_batch_correctly(serve, tiny, native):
    """Four requests over two slots join and leave the running batch; each gets exactly the tokens the
    engine decodes for it alone (rows at different lengths share decode steps), on the eager step and
    on the native one."""
    s = serve(model="tiny", parallel=2, repair=False, native=native)
    gen = Generator(*tiny)
    lengths = [24, 9, 17, 5]
    expected = [gen.generate(p, n) for p, n in zip(PROMPTS, lengths)]
    c = client(s)
    with cf.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda pn: c.completions.create(model="tiny", prompt=pn[0], max_tokens=pn[1],
                                                            temperature=0), zip(PROMPTS, lengths)))
    assert [g.choices[0].text for g in got] == expected
    assert [g.usage.completion_tokens for g in got] == lengths
    assert metric(s, "llamacpp:n_busy_slots_per_decode") > 1.0  # requests really shared steps
    assert metric(s, "llamacpp:tokens_predicted_total") >= sum(lengths) - len(lengths)
    assert metric(s, "llamacpp:prompt_tokens_total") == sum(len(tiny[1](p)["input_ids"]) for p in PROMPTS)
    assert metric(s, "pocketlm:time_to_first_token_seconds_count") == 4
    assert metric(s, "llamacpp:requests_processing") == 0


def test_streaming_equals_the_whole_answer_and_logprobs_are_the_model_s(serve, tiny):
    s = serve(model="tiny", parallel=1, repair=False)
    c = client(s)
    whole = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "What is a list?"}],
                                      max_tokens=16, temperature=0, logprobs=True, top_logprobs=2,
                                      extra_body={"thinking": "fast"})
    chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "What is a list?"}],
                                            max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"thinking": "fast"}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text.strip() == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 16
    lps = whole.choices[0].logprobs.content
    assert len(lps) == 16 and all(lp.logprob <= 0 and len(lp.top_logprobs) == 2 for lp in lps)
    assert all(lp.logprob == pytest.approx(lp.top_logprobs[0].logprob, abs=1e-4) for lp in lps)  # greedy = top-1


def test_sampling_is_seeded(serve):
    s = serve(model="tiny", parallel=2)
    c = client(s)
    runs = [c.completions.create(model="tiny", prompt="Once", max_tokens=12, temperature=1.0, top_p=0.9, seed=s_)
            .choices[0].text for s_ in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_repair_is_on_by_default_and_removes_loops(serve, tiny):
    plain = Generator(*tiny).generate("Once upon a time", 64)
    ids = tiny[1]("Once upon a time" + plain, add_special_tokens=False)["input_ids"]
    assert has_loop(ids[4:])  # the tiny model loops on this prompt ...
    s = serve(model="tiny", parallel=1)
    r = client(s).completions.create(model="tiny", prompt="Once upon a time", max_tokens=64, temperature=0)
    assert r.pocketlm["repairs"] > 0
    streamed = "".join(ch.choices[0].text for ch in client(s).completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=64, temperature=0, stream=True))
    assert streamed == r.choices[0].text  # ... and the stream never sent what a repair took back


def test_full_queue_answers_429_with_retry_after(serve):
    s = serve(model="tiny", parallel=1, queue_size=0)
    started = threading.Event()

    def long_request():
        with httpx.stream("POST", s.url + "/v1/completions", json={"prompt": "Once", "max_tokens": 400,
                                                                   "temperature": 0, "stream": True}) as r:
            for _ in r.iter_lines():
                started.set()
    t = threading.Thread(target=long_request)
    t.start()
    assert started.wait(30)
    r = httpx.post(s.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "rate_limit_error"
    t.join(60)


def test_a_client_that_leaves_frees_its_slot(serve):
    s = serve(model="tiny", parallel=1, queue_size=0)
    with httpx.stream("POST", s.url + "/v1/completions", json={"prompt": "Once", "max_tokens": 1500,
                                                               "temperature": 0, "stream": True}) as r:
        next(r.iter_lines())
    # the cancelled job leaves at the next step: a new request gets the only slot
    deadline = 200
    while metric(s, "llamacpp:requests_processing") and deadline:
        threading.Event().wait(0.05)
        deadline -= 1
    r = httpx.post(s.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200


def test_health_is_503_while_loading_then_200(serve, monkeypatch):
    gate = threading.Event()
    real = Engine.load

    def slow_load(self):
        gate.wait(30)
        real(self)
    monkeypatch.setattr(Engine, "load", slow_load)
    s = serve(model="tiny", wait_ready=False)
    r = httpx.get(s.url + "/health")
    assert r.status_code == 503 and r.json()["status"] == "loading"
    assert httpx.post(s.url + "/v1/completions", json={"prompt": "Hi"}).status_code == 503
    gate.set()
    s.wait_ready()
    assert httpx.get(s.url + "/health").json()["status"] == "ok"
    assert client(s).models.list().data[0].id == "tiny"


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(serve):
    s = serve(model="tiny", parallel=2, ctx_size=64, max_tokens_limit=32, max_body_bytes=2048)
    post = lambda body, **kw: httpx.post(s.url + "/v1/completions", **({"json": body} if body is not None else kw))
    cases = [
        (post(None, content=b"{not json", headers={"content-type": "application/json"}), 400, "not valid JSON"),
        (post({"prompt": "Hi", "model": "gpt-9"}), 404, "not served here"),
        (post({"prompt": "word " * 80}), 400, "context is 64"),
        (post({"prompt": "Hi", "max_tokens": 33}), 400, "between 1 and 32"),
        (post({"prompt": "word " * 40, "max_tokens": 30}), 400, "exceed the context of 64"),
        (post({"prompt": "Hi", "n": 2}), 400, "n=1"),
        (post({"prompt": "Hi", "temperature": "hot"}), 400, "'temperature' must be a number"),
        (post({"prompt": ""}), 400, "'prompt' must be"),
        (post({"prompt": "x" * 3000}), 413, "over the limit"),
        (httpx.post(s.url + "/v1/chat/completions", json={"messages": []}), 400, "'messages'"),
        (httpx.post(s.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                          "thinking": "deep"}), 400, "'thinking'"),
    ]
    for r, status, words in cases:
        assert r.status_code == status, (r.status_code, r.text)
        assert words in r.json()["error"]["message"], r.text
    with pytest.raises(openai.NotFoundError):
        client(s).completions.create(model="other", prompt="Hi", max_tokens=2)
    assert post({"prompt": "Hi", "max_tokens": 3}).status_code == 200


def test_an_error_in_one_request_spares_the_others(serve):
    s = serve(model="tiny", parallel=2)
    slots = s.engine.scheduler.slots
    real = slots.prefill

    def prefill(row, ids, capture=None):
        if len(ids) == 7:
            raise RuntimeError("boom")
        return real(row, ids, capture)
    slots.prefill = prefill
    c = client(s)
    with cf.ThreadPoolExecutor(2) as pool:
        bad = pool.submit(c.completions.create, model="tiny", prompt=[5] * 7, max_tokens=4)
        good = pool.submit(c.completions.create, model="tiny", prompt="Once upon", max_tokens=12, temperature=0)
        with pytest.raises(openai.InternalServerError, match="boom"):
            bad.result()
        assert good.result().usage.completion_tokens == 12
    assert httpx.get(s.url + "/health").status_code == 200


def test_api_key_is_required_when_set(serve, tmp_path):
    s = serve(model="tiny", api_keys=("k1", "sekret"))
    assert httpx.get(s.url + "/v1/models").status_code == 401
    assert httpx.get(s.url + "/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(s.url + "/health").status_code == 200  # probes need no key
    with pytest.raises(openai.AuthenticationError):
        client(s, "nope").models.list()
    assert client(s, "sekret").completions.create(model="tiny", prompt="Hi", max_tokens=2).usage.completion_tokens == 2


# ---- thinking modes --------------------------------------------------------------------------------

def _router_dir(tmp_path, model, bias: float, probe: float | None, confidence: float | None = None):
    dim = model.config.num_hidden_layers * model.config.hidden_size
    policy = {"probe": probe, "confidence": confidence}
    r = Router(torch.zeros(dim), bias, torch.zeros(dim), torch.ones(dim), {p: dict(policy) for p in
                                                                           ("probe", "confidence", "both")})
    return str(r.save(tmp_path / f"router{bias}"))


def chat(c, text: str, **extra):
    return c.chat.completions.create(model="reasoner", messages=[{"role": "user", "content": text}],
                                     max_tokens=160, temperature=0, extra_body=extra)


def test_thinking_modes_per_request(serve):
    s = serve(model="reasoner", parallel=2)
    c = client(s)
    q = "What is 17 + 25?"
    slow = chat(c, q, thinking="slow")
    assert slow.choices[0].message.reasoning_content and slow.choices[0].message.content
    assert slow.usage.completion_tokens_details.reasoning_tokens > 0 and slow.pocketlm["mode"] == "slow"
    for extra in ({"thinking": "fast"}, {"chat_template_kwargs": {"enable_thinking": False}},
                  {"reasoning_effort": "none"}):
        fast = chat(c, q, **extra)
        assert fast.pocketlm["mode"] == "fast", extra
        assert not getattr(fast.choices[0].message, "reasoning_content", None)
        assert fast.usage.completion_tokens < slow.usage.completion_tokens
    assert chat(c, q + " /no_think").pocketlm["reason"] == "soft switch"
    cut = chat(c, q, thinking="slow", thinking_budget_tokens=4)
    assert cut.pocketlm["budget_hit"] and cut.usage.completion_tokens_details.reasoning_tokens == 4
    assert cut.choices[0].message.content  # the model answers after the cut
    streamed = list(c.chat.completions.create(model="reasoner", messages=[{"role": "user", "content": q}],
                                              max_tokens=160, temperature=0, stream=True,
                                              extra_body={"thinking": "slow"}))
    think = "".join(getattr(ch.choices[0].delta, "reasoning_content", None) or "" for ch in streamed if ch.choices)
    answer = "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
    assert think.strip() == slow.choices[0].message.reasoning_content
    assert answer.strip() == slow.choices[0].message.content


def test_auto_mode_follows_the_router(serve, reasoner, tmp_path):
    model = reasoner[0]
    easy = serve(model="reasoner", router=_router_dir(tmp_path, model, bias=5.0, probe=0.5))
    assert chat(client(easy), "What is 2 + 2?").pocketlm["mode"] == "fast"  # p_fast = 0.99 ≥ 0.5
    hard = serve(model="reasoner", router=_router_dir(tmp_path, model, bias=-5.0, probe=0.5))
    r = chat(client(hard), "What is 2 + 2?")
    assert r.pocketlm["mode"] == "slow" and r.pocketlm["reason"].startswith("router: p_fast=0.01")
    # confidence policy: no fast token reaches probability 1.01, so every fast try is escalated to slow
    unsure = serve(model="reasoner", router=_router_dir(tmp_path, model, bias=0.0, probe=None, confidence=1.01),
                   router_policy="confidence")
    r = chat(client(unsure), "What is 2 + 2?")
    assert r.pocketlm["mode"] == "slow" and "confidence" in r.pocketlm["reason"]
    assert r.choices[0].message.reasoning_content


def test_hard_requests_escalate_and_fall_back_when_the_server_is_away(serve, reasoner, tmp_path):
    big = serve(model="tiny", model_id="big")
    router = _router_dir(tmp_path, reasoner[0], bias=-5.0, probe=0.5)
    edge = serve(model="reasoner", router=router, escalate_to=big.url + "/v1", escalate_model="big")
    r = chat(client(edge), "Prove Fermat's last theorem.")
    assert r.pocketlm["answered_by"] == "escalated" and r.model == "big"
    assert 'pocketlm:requests_total{outcome="ok"} 1.0' in httpx.get(big.url + "/metrics").text
    away = serve(model="reasoner", router=router, escalate_to="http://127.0.0.1:9/v1", escalate_timeout=2)
    r = chat(client(away), "Prove Fermat's last theorem.")
    assert r.pocketlm["answered_by"] == "local (escalation failed)" and r.pocketlm["mode"] == "slow"
    assert r.pocketlm["escalation"]["error"]
    lines = httpx.get(away.url + "/metrics").text
    assert 'pocketlm:escalations_total{outcome="fallback"} 1.0' in lines
    assert 'pocketlm:escalations_total{outcome="ok"} 1.0' in httpx.get(edge.url + "/metrics").text
    assert json.loads(httpx.get(big.url + "/health").text)["status"] == "ok"


def test_stop_strings_end_the_text_before_them(serve, tiny):
    s = serve(model="tiny", repair=False)
    full = client(s).completions.create(model="tiny", prompt="Once upon a time", max_tokens=24, temperature=0)
    text = full.choices[0].text
    stop = text[8:12]
    cut = client(s).completions.create(model="tiny", prompt="Once upon a time", max_tokens=24, temperature=0,
                                       stop=[stop])
    assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in client(s).completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=24, temperature=0, stop=[stop], stream=True))
    assert streamed == cut.choices[0].text


def test_shutdown_drains_requests_in_flight(serve):
    s = serve(model="tiny", parallel=1)
    got = {}

    def request():
        got["r"] = httpx.post(s.url + "/v1/completions", json={"prompt": "Once", "max_tokens": 200, "temperature": 0},
                              timeout=60)
    t = threading.Thread(target=request)
    t.start()
    while not metric(s, "llamacpp:requests_processing"):
        threading.Event().wait(0.02)
    s.server.should_exit = True  # what SIGTERM / Ctrl-C does
    t.join(60)
    assert got["r"].status_code == 200 and got["r"].json()["usage"]["completion_tokens"] == 200


def test_moe_with_offloaded_experts_serves_the_all_resident_tokens(serve):
    """`serve` takes the MoE deployment options; offloading alone keeps the tokens exact."""
    import pocketlm
    model, tok = pocketlm.load("moe")
    expected = [Generator(model, tok).generate(p, 12) for p in PROMPTS[:2]]
    s = serve(model="moe", parallel=2, repair=False, moe={"resident": 0.25})
    rt = s.engine.moe
    assert rt is not None and rt.cache.budget < 0.3 * rt.cache.total_bytes
    c = client(s)
    with cf.ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda p: c.completions.create(model="moe", prompt=p, max_tokens=12, temperature=0),
                            PROMPTS[:2]))
    assert [g.choices[0].text for g in got] == expected
    assert rt.cache.stats.misses > 0  # experts really loaded from the store


def test_shadow_compares_the_candidate_without_changing_answers(serve, tiny, tmp_path):
    log = tmp_path / "shadow.jsonl"
    s = serve(model="tiny", candidate="tiny", shadow=True, shadow_log=str(log), repair=False)
    deadline = time.time() + 60
    while s.app.state.candidate.state != "ready":
        assert time.time() < deadline
        time.sleep(0.05)
    c = client(s)
    expected = Generator(*tiny).generate(PROMPTS[0], 8)
    whole = c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt=PROMPTS[1], max_tokens=8, temperature=0, stream=True) if ch.choices)
    assert whole.choices[0].text == expected and "served_by" not in whole.pocketlm
    while len(log.read_text().splitlines() if log.exists() else []) < 2:
        assert time.time() < deadline, "the shadow answers were not logged"
        time.sleep(0.05)
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert {r["incumbent"] for r in rows} == {expected, streamed}
    assert all(r["agreement"] == "match" and r["candidate"] == r["incumbent"] for r in rows)  # the same model
    assert metric(s, 'pocketlm:candidate_requests_total{agreement="match",role="shadow"}') == 2


def test_canary_share_routes_requests_to_the_candidate(serve):
    s = serve(model="tiny", candidate="tiny", canary_share=1.0, repair=False)
    deadline = time.time() + 60
    while s.app.state.candidate.state != "ready":
        assert time.time() < deadline
        time.sleep(0.05)
    r = client(s).completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert r.pocketlm["served_by"] == "candidate" and r.usage.completion_tokens == 4
    assert metric(s, 'pocketlm:candidate_requests_total{agreement="-",role="canary"}') == 1
