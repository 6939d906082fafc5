"""The generation engine: `generate_step` (token ids) → `stream_generate` (GenerationResponse) → `generate` (text).

Prefill runs once over the (left-padded) prompts; each decode step is one call of `decode_one_token`,
eager or compiled with torch.compile (CPU: inductor's C++ kernels and wrapper; CUDA: CUDA graphs).
The compiled step sees static shapes: the cache length is rounded up to CACHE_STEP slots, so a
handful of compiled variants serve all request sizes, and inductor's on-disk cache keeps them across runs.
"""
from __future__ import annotations

import dataclasses
import os
import time
import types
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from ..errors import ConfigError, DataError
from . import cpu_linear
from .cache import StaticCache
from .model import FastDecoder
from .native import NativeStep
from .sampling import SamplingConfig, sample

CACHE_STEP = 256


@dataclasses.dataclass
class GenerationResponse:
    """One generated token of one request, with the text it completes and the running timings."""

    text: str                 # new text since the previous response (may be '' while a character is incomplete)
    token: int
    logprob: float            # log-probability of `token` under the model (before sampling filters)
    prompt_tokens: int
    prompt_tps: float         # prefill tokens/s
    generation_tokens: int
    generation_tps: float     # decode tokens/s so far (first token excluded: it comes with the prefill)
    finish_reason: str | None = None  # 'stop' (stop token or string), 'length', or None while running
    mode: str | None = None   # which runtime mode produced it (set by the dual-system runtime)


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


