"""Evaluation data: a text file as one token stream cut into windows; a JSONL task file."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import DataError
from ..io import ASSETS

DEFAULT_TEXT = ASSETS / "data" / "test.txt"
DEFAULT_TASKS = ASSETS / "data" / "arith_test.jsonl"


def pydoc_text() -> tuple[Path, str]:
    """Real English prose that every Python install has: the help topics of the standard library's
    `pydoc_data/topics.py` (~465k characters of the Python reference manual), in topic-name order."""
    from pydoc_data import topics
    return Path(topics.__file__), "\n\n".join(topics.topics[k].strip() for k in sorted(topics.topics))


def read_text(path: str | Path | None) -> tuple[Path, str]:
    """The evaluation text (default: the embedded held-out test split; `pydoc`: see `pydoc_text`)."""
    if str(path) == "pydoc":
        return pydoc_text()
    path = Path(path).expanduser() if path else DEFAULT_TEXT
    if not path.is_file():
        raise DataError(f"evaluation text '{path}' does not exist", "pass an existing UTF-8 text file with --text")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"evaluation text '{path}' is not UTF-8 text", "pass a UTF-8 text file with --text") from None
    if not text.strip():
        raise DataError(f"evaluation text '{path}' is empty", "pass a file with at least one window of text")
    return path, text


def token_windows(tok, text: str, path: Path, n_tokens: int, ctx: int) -> torch.Tensor:
    """The first `n_tokens` tokens of `text` (no special tokens) as non-overlapping windows.

    Returns (n_windows, ctx) int64; a trailing partial window is dropped so every window is scored
    the same way. Raises DataError when the text holds less than one window.
    """
    # Tokenize a prefix only: ~8 chars per token is a safe upper bound for BPE on prose and code.
    ids = tok(text[: n_tokens * 8], add_special_tokens=False, verbose=False)["input_ids"][:n_tokens]
    n_windows = len(ids) // ctx
    if n_windows == 0:
        raise DataError(f"evaluation text '{path}' has {len(ids)} tokens, fewer than one window of {ctx}",
                        f"pass a longer file or a smaller --ctx (at most {max(len(ids), 2)})")
    return torch.tensor(ids[: n_windows * ctx], dtype=torch.long).view(n_windows, ctx)


def read_tasks(path: str | Path, limit: int | None = None) -> list[dict]:
    """Items of a JSONL task file, each with `question` and `answer` (strings)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"task file '{path}' does not exist", "pass a JSONL file of question/answer items with --tasks")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"task file '{path}' line {n} is not JSON",
                            "each line must be an object with 'question' and 'answer'") from None
        if not isinstance(item, dict) or "question" not in item or "answer" not in item:
            raise DataError(f"task file '{path}' line {n} lacks 'question' or 'answer'",
                            "each line must be an object with 'question' and 'answer'")
        items.append({**item, "answer": str(item["answer"])})
        if limit and len(items) >= limit:
            break
    if not items:
        raise DataError(f"task file '{path}' has no items", "pass a JSONL file with at least one item")
    return items
