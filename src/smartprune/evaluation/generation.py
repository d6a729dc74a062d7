"""Generation quality: seeded greedy or sampled continuations and two measurable failure modes.

Both metrics work on the generated text's *units*: lower-cased words, numbers and single
punctuation or symbol characters (``re.findall(r"[a-z]+|\\d+|[^\\w\\s]", text.lower())``), so they do
not depend on the tokenizer and two models with different vocabularies compare fairly.

- **repetition@N** (n-gram ``n`` = 4): the share of generated units that lie inside a 4-unit
  sequence which already occurred earlier in the same generated text. "a b c d a b c d" has its
  second "a b c d" repeated: 4 of 8 units, 0.5. A text that loops scores near 1 (a run of commas
  too), fresh text 0.
- **meaningless@N**: the share of generated alphabetic words that are absent from a reference
  English vocabulary, every lower-cased alphabetic word of the WikiText-2 train text. Numbers and
  punctuation are not counted, except that a text without a single alphabetic word (only
  punctuation, symbols or numbers) scores 1: it says nothing. Garbled sub-word salad
  ("thewrit ingof") scores high.

N is the number of generated tokens the text was cut at (128 and 512 by default): one generation of
the longest length, whose prefixes give the shorter ones. End-of-text is suppressed, so every model
writes all N tokens.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from smartprune.data import train_text
from smartprune.device import model_device

PROMPTS = ("Once upon a time", "The Industrial Revolution")
UNIT = re.compile(r"[a-z]+|\d+|[^\w\s]")


def units(text: str) -> list[str]:
    return UNIT.findall(text.lower())


def repetition(text: str, n: int = 4) -> float:
    """Share of units inside an n-gram that already occurred earlier in `text` (0 for no units)."""
    w = units(text)
    if not w:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    inside = [False] * len(w)
    for end in range(n, len(w) + 1):
        gram = tuple(w[end - n:end])
        if gram in seen:
            inside[end - n:end] = [True] * n
        seen.add(gram)
    return sum(inside) / len(w)


def reference_vocabulary(text: str | None = None) -> frozenset[str]:
    """Lower-cased alphabetic words of `text` (default: the WikiText-2 train text, without <unk>)."""
    text = train_text("wikitext2") if text is None else text
    return frozenset(re.findall(r"[a-z]+", text.lower().replace("<unk>", " ")))


def meaningless(text: str, vocabulary: Iterable[str]) -> float:
    """Share of alphabetic words of `text` not in `vocabulary` (1 when there are none)."""
    alpha = [x for x in units(text) if x.isalpha()]
    if not alpha:
        return 1.0
    vocab = vocabulary if isinstance(vocabulary, (set, frozenset)) else set(vocabulary)
    return sum(x not in vocab for x in alpha) / len(alpha)


@dataclass
class GenerationConfig:
    prompts: tuple[str, ...] = PROMPTS
    lengths: tuple[int, ...] = (128, 512)  # generated tokens at which the metrics are taken
    greedy: bool = True  # False: nucleus sampling with `temperature` and `top_p`, seeded
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.prompts or any(not p.strip() for p in self.prompts):
            raise ValueError("prompts must be non-empty text")
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"lengths must be positive token counts, got {self.lengths}")


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt: str, new_tokens: int, *, greedy: bool = True,
             temperature: float = 0.8, top_p: float = 0.95, seed: int = 0) -> list[int]:
    """`new_tokens` generated token ids after `prompt` (KV cache; end-of-text suppressed)."""
    ids = tokenizer(prompt, return_tensors="pt", verbose=False).input_ids.to(model_device(model))
    torch.manual_seed(seed)
    sampling = {} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=not greedy, pad_token_id=tokenizer.eos_token_id or 0,
                         **sampling)
    return out[0, ids.shape[1]:].tolist()


def generation_quality(model: nn.Module, tokenizer, cfg: GenerationConfig, vocabulary: frozenset[str]) -> dict:
    """Metrics at each length, averaged over the prompts, with every text kept for reading."""
    texts: dict[str, dict[int, str]] = {}
    for prompt in cfg.prompts:
        gen = generate(model, tokenizer, prompt, max(cfg.lengths), greedy=cfg.greedy,
                       temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)
        texts[prompt] = {n: tokenizer.decode(gen[:n], skip_special_tokens=True) for n in cfg.lengths}
    out: dict = {"decoding": "greedy" if cfg.greedy else f"sample(t={cfg.temperature}, top_p={cfg.top_p})"}
    for n in cfg.lengths:
        out[f"repetition@{n}"] = sum(repetition(t[n]) for t in texts.values()) / len(texts)
        out[f"meaningless@{n}"] = sum(meaningless(t[n], vocabulary) for t in texts.values()) / len(texts)
    out["texts"] = {p: t[max(cfg.lengths)] for p, t in texts.items()}
    return out
