"""Training a small GPT-2 from scratch: the paper's language-modelling protocol ("models are
initialized and trained on the datasets"), so the GPT-2 code paths run on trained weights here,
where no pretrained GPT-2 exists. Uses the real GPT-2 tokenizer from the data folder."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from smartprune.data import eval_text, random_windows, tokenize, train_text
from smartprune.device import resolve_device
from smartprune.errors import DataError, did_you_mean
from smartprune.evaluation.perplexity import perplexity_of_ids
from smartprune.files import atomic_dir, check_output
from smartprune.paths import data_dir
from smartprune.training.schedule import warmup_cosine

log = logging.getLogger(__name__)

# Model sizes (GPT2Config fields). The GPT-2 vocabulary (50,257) dominates the small ones' size.
CONFIGS: dict[str, dict] = {
    "gpt2-tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 128},
    "gpt2-mini": {"n_layer": 4, "n_embd": 256, "n_head": 4, "n_positions": 256},
    "gpt2-small": {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024},
}


@dataclass
class TrainConfig:
    config: str = "gpt2-mini"
    text: str = "wikitext2"  # training text: wikitext2 | ptb (their train splits)
    steps: int = 1000
    minutes: float | None = None  # stop earlier when this wall-time budget is spent
    batch_size: int = 8
    seqlen: int = 128
    lr: float = 1e-3
    warmup: int = 50
    eval_windows: int = 8  # first N test windows (of seqlen) scored after training
    seed: int = 0

    def __post_init__(self) -> None:
        if self.config not in CONFIGS:
            raise DataError(f"unknown model config '{self.config}'{did_you_mean(self.config, CONFIGS)}; "
                            f"known: {', '.join(CONFIGS)}")
        for name in ("steps", "batch_size", "eval_windows"):
            if getattr(self, name) < 1:
                raise DataError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 2 <= self.seqlen <= CONFIGS[self.config]["n_positions"]:
            raise DataError(f"seqlen must be in [2, {CONFIGS[self.config]['n_positions']}] for {self.config}, "
                            f"got {self.seqlen}")
        if self.minutes is not None and self.minutes <= 0:
            raise DataError(f"minutes must be positive, got {self.minutes}")


def gpt2_tokenizer():
    from transformers import AutoTokenizer

    path = data_dir() / "gpt2-tokenizer"
    if not (path / "vocab.json").is_file():
        raise DataError(f"GPT-2 tokenizer not found in {path} (set SMARTPRUNE_DATA)")
    return AutoTokenizer.from_pretrained(path)


def new_model(config: str, vocab_size: int, seed: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, bos_token_id=50256, eos_token_id=50256, **CONFIGS[config])
    return GPT2LMHeadModel(cfg)


def train(cfg: TrainConfig, out: str | Path, *, overwrite: bool = False, device: str | torch.device = "auto",
          progress: bool = True) -> dict:
    """Train `cfg.config` from random weights on `cfg.text` and save it (with tokenizer and train.json)."""
    out = Path(out)
    check_output(out, overwrite)  # before the work, not after it
    dev = resolve_device(device)
    tokenizer = gpt2_tokenizer()
    stream = tokenize(tokenizer, train_text(cfg.text))
    test_ids = tokenize(tokenizer, eval_text(cfg.text))
    model = new_model(cfg.config, len(tokenizer), cfg.seed).to(dev)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    losses, start, step = [], time.perf_counter(), 0
    bar = tqdm(range(cfg.steps), desc=f"train {cfg.config}", disable=not progress)
    for step in bar:
        if cfg.minutes is not None and time.perf_counter() - start > 60 * cfg.minutes:
            log.info("time budget of %.1f min spent after %d steps", cfg.minutes, step)
            break
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, cfg.steps, cfg.lr, cfg.warmup)
        ids = random_windows(stream, cfg.batch_size, cfg.seqlen, gen).to(dev)
        loss = model(ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    else:
        step = cfg.steps
    model.eval()
    seconds = time.perf_counter() - start
    ppl = perplexity_of_ids(model, test_ids, cfg.seqlen, limit=cfg.eval_windows, task=cfg.text, progress=False)
    model.to("cpu")
    k = max(1, len(losses) // 20)
    summary = {"config": asdict(cfg), "model": CONFIGS[cfg.config], "parameters": sum(p.numel() for p in
                                                                                       model.parameters()),
               "steps_done": step, "seconds": seconds, "loss_first": sum(losses[:k]) / k,
               "loss_last": sum(losses[-k:]) / k, "test": ppl.to_dict()}
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "train.json").write_text(json.dumps(summary, indent=2))
    return summary
