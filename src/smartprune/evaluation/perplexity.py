"""Perplexity by the standard protocol (SparseGPT / Wanda / SliceGPT).

The test text is tokenized once and cut into non-overlapping windows of ``seqlen`` tokens; the
trailing partial window is dropped; each window predicts its tokens 2..seqlen; perplexity is
``exp(mean token NLL)``. With ``stride`` the Hugging Face sliding-window variant is used instead:
windows of ``seqlen`` start every ``stride`` tokens and only the tokens not scored before count.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from smartprune.data import check_positions, eval_text, tokenize
from smartprune.device import model_device
from smartprune.errors import DataError


@dataclass
class PerplexityResult:
    task: str
    perplexity: float
    nll: float
    windows: int
    tokens: int
    seqlen: int
    stride: int | None

    def to_dict(self) -> dict:
        return asdict(self)


def windows(n_tokens: int, seqlen: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position within the window) for each window over `n_tokens`.

    Non-overlapping (stride None): full windows only, each scoring positions 1..seqlen-1.
    Sliding: windows [b, b+seqlen) for b = 0, stride, ...; each scores the tokens after the previous
    window's end (the first window from position 1); stops once the end of the text is scored.
    """
    if seqlen < 2:
        raise DataError(f"seqlen must be at least 2, got {seqlen}")
    if stride is None:
        return [(b, b + seqlen, 1) for b in range(0, n_tokens - seqlen + 1, seqlen)]
    if not 1 <= stride <= seqlen:
        raise DataError(f"stride must be in [1, seqlen={seqlen}], got {stride}")
    out, prev_end = [], 0
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + seqlen, n_tokens)
        out.append((begin, end, max(prev_end - begin, 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


def check_limit(limit: int | None) -> None:
    """A window limit is None (all windows) or a positive count; callers check it before any work."""
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of windows, got {limit}")


@torch.no_grad()
def perplexity_of_ids(model: nn.Module, ids: Tensor, seqlen: int, *, stride: int | None = None,
                      limit: int | None = None, task: str = "tokens", progress: bool = True) -> PerplexityResult:
    """Perplexity of `model` on the 1-D token stream `ids`."""
    check_limit(limit)
    spans = windows(ids.numel(), seqlen, stride)[:limit]
    if not spans:
        raise DataError(f"text of {ids.numel()} tokens is shorter than one window of {seqlen}")
    model.eval()
    device = model_device(model)
    total, count = 0.0, 0
    for begin, end, first in tqdm(spans, desc=f"perplexity {task}", disable=not progress, leave=False):
        window = ids[begin:end].unsqueeze(0).to(device)
        logits = model(window).logits[0, first - 1:-1].float()
        nll = F.cross_entropy(logits, window[0, first:], reduction="sum")
        total += nll.item()
        count += end - begin - first
    mean = total / count
    return PerplexityResult(task, math.exp(mean), mean, len(spans), count, seqlen, stride)


def perplexity(model: nn.Module, tokenizer, task: str = "wikitext2", *, seqlen: int = 1024,
               stride: int | None = None, limit: int | None = None, progress: bool = True) -> PerplexityResult:
    """Perplexity of `model` on the test text of `task` (wikitext2, wikitext103, ptb)."""
    check_positions(model, seqlen, "seqlen")
    ids = tokenize(tokenizer, eval_text(task))
    return perplexity_of_ids(model, ids, seqlen, stride=stride, limit=limit, task=task, progress=progress)
