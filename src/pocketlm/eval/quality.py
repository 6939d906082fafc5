"""Quality: perplexity, KL(base‖model) and top-1 agreement, next-word cloze, task accuracy."""
from __future__ import annotations

import math
import re
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..progress import progress_bar
from ..runtime.generate import Generator
from ..runtime.rows import decode_rows

WORD_MARKERS = ("Ġ", "▁", " ")  # byte-level BPE, SentencePiece, plain


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def score_windows(model, windows: torch.Tensor, *, baseline=None, batch_size: int = 4,
                  cloze_table: tuple[torch.Tensor, torch.Tensor] | None = None,
                  cloze_min_context: int = 32, show_progress: bool = True) -> dict:
    """One pass over token windows; each window is scored from its own start.

    Args:
        model: causal LM; `baseline`: an optional second model sharing the tokenizer.
        windows: (n_windows, ctx) token ids. Position t predicts token t+1, so a window gives ctx-1 targets.
        batch_size: windows per forward pass.
        cloze_table: (starts_word, continues_word) bool tensors over the vocab, from `word_tables`.
        cloze_min_context: words that start before this position in a window are not counted.

    Returns:
        ppl, nll (mean nats/token), tokens_scored, windows; kl and top1 when a baseline is given;
        cloze accuracy and the number of words scored when a cloze table is given.
    """
    dev = _device(model)
    nll_sum, kl_sum, agree, count = 0.0, 0.0, 0, 0
    cloze_hits, cloze_words = 0, 0
    batches = windows.split(batch_size)
    for batch in progress_bar(batches, "quality", show=show_progress):
        inputs, targets = batch.to(dev), batch[:, 1:].to(dev)
        # fp32 logits whatever the model dtype: (B, ctx-1, vocab)
        logp = F.log_softmax(model(input_ids=inputs).logits[:, :-1].float(), dim=-1)
        nll_sum += -logp.gather(-1, targets.unsqueeze(-1)).sum().item()
        pred = logp.argmax(-1)
        count += targets.numel()
        if baseline is not None:
            base_logp = F.log_softmax(baseline(input_ids=batch.to(_device(baseline))).logits[:, :-1].float(), dim=-1).to(dev)
            kl_sum += (base_logp.exp() * (base_logp - logp)).sum().item()
            agree += (base_logp.argmax(-1) == pred).sum().item()
            del base_logp
        if cloze_table is not None:
            hits, words = _cloze_counts(batch, (pred == targets).cpu(), cloze_table, cloze_min_context)
            cloze_hits, cloze_words = cloze_hits + hits, cloze_words + words
        del logp
    nll = nll_sum / count
    out = {"ppl": math.exp(nll), "nll": nll, "tokens_scored": count, "windows": len(windows),
           "kl": None, "top1": None, "cloze": None, "cloze_words": None}
    if baseline is not None:
        out.update(kl=kl_sum / count, top1=agree / count)
    if cloze_table is not None:
        out.update(cloze=cloze_hits / cloze_words if cloze_words else None, cloze_words=cloze_words)
    return out


@lru_cache(maxsize=4)
def _word_tables_cached(vocab_items: tuple[tuple[str, int], ...], size: int):
    starts = torch.zeros(size, dtype=torch.bool)
    conts = torch.zeros(size, dtype=torch.bool)
    for piece, idx in vocab_items:
        if idx >= size:
            continue
        marked = piece.startswith(WORD_MARKERS)
        body = piece.lstrip("".join(WORD_MARKERS))
        if body.isalpha():
            starts[idx] = marked
            conts[idx] = not marked
    return starts, conts


def word_tables(tok, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts_word, continues_word) over token ids: a word is a marked alphabetic token followed by
    unmarked alphabetic tokens (Ġhell + o = " hello")."""
    return _word_tables_cached(tuple(sorted(tok.get_vocab().items())), vocab_size)


def _cloze_counts(windows: torch.Tensor, correct: torch.Tensor, table, min_context: int) -> tuple[int, int]:
    """Whole words reproduced by greedy decoding: every sub-token is the top-1 given the true prefix.

    `correct[b, t]` says whether token t+1 of window b was the argmax after position t.
    """
    starts, conts = table
    hits = words = 0
    for ids, ok in zip(windows.tolist(), correct.tolist()):
        t = max(min_context, 1)
        while t < len(ids):
            if not starts[ids[t]]:
                t += 1
                continue
            end = t + 1
            while end < len(ids) and conts[ids[end]]:
                end += 1
            if end < len(ids):  # the word is complete inside the window
                words += 1
                hits += all(ok[t - 1:end - 1])
            t = end
    return hits, words


# --- task accuracy ---------------------------------------------------------------------------------

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str, thinking: bool = False) -> str:
    """The last number after the thinking block, commas removed ('' if none, or if thinking never ended)."""
    if thinking and "</think>" not in text:
        return ""
    answer_part = text.rsplit("</think>", 1)[-1]
    found = NUMBER.findall(answer_part)
    return found[-1].replace(",", "") if found else ""


def stop_token_ids(tok) -> list[int]:
    """End-of-document and end-of-turn tokens that end a chat answer."""
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    vocab = tok.get_vocab()
    for special in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        if special in vocab:
            ids.add(vocab[special])
    return sorted(ids)


def task_accuracy(model, tok, items: list[dict], *, thinking: bool = False, soft_switch: bool = True,
                  max_new_tokens: int = 64, batch_size: int = 16, show_progress: bool = True) -> dict:
    """Greedy chat answers to question/answer items, decoded in batches by pocketlm's engine.

    The mode is set by the chat template's `enable_thinking` and, with `soft_switch`, by ending the
    user turn with " /think" or " /no_think" as Qwen3-style models are trained to read.
    Returns accuracy, items, mean generated tokens (stop token included) and per-item rows.
    """
    gen = Generator(model, tok)  # eager: one pass over the items does not repay a compile
    stops = set(stop_token_ids(tok))
    switch = (" /think" if thinking else " /no_think") if soft_switch else ""
    rows = []
    for start in progress_bar(range(0, len(items), batch_size), "tasks", show=show_progress):
        chunk = items[start:start + batch_size]
        prompts = [tok(tok.apply_chat_template([{"role": "user", "content": it["question"] + switch}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=thinking),
                       add_special_tokens=False)["input_ids"] for it in chunk]
        *_, done = decode_rows(gen, prompts, max_new_tokens, stops=stops)
        for it, row in zip(chunk, done):
            text = tok.decode(row.tokens, skip_special_tokens=False)
            got = extract_answer(text, thinking)
            rows.append({"question": it["question"], "answer": it["answer"], "output": text,
                         "predicted": got, "correct": got == it["answer"], "tokens": row.generated})
    return {"task_accuracy": sum(r["correct"] for r in rows) / len(rows), "task_items": len(rows),
            "task_mean_tokens": sum(r["tokens"] for r in rows) / len(rows), "rows": rows}
