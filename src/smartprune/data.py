"""Text data from the shared data folder: evaluation texts (standard protocol) and calibration windows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from smartprune.errors import DataError, did_you_mean
from smartprune.paths import data_file


def check_positions(model, seqlen: int, what: str) -> None:
    """Refuse windows longer than the model's positions: GPT-2's position table would fail with an
    IndexError mid-run, and RoPE models would silently run past the length they were trained for."""
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is not None and seqlen > limit:
        raise DataError(f"{what} {seqlen} is longer than the model's {limit} positions")


def wikitext_rows(path: Path) -> list[str]:
    """Rows as the Hugging Face wikitext datasets hold them: each non-blank line keeps its trailing
    newline, a blank line is an empty row."""
    return [line if line.strip() else "" for line in path.read_text(encoding="utf-8").splitlines(keepends=True)]


def _wikitext(parts: tuple[str, ...]) -> str:
    return "\n\n".join(wikitext_rows(data_file(*parts)))


def _ptb(parts: tuple[str, ...]) -> str:
    lines = data_file(*parts).read_text(encoding="utf-8").splitlines()
    return " ".join(line.strip() for line in lines)


# Evaluation texts: task -> (reader, file inside the data folder). The test split, standard protocol.
EVAL_TEXTS = {
    "wikitext2": (_wikitext, ("wikitext-2-raw", "wiki.test.raw")),
    "wikitext103": (_wikitext, ("wikitext-103", "wiki.test.tokens")),
    "ptb": (_ptb, ("ptb", "ptb.test.txt")),
}
# Training texts for calibration (raw WikiText-2 train is not available here: the tokenized one is).
TRAIN_TEXTS = {
    "wikitext2": ("wikitext-2", "wiki.train.tokens"),
    "ptb": ("ptb", "ptb.train.txt"),
}


# The same test splits on the Hugging Face hub: (dataset, config, text field, joiner). A fallback only.
HUB_TEXTS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "text", "\n\n"),
    "wikitext103": ("wikitext", "wikitext-103-v1", "text", "\n\n"),
    "ptb": ("ptb_text_only", "penn_treebank", "sentence", " "),
}


def _from_hub(task: str, missing: DataError) -> str:
    """The test split from the hub with the `datasets` package; re-raises `missing` when offline."""
    import os

    from smartprune.hf import hub_reachable

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise missing
    try:
        import datasets
    except ImportError:
        raise missing from None
    if not hub_reachable():
        raise missing
    name, config, key, joiner = HUB_TEXTS[task]
    rows = datasets.load_dataset(name, config, split="test")[key]
    return joiner.join(r.strip() for r in rows) if joiner == " " else joiner.join(rows)


def eval_text(task: str) -> str:
    """The test text of `task`, joined as the standard perplexity protocol expects: from the data
    folder, or (file missing, network present, `datasets` installed) from the Hugging Face hub."""
    if task not in EVAL_TEXTS:
        raise DataError(f"unknown text '{task}'{did_you_mean(task, EVAL_TEXTS)}; known: {', '.join(EVAL_TEXTS)}")
    reader, parts = EVAL_TEXTS[task]
    try:
        text = reader(parts)
    except DataError as missing:
        text = _from_hub(task, missing)
    if not text.strip():
        raise DataError(f"text '{task}' is empty ({'/'.join(parts)})")
    return text


def train_text_path(name: str) -> Path:
    """The training text file `name` (wikitext2 | ptb); raises DataError naming it when missing."""
    if name not in TRAIN_TEXTS:
        raise DataError(f"unknown training text '{name}'{did_you_mean(name, TRAIN_TEXTS)}")
    return data_file(*TRAIN_TEXTS[name])


def train_text(name: str) -> str:
    return train_text_path(name).read_text(encoding="utf-8")


def tokenize(tokenizer, text: str) -> Tensor:
    """The whole text as one 1-D tensor of token ids, with the tokenizer's defaults."""
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
    if ids.numel() == 0:
        raise DataError("the text tokenized to no tokens")
    return ids


@dataclass
class Calibration:
    """Seeded random windows of a training text: `ids` to compress with, `eval_ids` held out."""

    ids: Tensor
    eval_ids: Tensor
    source: str


