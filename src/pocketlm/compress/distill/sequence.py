"""Sequence-level KD data: the teacher writes the targets for task prompts.

For each question the teacher answers greedily through the dual-system runtime, in slow mode (its
think-block trace, then the answer) and in fast mode (the answer alone), with the same chat prompts
the runtime uses at inference. An example is prompt ids + the teacher's tokens + the end-of-turn
token; by default only the teacher's correct answers are kept (the student should not learn its
mistakes). Examples are packed whole, first fit, into fixed-length rows with a mask over the
teacher-written tokens, for `distill(..., mask=...)`.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ...errors import DataError
from ...eval.quality import extract_answer
from ...progress import progress_bar

TURN_ENDS = ("<|im_end|>", "<|eot_id|>", "<|end|>")


def turn_end_id(tok) -> int:
    vocab = tok.get_vocab()
    return next((vocab[t] for t in TURN_ENDS if t in vocab), tok.eos_token_id)


def teacher_examples(dual, items: Sequence[dict], modes: Sequence[str] = ("slow", "fast"), *, keep_wrong: bool = False,
                     chunk: int = 256, show_progress: bool = True) -> list[dict]:
    """The teacher's answers to `items` (question/answer dicts) in each mode, as training examples:
    {"question", "mode", "prompt": ids, "target": ids, "correct"}; wrong ones dropped unless keep_wrong."""
    end = turn_end_id(dual.tok)
    examples = []
    for mode in modes:
        chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
        for part in progress_bar(chunks, f"teacher {mode} answers", show=show_progress):
            prompts = [dual.prompt(it["question"], mode) for it in part]
            for it, prompt, row in zip(part, prompts, dual.decode(prompts, mode)):
                text = dual.tok.decode(row.tokens, skip_special_tokens=False)
                correct = extract_answer(text, thinking=mode == "slow") == it["answer"]
                if row.finish != "stop" or not (correct or keep_wrong):
                    continue  # an unfinished answer (length limit) teaches the student not to stop
                examples.append({"question": it["question"], "mode": mode, "prompt": prompt,
                                 "target": [*row.tokens, end], "correct": correct})
    return examples


def pack_examples(examples: Sequence[dict], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (N, seq_len) token ids, mask (N, seq_len) True on target tokens): whole examples, first fit
    in order, padding after the last; an example longer than seq_len is dropped."""
    rows: list[list[int]] = []
    masks: list[list[bool]] = []
    for ex in examples:
        ids = [*ex["prompt"], *ex["target"]]
        if len(ids) > seq_len:
            continue
        flags = [False] * len(ex["prompt"]) + [True] * len(ex["target"])
        for r, m in zip(rows, masks):
            if len(r) + len(ids) <= seq_len:
                r.extend(ids)
                m.extend(flags)
                break
        else:
            rows.append(list(ids))
            masks.append(flags)
    if not rows:
        raise DataError(f"no teacher example fits in {seq_len} tokens", "raise the sequence length")
    ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), seq_len), dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, masks)):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(m)] = torch.tensor(m)
    return ids, mask


@torch.no_grad()
def example_losses(model, examples: Sequence[dict], batch_size: int = 64) -> list[float]:
    """Each example's mean NLL of its target tokens under `model` (how far it is from the teacher)."""
    model.eval()
    out = []
    for i in range(0, len(examples), batch_size):
        part = examples[i:i + batch_size]
        length = max(len(e["prompt"]) + len(e["target"]) for e in part)
        ids = torch.zeros((len(part), length), dtype=torch.long)  # right padding: causal, so harmless
        labels = torch.full((len(part), length), -100, dtype=torch.long)
        for j, e in enumerate(part):
            seq = torch.tensor([*e["prompt"], *e["target"]])
            ids[j, :len(seq)] = seq
            labels[j, len(e["prompt"]):len(seq)] = seq[len(e["prompt"]):]
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="none")
        count = (labels[:, 1:] != -100).sum(1).clamp(min=1)
        out.extend((nll.sum(1) / count).tolist())
    return out
