"""The model's own mode choice: a prompt with no forced mode, and which completions thought.

A Qwen3-style template writes an empty think block (`<think>\\n\\n</think>\\n\\n`) for fast mode and
nothing for slow mode, where the model opens the block itself. With no switch the model decides: the
prompt ends with the tokens both modes share (`<think>` and, for the reference tokenizer, a newline),
and the next token is the decision: the empty block's next token (fast) or anything else (think).
An RL-trained artifact (`pocketlm rl`) has learned this choice; `DualSystem` uses it in auto mode.
"""
from __future__ import annotations

from typing import Sequence

from ..errors import UnsupportedModelError

THINK_OPEN = "<think>\n"  # how a think block with content opens (Qwen3, DeepSeek-R1, the reference models)


class ModeChoice:
    """prefix: token ids both modes start with; decision: the token that means 'do not think';
    fast_rest: the empty block's tokens after the prefix (the decision first).

    switch: a soft switch that ends the user turn and asks the model to choose (openPangu's
    `/auto_think`); '' for none. Models trained with a switch on every turn may read the question at
    fixed token offsets from it, so an RL-trained artifact records the one it learned with."""

    def __init__(self, tok, switch: str = ""):
        self.tok, self.switch = tok, switch
        msgs = [{"role": "user", "content": "1+1?"}]
        plain = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        fast = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        if not fast.startswith(plain) or "</think>" not in fast[len(plain):]:
            raise UnsupportedModelError("the chat template's enable_thinking=False does not append an empty "
                                        "think block, so the model's own mode choice cannot be read",
                                        "use a chat model with a Qwen3-style thinking switch")
        self.fast_block = fast[len(plain):]
        ids = self._ids(self.fast_block)
        opened = self._ids(THINK_OPEN)
        n = 0
        while n < min(len(ids), len(opened)) and ids[n] == opened[n]:
            n += 1
        self.prefix, self.fast_rest = ids[:n], ids[n:]
        self.decision = self.fast_rest[0]

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def prompt(self, question: str, history: Sequence[tuple[str, str]] = ()) -> list[int]:
        """Chat prompt ids with no mode forced: the choosing switch (if any), no enable_thinking, then the
        shared prefix."""
        messages = [m for user, answer in history
                    for m in ({"role": "user", "content": user}, {"role": "assistant", "content": answer})]
        messages.append({"role": "user", "content": f"{question} {self.switch}" if self.switch else question})
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self._ids(text) + self.prefix

    def text(self, completion: Sequence[int]) -> str:
        """The completion as text with the shared prefix put back (special tokens kept)."""
        return self.tok.decode(list(self.prefix) + list(completion), skip_special_tokens=False)

    def thought(self, completion: Sequence[int]) -> bool:
        """Whether a completion of `prompt()` thinks: its think block is not empty (or never closed)."""
        text = self.text(completion)
        body = text.split("<think>", 1)[-1]
        return "</think>" not in body or body.split("</think>", 1)[0].strip() != ""


def chooses_mode(model) -> bool:
    """The artifact was RL-trained to choose its own mode (pocketlm.json's rl.mode_choice)."""
    return bool(_rl_record(model).get("mode_choice"))


def model_choice(model, tok) -> ModeChoice | None:
    """The ModeChoice an RL-trained artifact learned with (its switch), else None."""
    return ModeChoice(tok, _rl_record(model).get("switch", "")) if chooses_mode(model) else None


def _rl_record(model) -> dict:
    record = getattr(model, "pocketlm_record", None) or {}
    return record.get("rl") or {}