class Generator:
    """Runs a loaded HF causal LM with a static KV cache.

    compile: False runs eagerly; True compiles the decode step (compile time is reported apart, in
    `compile_s`). native: one C++ call per decode step (runtime/native.py; CPU, fp32 models with fp32/
    int8/int4 linears; prefill stays eager); native_activations "int8": its int8/int4 linears take
    8-bit activations (faster, not logits-equal). max_context defaults to the model's `max_position_embeddings`. Building a Generator
    packs the model's plain q/k/v and gate/up weights in place (same values, same memory). One
    request runs at a time: compiled steps reuse their cache.
    """

    def __init__(self, model, tokenizer, *, compile: bool = False, native: bool = False,
                 native_activations: str = "fp32", max_context: int | None = None):
        cfg = model.config
        self.max_context = int(max_context or getattr(cfg, "max_position_embeddings", 2048))
        self.model, self.tokenizer = model.eval(), tokenizer
        self.decoder = FastDecoder(model, self.max_context)
        if compile and native:
            raise ConfigError("the compiled and the native decode steps are two different paths", "choose one")
        self.compiled = compile
        self.native = NativeStep(self.decoder, native_activations) if native else None
        if compile:  # compiled kernels persist across runs here (inductor's default is /tmp)
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "pocketlm" / "inductor"))
        self.compile_s: float = 0.0  # seconds spent compiling, apart from generation time
        self._steps: dict[tuple[int, int, bool], Callable] = {}  # (batch, cache length, greedy) → compiled step
        self._caches: dict[tuple[int, int], StaticCache] = {}
        window = [layer.window for layer in self.decoder.layers if layer.window]
        self.window = min(window) if window else None
        self.stop_tokens = _stop_tokens(model, tokenizer)

    @property
    def path(self) -> str:
        """Which decode step runs: "native", "compiled" or "eager"."""
        if self.native is not None:
            if self.native.activations == "fp32":
                return "native"
            return f"native, int8 activations ({cpu_linear.act8_kernel()})"
        return "compiled" if self.compiled else "eager"

    # ---- token level -------------------------------------------------------------------------
    def start(self, prompts: Sequence[Sequence[int]], steps: int, sampling: SamplingConfig = SamplingConfig(),
              *, logits: bool = False, capture: list | None = None) -> "Decoding":
        """Prefill `prompts` (a left-padded batch) and return the Decoding that advances them token by token.

        steps: cache room for this many fed tokens (rollbacks included). logits: the caller edits the
        logits before choosing, so the compiled step must return them (no in-graph argmax).
        capture: receives each layer's hidden state at the end of each prompt (see FastDecoder)."""
        return Decoding(self, prompts, steps, sampling, logits=logits, capture=capture)

    @torch.inference_mode()
    def generate_step(self, prompts: Sequence[Sequence[int]], max_tokens: int,
                      sampling: SamplingConfig = SamplingConfig(), stop_tokens: set[int] | None = None
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (tokens (B,), logprobs (B,)) for each new position of every prompt (left-padded batch).

        Stops after `max_tokens` steps or when every row has produced a stop token (rows that are done
        keep decoding until then; callers ignore what follows their stop)."""
        run = self.start(prompts, max_tokens, sampling)
        stop = self.stop_tokens if stop_tokens is None else stop_tokens
        stop_ids = torch.tensor(sorted(stop), device=run.device, dtype=torch.long) if stop else None
        done = torch.zeros(run.batch, dtype=torch.bool, device=run.device)
        for step in range(max_tokens):
            tokens, logprobs = run.choose()
            yield tokens, logprobs
            if stop_ids is not None:
                done |= torch.isin(tokens, stop_ids)
                if bool(done.all()):
                    return
            if step < max_tokens - 1:
                run.advance(tokens)

    def _cache(self, batch: int, length: int) -> StaticCache:
        """The compiled steps keep their cache (one per shape, reused); eager runs get a fresh one."""
        if not self.compiled:
            return self.decoder.new_cache(batch, length)
        cache = self._caches.get((batch, length))
        if cache is None:
            cache = self._caches[(batch, length)] = self.decoder.new_cache(batch, length)
        cache.valid.zero_()
        return cache

    def _decode(self, tokens, pos, slot: int, cache, padded: bool, greedy: bool = False):
        """Logits (B, vocab) of the next position; with `greedy` (compiled only) the (tokens, logprobs)."""
        if self.native is not None:
            return self.native(tokens, pos, torch.full_like(pos, slot), cache, cache.valid)
        slots = torch.tensor([slot], device=tokens.device)
        if not self.compiled:
            kv = slot + 1
            mask = cache.valid[:, None, None, :kv] if padded else None
            return self.decoder(tokens, pos, slots, cache, mask, kv)
        key = (cache.batch, cache.max_len, greedy)
        step = self._steps.get(key)
        if step is None:  # the first call of a shape compiles it
            t0 = time.perf_counter()
            step = self._compile(cache, greedy)
            try:
                out = step(tokens, pos, slots)
            except Exception as e:  # no C++ compiler, unsupported op, ...: say so, never fall back silently
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                raise ConfigError(f"compiling the decode step failed ({first})",
                                  "install a C++ compiler (g++) or run eagerly (--eager, compile=False)") from e
            self._steps[key] = step
            self.compile_s += time.perf_counter() - t0
            return out
        return step(tokens, pos, slots)

    def _compile(self, cache: StaticCache, greedy: bool) -> Callable:
        """decode_one_token for one cache, compiled with static shapes: it attends over every slot, the
        cache's `valid` mask hides empty and padded ones. The step owns its cache and nothing it reads
        changes shape, so dynamo's per-call guard checks (slower than the step's arithmetic on small
        models) are dropped."""
        mask = cache.valid[:, None, None, :]
        if self.decoder.cpu_kernels:
            cpu_linear.build_kernel()

        def decode_one_token(tokens, pos, slots):
            logits = self.decoder(tokens, pos, slots, cache, mask, cache.max_len)
            if not greedy:
                return logits
            best = logits.argmax(-1)
            return best, logits.log_softmax(-1).gather(1, best[:, None])[:, 0]
        # fullgraph: a graph break would leave resumed frames running without guards, so refuse it
        return torch.compile(_own_code(decode_one_token), dynamic=False, fullgraph=True, options={
            "guard_filter_fn": torch.compiler.skip_all_guards_unsafe, **_compile_options(self.decoder.device)})

    def _check(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> tuple[int, int]:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise DataError("a prompt has no tokens", "give a non-empty prompt")
        if max_tokens < 1:
            raise ConfigError(f"max_tokens {max_tokens} is below 1", "ask for at least one new token")
        P = max(len(p) for p in prompts)
        if P + max_tokens > self.max_context:
            raise ConfigError(f"{P} prompt tokens + {max_tokens} new tokens exceed the context of "
                              f"{self.max_context}", "shorten the prompt or lower max_tokens")
        if self.window is not None and P + max_tokens > self.window:
            raise ConfigError(f"{P + max_tokens} tokens exceed the sliding window of {self.window}, which the "
                              "fast runtime does not apply", f"keep prompt + new tokens ≤ {self.window}")
        return len(prompts), P

    # ---- text level --------------------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    def stream_generate(self, prompt: str | Sequence[int], max_tokens: int = 256,
                        sampling: SamplingConfig = SamplingConfig(),
                        stop_strings: Sequence[str] = ()) -> Iterator[GenerationResponse]:
        """Yield a GenerationResponse per generated token of one prompt; the last has a finish_reason."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        text = _TextStream(self.tokenizer, stop_strings)
        t0, compiled_before = time.perf_counter(), self.compile_s
        prompt_tps, t_first = 0.0, t0
        for n, (tok, lp) in enumerate(self.generate_step([ids], max_tokens, sampling), start=1):
            now = time.perf_counter() - (self.compile_s - compiled_before)  # compiling is not generating
            if n == 1:
                t_first, prompt_tps = now, len(ids) / max(now - t0, 1e-9)
            token = int(tok[0])
            finish = "stop" if token in self.stop_tokens else None
            segment = text.add(token if finish is None else None)
            if text.stopped:
                finish = "stop"
            elif finish is None and n == max_tokens:
                finish = "length"
            if finish is not None:
                segment += text.flush()
            gen_tps = (n - 1) / (now - t_first) if n > 1 else 0.0
            yield GenerationResponse(segment, token, float(lp[0]), len(ids), prompt_tps, n, gen_tps, finish)
            if finish is not None:
                return

    def generate(self, prompts: str | Sequence[str], max_tokens: int = 256,
                 sampling: SamplingConfig = SamplingConfig(), stop_strings: Sequence[str] = ()) -> str | list[str]:
        """The completion of one prompt (str), or of each prompt of a list (decoded as one left-padded batch)."""
        if isinstance(prompts, str):
            return "".join(r.text for r in self.stream_generate(prompts, max_tokens, sampling, stop_strings))
        encoded = [self.encode(p) for p in prompts]
        rows: list[list[int]] = [[] for _ in encoded]
        finished = [False] * len(encoded)
        for tokens, _ in self.generate_step(encoded, max_tokens, sampling):
            for r, t in enumerate(tokens.tolist()):
                if not finished[r]:
                    finished[r] = t in self.stop_tokens
                    if not finished[r]:
                        rows[r].append(t)
        texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in rows]
        return [_cut_at_stop(t, stop_strings) for t in texts]


