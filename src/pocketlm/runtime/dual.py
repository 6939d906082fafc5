"""Dual-system runtime (Pangu Embedded): one chat model answers directly (fast) or thinks first (slow).

The mode comes from the request, else a soft switch at the end of the user turn (`/think`,
`/no_think`, `/auto_think`), else the runtime's default. Fast mode renders the chat template with
`enable_thinking=False` (an empty think block: thinking is skipped, not hidden); slow mode lets the model
think. `auto` asks a Router (see router.py): a probe on the prompt's hidden state, escalation when the
fast answer's confidence is low, or both. A model RL-trained to choose (`pocketlm rl`, choice.py)
decides by itself in auto mode; a router given with it escalates the answers it chose to give fast
whose confidence is low. A thinking budget closes the think block after N thinking
tokens, as Qwen3 and vLLM do, and the model then answers.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Sequence

from ..errors import ConfigError, UnsupportedModelError
from ..eval.quality import stop_token_ids
from .choice import model_choice
from .generate import GenerationResponse, Generator, _TextStream
from .repair import RepairConfig
from .rows import Row, decode_rows

MODES = ("fast", "slow", "auto")
SWITCHES = {"/think": "slow", "/no_think": "fast", "/auto_think": "auto"}
# Qwen3's advice for a cut-off think block: a short closing phrase, then the closing tag.
BUDGET_CLOSE = "\n\nConsidering the limited time, I have to give the answer now.\n</think>\n\n"


@dataclasses.dataclass
class Reply:
    """One answered request."""

    question: str
    mode: str                  # the mode that produced the answer: 'fast' or 'slow'
    reason: str                # why that mode: 'requested', 'soft switch', or the router's evidence
    answer: str                # the text after the think block
    thinking: str              # the thinking text ('' in fast mode: thinking was skipped, not hidden)
    tokens: int                # tokens decoded for this request: a rejected fast attempt, the stop token and
                               # a cut think block's forced closing tokens included
    thinking_tokens: int
    budget_hit: bool           # the thinking budget closed the think block
    confidence: float | None   # min token probability of the fast answer (stop token included)
    p_fast: float | None       # the probe's probability that the fast answer is right
    repairs: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_thinking_template(tok) -> None:
    """Refuse a tokenizer whose chat template cannot render, or renders the same with thinking on and off."""
    msgs = [{"role": "user", "content": "1+1?"}]
    try:
        on = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=True)
        off = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    except Exception as e:  # no template at all, or one that fails to render
        raise UnsupportedModelError(f"the model has no usable chat template ({type(e).__name__})",
                                    "use a chat model whose template supports enable_thinking") from None
    if on == off:
        raise UnsupportedModelError("the chat template ignores enable_thinking, so fast and slow modes are "
                                    "the same", "use a chat model whose template switches thinking on and off")


def split_switch(message: str) -> tuple[str, str | None]:
    """('message without a trailing soft switch', mode the switch asks for or None)."""
    text = message.rstrip()
    for switch, mode in SWITCHES.items():
        if text.endswith(switch) and (len(text) == len(switch) or text[-len(switch) - 1].isspace()):
            return text[: -len(switch)].rstrip(), mode
    return message, None


class DualSystem:
    """Fast / slow / auto answering on top of a Generator.

    mode: default when neither the request nor a soft switch says (auto). router: needed for auto
    (see router.py); policy: which of its rules auto uses, 'probe', 'confidence' or 'both'.
    think_budget: most thinking tokens (None = unlimited; 0 = fast mode, thinking skipped);
    budget_close: text that closes a cut think block; budget_fallback: what follows the cut, 'answer'
    (the model answers after its partial thinking, as Qwen3 and vLLM do) or 'fast' (decoding stops at
    the budget, the partial thinking is dropped and the question answered in fast mode; both attempts'
    tokens are counted). fast_tokens / slow_tokens: most new tokens per mode (32 / 384). soft_switch:
    end the user turn with ' /think' or ' /no_think' for the chosen mode, as Qwen3-style models are
    trained (True).
    repair: repetition self-repair while decoding (None = off). batch_size: rows decoded at once (64).
    """

    def __init__(self, generator: Generator, *, mode: str = "auto", router=None, policy: str = "both",
                 think_budget: int | None = None, budget_close: str = BUDGET_CLOSE,
                 budget_fallback: str = "answer", fast_tokens: int = 32,
                 slow_tokens: int = 384, soft_switch: bool = True, repair: RepairConfig | None = None,
                 batch_size: int = 64):
        _check_mode(mode)
        if policy not in ("probe", "confidence", "both"):
            raise ConfigError(f"unknown router policy '{policy}'", "use probe, confidence or both")
        if budget_fallback not in ("answer", "fast"):
            raise ConfigError(f"unknown budget fallback '{budget_fallback}'", "use answer or fast")
        if think_budget is not None and think_budget < 0:
            raise ConfigError(f"thinking budget {think_budget} is negative", "use 0 or more tokens, or none")
        if min(fast_tokens, slow_tokens, batch_size) < 1:
            raise ConfigError("fast_tokens, slow_tokens and batch_size must be at least 1", "use 1 or more")
        self.gen, self.tok = generator, generator.tokenizer
        self.mode, self.router, self.policy = mode, router, policy
        self.budget_fallback = budget_fallback
        self.think_budget, self.fast_tokens, self.slow_tokens = think_budget, fast_tokens, slow_tokens
        self.soft_switch, self.repair, self.batch_size = soft_switch, repair, batch_size
        check_thinking_template(self.tok)
        vocab = self.tok.get_vocab()
        self.open_id, self.close_id = vocab.get("<think>"), vocab.get("</think>")
        if self.open_id is None or self.close_id is None:
            raise UnsupportedModelError("the tokenizer has no <think> and </think> tokens",
                                        "use a chat model trained with think blocks (Qwen3 style)")
        self.stops = set(stop_token_ids(self.tok)) | generator.stop_tokens  # end of turn, too
        self.close_ids = self.tok(budget_close, add_special_tokens=False)["input_ids"]
        if self.close_id not in self.close_ids:
            raise ConfigError("the budget's closing text has no </think>", "end it with '</think>' and a newline")
        self._close_lead = self.close_ids.index(self.close_id)  # forced tokens before </think>: not thinking
        if router is not None:
            router.check_model(generator.model)
        self.choice = model_choice(generator.model, self.tok)

    # ---- prompts -----------------------------------------------------------------------------
    def prompt(self, question: str, mode: str, history: Sequence[tuple[str, str]] = ()) -> list[int]:
        """Token ids of the chat prompt for `question` (no trailing switch) in 'fast' or 'slow' mode, after
        earlier (user, answer) turns of `history` (their thinking is not kept, as in Qwen3's template)."""
        switch = (" /think" if mode == "slow" else " /no_think") if self.soft_switch else ""
        messages = [m for user, answer in history
                    for m in ({"role": "user", "content": user}, {"role": "assistant", "content": answer})]
        messages.append({"role": "user", "content": question + switch})
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                            enable_thinking=mode == "slow")
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def requested(self, message: str, mode: str | None = None) -> tuple[str, str, str]:
        """(question, mode, reason): an explicit `mode` wins, then a soft switch, then the default."""
        question, switched = split_switch(message)
        if mode is not None:
            _check_mode(mode)
            asked = (question, mode, "requested")
        else:
            asked = (question, switched, "soft switch") if switched else (question, self.mode, "default")
        if self.think_budget == 0 and asked[1] != "fast":  # no room to think: skip it (Qwen3: budget 0)
            return question, "fast", "thinking budget 0"
        return asked

    # ---- batched answering -------------------------------------------------------------------
    def answer(self, messages: Sequence[str], mode: str | None = None,
               history: Sequence[tuple[str, str]] = ()) -> list[Reply]:
        """Answer each message (batched); `mode` overrides switches and the default for all of them;
        `history`: earlier (user, answer) turns, the same for every message."""
        asked = [self.requested(m, mode) for m in messages]
        replies: list[Reply | None] = [None] * len(asked)
        own = [i for i, (_, m, _) in enumerate(asked) if m == "auto" and self.choice is not None]
        fast = [i for i, (_, m, _) in enumerate(asked) if m == "fast" or (m == "auto" and self.choice is None)]
        if any(asked[i][1] == "auto" for i in fast) and self.router is None:
            raise ConfigError("auto mode needs a router", "fit one with `pocketlm router fit MODEL --tasks DEV "
                              "-o ROUTER` and pass it, or choose --mode fast|slow")
        slow = [i for i, (_, m, _) in enumerate(asked) if m == "slow"]  # replies[i] holds a rejected fast try
        slow += self._answer_own(own, asked, replies, history)
        for chunk in _chunks(fast, self.batch_size):
            auto = [asked[i][1] == "auto" for i in chunk]
            probe = self.router is not None and self.policy in ("probe", "both") and any(auto)
            p_fast = [None] * len(chunk)
            capture: list | None = [] if probe else None

            def route(rows: list[Row]) -> None:  # runs right after the prefill, before any token
                if capture is None:
                    return
                scores = self.router.p_fast(capture).tolist()
                for j, row in enumerate(rows):
                    if auto[j]:
                        p_fast[j] = scores[j]
                        if scores[j] < self.router.probe_threshold(self.policy):
                            row.finish = "skipped"
            t_conf = self.router.confidence_threshold(self.policy) if self.router is not None else None

            def unsure(j: int, row: Row) -> bool:  # stop a fast answer at its first unsure token
                return auto[j] and t_conf is not None and math.exp(row.logprobs[-1]) < t_conf
            rows = self.decode([self.prompt(asked[i][0], "fast", history) for i in chunk], "fast", capture, route,
                                abort=unsure)
            for j, (i, row) in enumerate(zip(chunk, rows)):
                question, _, reason = asked[i]
                if row.finish == "skipped":
                    slow.append(i)
                    t_probe = self.router.probe_threshold(self.policy)
                    replies[i] = Reply(question, "slow", f"probe p_fast={p_fast[j]:.2f} below {t_probe:.2f}",
                                       answer="", thinking="", tokens=0, thinking_tokens=0, budget_hit=False,
                                       confidence=None, p_fast=p_fast[j])
                    continue
                reply = self._reply(question, "fast", reason, row)
                reply.p_fast = p_fast[j]
                if auto[j] and t_conf is not None and reply.confidence < t_conf:
                    reply.reason = f"fast answer confidence {reply.confidence:.2f} below {t_conf:.2f}"
                    slow.append(i)
                elif auto[j]:
                    reply.reason = "router: fast" + (f" (p_fast={p_fast[j]:.2f})" if p_fast[j] is not None else "")
                replies[i] = reply
        for chunk in _chunks(slow, self.batch_size):
            rows = self.decode([self.prompt(asked[i][0], "slow", history) for i in chunk], "slow")
            for i, row in zip(chunk, rows):
                question, _, reason = asked[i]
                prior = replies[i]  # escalated or routed by the router: keep its evidence and costs
                replies[i] = _after(prior, self._reply(question, "slow", prior.reason if prior else reason, row))
        if self.budget_fallback == "fast":
            self._answer_cut_fast(replies, history)
        return replies  # type: ignore[return-value]

    def _answer_own(self, own: list[int], asked: list, replies: list, history: Sequence[tuple[str, str]]
                    ) -> list[int]:
        """Auto mode on a model that chooses: decode its own choice; returns the items to answer again in
        slow mode (a router's confidence rule escalating a fast choice)."""
        if not own:
            return []
        t_conf = self.router.confidence_threshold(self.policy) if self.router is not None else None
        lead = self.choice.prefix
        escalate = []
        for chunk in _chunks(own, self.batch_size):
            rows = self.decode([self.choice.prompt(asked[i][0], history) for i in chunk], "own")
            for i, row in zip(chunk, rows):
                mode = "slow" if self.choice.thought(row.tokens) else "fast"
                reply = self._reply(asked[i][0], mode, "model's own choice", row, lead)
                if mode == "fast" and t_conf is not None and reply.confidence < t_conf:
                    reply.reason = f"own fast answer's confidence {reply.confidence:.2f} below {t_conf:.2f}"
                    escalate.append(i)
                replies[i] = reply
        return escalate

    def _answer_cut_fast(self, replies: list[Reply], history: Sequence[tuple[str, str]]) -> None:
        """Replace the answers whose thinking the budget cut by fast-mode answers (costs add up)."""
        cut = [i for i, r in enumerate(replies) if r.budget_hit]
        for chunk in _chunks(cut, self.batch_size):
            rows = self.decode([self.prompt(replies[i].question, "fast", history) for i in chunk], "fast")
            for i, row in zip(chunk, rows):
                before = replies[i]
                reply = _after(before, self._reply(before.question, "fast",
                                                   before.reason + "; thinking budget hit: answered fast", row))
                reply.thinking, reply.thinking_tokens, reply.budget_hit = before.thinking, before.thinking_tokens, True
                replies[i] = reply

    def decode(self, prompts: list[list[int]], mode: str, capture=None, on_start=None, abort=None) -> list[Row]:
        """Decode prompt ids in `mode` with this runtime's limits, stops, repair and budget; the final rows."""
        rows = None
        for rows in self._rows(prompts, mode, capture, on_start, abort):
            pass
        return rows

    def _rows(self, prompts: list[list[int]], mode: str, capture=None, on_start=None, abort=None
              ) -> Iterator[list[Row]]:
        """decode_rows with this runtime's limits, stop tokens, repair and (slow mode) thinking budget."""
        limit = self.fast_tokens if mode == "fast" else self.slow_tokens
        force = None
        if mode == "own":  # the prompt ends inside the think block's opening: budget counts from there
            lead = list(self.choice.prefix)
            over = lambda i, row: self._thought_over(lead + row.tokens)  # noqa: E731
            if self.think_budget is not None and self.budget_fallback == "fast":
                abort = over
            elif self.think_budget is not None:
                force = lambda i, row: list(self.close_ids) if over(i, row) else None  # noqa: E731
        elif mode == "slow" and self.think_budget is not None:
            if self.budget_fallback == "fast":  # the cut thinking is dropped: stop right there
                abort = self._over_budget
            else:
                force = self._budget
        return decode_rows(self.gen, prompts, limit, repair=self.repair, force=force, capture=capture,
                           on_start=on_start, stops=self.stops, abort=abort)

    def _thought_over(self, toks: list[int]) -> bool:
        """The tokens have thought `think_budget` tokens without closing their think block."""
        if self.open_id not in toks or self.close_id in toks:
            return False
        return len(toks) - toks.index(self.open_id) - 1 >= self.think_budget

    def _budget(self, _: int, row: Row) -> list[int] | None:
        """The closing tokens once the row has thought `think_budget` tokens without closing its block."""
        return list(self.close_ids) if self._thought_over(row.tokens) else None

    def _over_budget(self, i: int, row: Row) -> bool:
        return self._thought_over(row.tokens)

    def _reply(self, question: str, mode: str, reason: str, row: Row, lead: Sequence[int] = ()) -> Reply:
        """The reply of a decoded row; `lead`: prompt tokens that opened its think block (own choice)."""
        toks = list(lead) + row.tokens
        thinking, answer_ids, think_n = "", toks, 0
        if self.close_id in toks:
            cut = toks.index(self.close_id)
            start = toks.index(self.open_id) + 1 if self.open_id in toks[:cut] else 0
            think_n = cut - start - (self._close_lead if row.forced else 0)
            thinking = self.tok.decode(toks[start:cut], skip_special_tokens=True).strip()
            think_n = think_n if thinking else 0  # an empty block (fast mode chosen by the model)
            answer_ids = toks[cut + 1:]
        elif self.open_id in toks:  # never closed: all thinking, no answer
            think_n = len(toks) - toks.index(self.open_id) - 1
            thinking, answer_ids = self.tok.decode(toks, skip_special_tokens=True).strip(), []
        conf = None
        if mode == "fast":
            lps = row.logprobs + ([row.stop_logprob] if row.stop_logprob is not None else [])
            conf = math.exp(min(lps)) if lps else 0.0
        cut_short = row.forced > 0 or (mode == "slow" and row.finish == "aborted")  # by the thinking budget
        return Reply(question, mode, reason, self.tok.decode(answer_ids, skip_special_tokens=True).strip(),
                     thinking, row.generated, think_n, cut_short, conf, None, row.repairs)

    # ---- streaming (chat) --------------------------------------------------------------------
    def stream(self, message: str, mode: str | None = None, history: Sequence[tuple[str, str]] = ()
               ) -> Iterator[tuple[str, GenerationResponse | Reply]]:
        """Chat one message: yields ('think' | 'answer', GenerationResponse) per token of the final
        generation, ('repair', None) when a loop was rolled back (text already yielded since the loop
        began is withdrawn), then ('done', Reply). In auto mode the fast attempt runs first, unshown,
        and is shown only if the router keeps it."""
        question, chosen, reason = self.requested(message, mode)
        prior = None
        if chosen == "auto":
            prior = self.answer([question], "auto", history)[0]
            if prior.mode == "fast" or self.choice is not None:  # own choice: answered whole, not re-decoded
                yield "answer", _whole(prior)
                yield "done", prior
                return
            chosen = "slow"
        ids = self.prompt(question, chosen, history)
        text, phase, rows, shown = _TextStream(self.tok, ()), "answer" if chosen == "fast" else "think", None, 0
        for rows in self._rows([ids], chosen):
            row = rows[0]
            if len(row.tokens) < shown:  # rolled back: go on from the kept tokens
                text, shown = _TextStream(self.tok, ()), len(row.tokens)
                for t in row.tokens:
                    text.add(t)
                yield "repair", None
            while shown < len(row.tokens):
                token = row.tokens[shown]
                shown += 1
                piece = text.add(token)
                if token == self.close_id:
                    phase = "answer"
                yield phase, GenerationResponse(piece, token, row.logprobs[shown - 1], len(ids), 0.0, shown, 0.0,
                                                None, chosen)
        reply = _after(prior, self._reply(question, chosen, reason if prior is None else prior.reason, rows[0]))
        if reply.budget_hit and self.budget_fallback == "fast":
            replies = [reply]
            self._answer_cut_fast(replies, history)
            reply = replies[0]
            yield "answer", _whole(reply)
        yield "done", reply


def _after(prior: Reply | None, reply: Reply) -> Reply:
    """`reply` after an earlier attempt at the same question: its tokens are added, the router's evidence
    it carried (confidence, p_fast) is kept where the new reply has none."""
    if prior is not None:
        reply.tokens += prior.tokens
        reply.confidence = reply.confidence if reply.confidence is not None else prior.confidence
        reply.p_fast = reply.p_fast if reply.p_fast is not None else prior.p_fast
    return reply


def _whole(reply: Reply) -> GenerationResponse:
    """A reply's whole answer as one streamed response."""
    return GenerationResponse(reply.answer, -1, 0.0, 0, 0.0, reply.tokens, 0.0, "stop", reply.mode)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"unknown mode '{mode}'", "use fast, slow or auto")


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