def windows_at(stream: Tensor, starts: list[int], seqlen: int) -> Tensor:
    """The windows of `seqlen` tokens of `stream` beginning at `starts` (len(starts), seqlen)."""
    return torch.stack([stream[s:s + seqlen] for s in starts])


def random_windows(stream: Tensor, count: int, seqlen: int, generator: torch.Generator) -> Tensor:
    """`count` windows of `seqlen` tokens at distinct random starts of `stream` (count, seqlen)."""
    if stream.numel() < seqlen + count:
        raise DataError(f"calibration text has {stream.numel()} tokens, too few for {count} windows of {seqlen}")
    starts = torch.randperm(stream.numel() - seqlen, generator=generator)[:count]
    return windows_at(stream, starts.tolist(), seqlen)


def held_out_windows(stream: Tensor, taken: Tensor, count: int, seqlen: int, generator: torch.Generator) -> Tensor:
    """`count` windows of `stream` that share no token position with the windows starting at `taken`
    (nor with each other), drawn in a seeded random order (count, seqlen)."""
    covered = torch.zeros(stream.numel() + 1, dtype=torch.int64)
    for s in taken.tolist():
        covered[s:s + seqlen] = 1
    starts: list[int] = []
    for s in torch.randperm(stream.numel() - seqlen, generator=generator).tolist():
        if len(starts) == count:
            break
        if int(covered[s:s + seqlen].sum()) == 0:
            starts.append(s)
            covered[s:s + seqlen] = 1
    if len(starts) < count:
        raise DataError(f"calibration text has {stream.numel()} tokens, too few for {count} held-out windows of "
                        f"{seqlen} apart from the calibration windows")
    return windows_at(stream, starts, seqlen)


def split_windows(stream: Tensor, samples: int, eval_samples: int, seqlen: int,
                  seed: int) -> tuple[Tensor, Tensor]:
    """Calibration windows at seeded random starts, and held-out windows disjoint from them (the
    recursive strategy's perplexity metric must not score text the fit was run on)."""
    gen = torch.Generator().manual_seed(seed)
    if stream.numel() < seqlen + samples:
        raise DataError(f"calibration text has {stream.numel()} tokens, too few for {samples} windows of {seqlen}")
    starts = torch.randperm(stream.numel() - seqlen, generator=gen)[:samples]
    ids = windows_at(stream, starts.tolist(), seqlen)
    if eval_samples == 0:
        return ids, ids[:0]
    return ids, held_out_windows(stream, starts, eval_samples, seqlen, gen)


def calibration(tokenizer, text: str, samples: int, seqlen: int, eval_samples: int, seed: int) -> Calibration:
    """Calibration windows from training text `text` (wikitext2 | ptb), reproducible from `seed`;
    the held-out windows never overlap them."""
    stream = tokenize(tokenizer, train_text(text))
    ids, eval_ids = split_windows(stream, samples, eval_samples, seqlen, seed)
    return Calibration(ids=ids, eval_ids=eval_ids, source=text)


# Held-out texts for recovery: the validation split of each training text (never its test split).
VALID_TEXTS = {
    "wikitext2": ("wikitext-2", "wiki.valid.tokens"),
    "ptb": ("ptb", "ptb.valid.txt"),
}


def recovery_streams(tokenizer, text: str, seqlen: int, eval_windows: int) -> tuple[Tensor, Tensor]:
    """(training tokens, held-out tokens) for recovery: a named text's train and validation splits,
    or a text file whose last ``eval_windows * seqlen`` tokens (at least 5%) are held out."""
    if text in TRAIN_TEXTS:
        return tokenize(tokenizer, train_text(text)), tokenize(tokenizer, data_file(*VALID_TEXTS[text])
                                                               .read_text(encoding="utf-8"))
    path = Path(text).expanduser()
    if not path.is_file():
        raise DataError(f"training text '{text}' is neither {' nor '.join(TRAIN_TEXTS)} nor a file"
                        f"{did_you_mean(text, TRAIN_TEXTS)}")
    try:
        stream = tokenize(tokenizer, path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"training text {path} is not UTF-8 text") from None
    held = max(eval_windows * seqlen, stream.numel() // 20)
    if stream.numel() - held < 2 * seqlen:
        raise DataError(f"training text {path} has {stream.numel()} tokens: too few for training windows of "
                        f"{seqlen} plus {eval_windows} held-out windows")
    return stream[:-held], stream[-held:]