class Decoding:
    """A left-padded batch in a static KV cache, advanced one token per step (made by `Generator.start`).

    `choose()` picks every row's next token from the current logits; `advance(tokens)` feeds them and
    computes the next logits. `forget(row, n)` drops a row's last n fed tokens: their slots stop being
    attended and the row's rope positions continue from there, which equals rewinding that row alone
    (the self-repair and the thinking budget of the dual-system runtime build on this).
    """

    def __init__(self, gen: Generator, prompts: Sequence[Sequence[int]], steps: int, sampling: SamplingConfig,
                 *, logits: bool = False, capture: list | None = None):
        B, P = gen._check(prompts, steps)
        self.gen, self.sampling, self.batch, self.prompt_len = gen, sampling, B, P
        dev = self.device = gen.decoder.device
        pads = torch.tensor([P - len(p) for p in prompts], device=dev)
        ids = torch.tensor([[0] * (P - len(p)) + list(p) for p in prompts], device=dev)  # (B, P)
        cache_len = _round_up(P + steps, CACHE_STEP) if gen.compiled else P + steps
        self.cache = cache = gen._cache(B, min(cache_len, gen.max_context))
        slots = torch.arange(P, device=dev)
        cache.valid[:, :P] = slots[None] >= pads[:, None]
        positions = (slots[None] - pads[:, None]).clamp(min=0)  # (B, P) rope positions
        self.masked = bool(pads.any())  # some slot before the newest is not attended by some row
        mask = _prefill_mask(cache.valid[:, :P]) if self.masked else None
        with torch.inference_mode():
            self.out = gen.decoder(ids, positions, slots, cache, mask, P, capture)
        cache.length = P
        self.pos = P - pads  # (B,) rope position of each row's next token
        self.rng = torch.Generator(device=dev).manual_seed(sampling.seed) if sampling.seed is not None else None
        self.history = ids if sampling.repetition_penalty != 1.0 else None
        # Greedy choice inside the compiled step: one call per token instead of four more ops.
        self.in_graph = (gen.compiled and not logits and sampling.temperature == 0
                         and sampling.repetition_penalty == 1.0)

    @property
    def room(self) -> int:
        """Tokens that can still be fed."""
        return self.cache.max_len - self.cache.length

    def logits(self) -> torch.Tensor:
        """(B, vocab) float logits of every row's next token (not available with the in-graph argmax)."""
        if isinstance(self.out, tuple):
            raise RuntimeError("this Decoding chooses tokens inside the compiled step; start it with logits=True")
        return self.out

    def choose(self, logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (B,), log-probabilities (B,)) from the current logits, or from `logits` edited by the caller
        (the log-probabilities are then those of the edited logits)."""
        if logits is None and isinstance(self.out, tuple):
            return self.out
        return sample(self.out if logits is None else logits, self.sampling, self.history, self.rng)

    @torch.inference_mode()
    def advance(self, tokens: torch.Tensor) -> None:
        """Feed one token per row (B,) and compute the logits that follow."""
        if self.room < 1:
            raise ConfigError(f"the decoding has used all {self.cache.max_len} cache slots",
                              "start it with more steps")
        cache = self.cache
        if self.history is not None:
            self.history = torch.cat([self.history, tokens[:, None]], dim=1)
        slot = cache.length
        cache.valid[:, slot] = True
        self.out = self.gen._decode(tokens[:, None], self.pos[:, None], slot, cache, self.masked, self.in_graph)
        cache.length += 1
        self.pos = self.pos + 1

    @torch.inference_mode()
    def forget(self, row: int, n: int) -> None:
        """Drop the last `n` tokens fed to `row` (n ≤ tokens fed since the prefill). A repetition penalty's
        history keeps them: they still count as seen."""
        if n <= 0:
            return
        P, cache = self.prompt_len, self.cache
        fed = cache.valid[row, P:cache.length].nonzero()[:, 0] + P
        if n > len(fed):
            raise ConfigError(f"cannot forget {n} tokens of row {row}: only {len(fed)} were fed",
                              "roll back at most to the end of the prompt")
        cache.valid[row, fed[-n:]] = False
        self.pos[row] -= n
        self.masked = True


class _TextStream:
    """Incremental detokenization that holds back an incomplete character or a possible stop-string start.

    Only the tokens since the last newline are decoded again per token (a newline is a safe cut for
    byte-level and sentencepiece tokenizers alike), so a long output costs linear, not quadratic, time."""

    def __init__(self, tokenizer, stop_strings: Sequence[str]):
        self.tokenizer, self.stops = tokenizer, [s for s in stop_strings if s]
        self.ids: list[int] = []
        self.start, self.committed = 0, ""  # tokens before `start` are decoded into `committed`
        self.text, self.sent, self.stopped = "", 0, False
        self.hold = max((len(s) for s in self.stops), default=1) - 1

    def add(self, token: int | None) -> str:
        if token is None or self.stopped:
            return ""
        self.ids.append(token)
        tail = self.tokenizer.decode(self.ids[self.start:], skip_special_tokens=True)
        if tail.endswith("\ufffd"):
            return ""  # a multi-byte character is not complete yet
        text = self.committed + tail
        if tail.endswith("\n"):
            self.start, self.committed = len(self.ids), text
        cut = _cut_at_stop(text, self.stops)
        if len(cut) < len(text):
            self.stopped = True
        self.text = cut
        upto = len(cut) if self.stopped else max(self.sent, len(cut) - self.hold)
        segment, self.sent = cut[self.sent:upto], upto
        return segment

    def flush(self) -> str:
        segment, self.sent = self.text[self.sent:], len(self.text)
        return segment


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    hits = [text.find(s) for s in stops if s and s in text]
    return text[:min(hits)] if hits else text


def _prefill_mask(valid: torch.Tensor) -> torch.Tensor:
    """valid (B, P) → (B, 1, P, P) causal mask over real keys; a padded query sees itself (no empty rows)."""
    P = valid.shape[1]
    causal = torch.ones(P, P, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(P, dtype=torch.bool, device=valid.device)
    return (causal[None] & valid[:, None, :] | eye[None])[:, None]


def _stop_tokens(model, tokenizer) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = getattr(tokenizer, "eos_token_id", None)
    if ids is None:
        return set()
    return set(ids) if isinstance(ids, (list, tuple)) else {int(ids)}


def _own_code(fn: Callable) -> Callable:
    """`fn` with a code object of its own. Dynamo keeps compiled code per code object; with its guards
    dropped, steps of other shapes, caches or models must never find this one's."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _compile_options(device: torch.device) -> dict:
    # CUDA: replay the step as a CUDA graph; CPU: a C++ wrapper instead of Python around the kernels.
    return {"triton.cudagraphs": True} if device.type == "cuda" else {"cpp_wrapper": True}
