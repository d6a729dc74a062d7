"""Text classification with a causal LM: zero-shot label scoring and a fine-tuned classification head.

Zero-shot: each example is rendered with the task's fixed prompt, and each label's verbalizer
(e.g. " yes") is scored by its summed token log-likelihood after the prompt; the highest wins.
The reported loss is the cross-entropy of the true label under the softmax of those scores.

Fine-tune: a linear head on the backbone's last-token hidden state (``model.base_model``, so it
works for every Hugging Face causal LM), the whole model trained with AdamW within a budget of
examples, epochs and sequence length. Pruned weights stay exactly zero: their gradients are masked
before every step (the same rule as the compression fit).
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from smartprune.data import Calibration
from smartprune.device import model_device
from smartprune.evaluation.metrics import classification_metrics
from smartprune.evaluation.tasks import Example, Task
from smartprune.methods.fit import Objective
from smartprune.modules.masked import mask_gradients

log = logging.getLogger(__name__)


def pad_batch(seqs: list[list[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Right-padded (ids, attention mask); real tokens keep positions 0..n-1."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, verbose=False).input_ids


def _max_length(model: nn.Module) -> int:
    c = model.config
    return getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 2048


# ----------------------------------------------------------------------------------- zero-shot
@torch.no_grad()
def label_scores(model: nn.Module, tokenizer, prompts: list[str], verbalizers: tuple[str, ...], *,
                 batch_size: int = 8, progress: bool = False) -> Tensor:
    """(examples, labels) summed log-likelihood of each verbalizer after each prompt."""
    model.eval()
    conts = [tokenizer(v, add_special_tokens=False, verbose=False).input_ids for v in verbalizers]
    room = _max_length(model) - max(map(len, conts))
    items = []  # (example, label, context ids, continuation ids)
    for e, p in enumerate(prompts):
        ctx = _encode(tokenizer, p)[-room:]  # over-long prompts keep their end, where the question is
        items += [(e, k, ctx, c) for k, c in enumerate(conts)]
    scores = torch.empty(len(prompts), len(verbalizers))
    step = batch_size * len(verbalizers)
    dev = model_device(model)
    for s in tqdm(range(0, len(items), step), desc="zero-shot", disable=not progress, leave=False):
        chunk = items[s:s + step]
        ids, mask = pad_batch([ctx + c for _, _, ctx, c in chunk])
        logp = torch.log_softmax(model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float(), -1).cpu()
        for row, (e, k, ctx, c) in enumerate(chunk):
            pos = torch.arange(len(ctx) - 1, len(ctx) + len(c) - 1)
            scores[e, k] = logp[row, pos, torch.tensor(c)].sum()
    return scores


def zero_shot(model: nn.Module, tokenizer, task: Task, examples: list[Example], *, batch_size: int = 8,
              progress: bool = False) -> dict:
    scores = label_scores(model, tokenizer, [task.render(e) for e in examples], task.verbalizers,
                          batch_size=batch_size, progress=progress)
    labels = torch.tensor([e.label for e in examples])
    loss = F.cross_entropy(scores, labels).item()
    return _scored(task, labels.tolist(), scores.argmax(-1).tolist(), loss, "zero-shot")


def _scored(task: Task, labels: list[int], preds: list[int], loss: float, mode: str) -> dict:
    m = classification_metrics(labels, preds, len(task.labels))
    return {**m, "loss": loss, "glue_metric": task.glue_metric, "score": m[task.glue_metric], "mode": mode,
            "examples": len(labels)}


# ----------------------------------------------------------------------------------- fine-tune
@dataclass
class FinetuneConfig:
    """The training budget of the fine-tuned classifier."""

    max_train: int = 1000  # training examples used (a seeded random subset)
    epochs: int = 1
    seqlen: int = 128  # tokens per example (longer ones are truncated at the end)
    batch_size: int = 8
    lr: float = 3e-5
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_train", "epochs", "seqlen", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")

    def to_dict(self) -> dict:
        return asdict(self)


class SequenceClassifier(nn.Module):
    """A linear head on the causal LM's backbone, read at each sequence's last real token."""

    def __init__(self, lm: nn.Module, n_labels: int, seed: int = 0) -> None:
        super().__init__()
        self.lm = lm
        hidden = lm.config.hidden_size
        gen = torch.Generator().manual_seed(seed)
        self.head = nn.Linear(hidden, n_labels).to(model_device(lm))
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(n_labels, hidden, generator=gen).to(self.head.weight.device) * 0.02)
            self.head.bias.zero_()

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        dev = model_device(self.lm)
        ids, mask = ids.to(dev), mask.to(dev)
        h = self.lm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        last = mask.sum(1) - 1
        # Logits come back on the CPU (a few numbers per example), where the labels are: callers stay
        # device-agnostic, and gradients still flow back to the device.
        return self.head(h[torch.arange(h.shape[0], device=h.device), last].float()).cpu()


def encode_examples(tokenizer, task: Task, examples: list[Example], seqlen: int) -> list[list[int]]:
    """Input text: the first text, a newline, the second (pair tasks); truncated to `seqlen` tokens."""
    texts = [e.a.strip() + (f"\n{e.b.strip()}" if e.b else "") for e in examples]
    return [_encode(tokenizer, t)[:seqlen] or [0] for t in texts]


def finetune(clf: SequenceClassifier, tokenizer, task: Task, train: list[Example], cfg: FinetuneConfig, *,
             progress: bool = False) -> dict:
    """Train `clf` (backbone and head) on `train`; returns the loss curve summary and the time."""
    rng = random.Random(cfg.seed)
    seqs = encode_examples(tokenizer, task, train, cfg.seqlen)
    labels = [e.label for e in train]
    params = [p for p in clf.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    torch.manual_seed(cfg.seed)
    clf.train()
    losses, start = [], time.perf_counter()
    steps = cfg.epochs * math.ceil(len(seqs) / cfg.batch_size)
    bar = tqdm(total=steps, desc=f"fine-tune {task.name}", disable=not progress, leave=False)
    for _ in range(cfg.epochs):
        order = list(range(len(seqs)))
        rng.shuffle(order)
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            ids, mask = pad_batch([seqs[i] for i in idx])
            loss = F.cross_entropy(clf(ids, mask), torch.tensor([labels[i] for i in idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            mask_gradients(clf)
            opt.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    clf.eval()
    head = max(1, len(losses) // 10)
    return {"steps": len(losses), "examples": len(seqs), "seconds": time.perf_counter() - start,
            "loss_first": sum(losses[:head]) / head, "loss_last": sum(losses[-head:]) / head}


@torch.no_grad()
def evaluate_classifier(clf: SequenceClassifier, tokenizer, task: Task, examples: list[Example], *,
                        seqlen: int = 128, batch_size: int = 16, progress: bool = False) -> dict:
    clf.eval()
    seqs = encode_examples(tokenizer, task, examples, seqlen)
    logits = []
    for s in tqdm(range(0, len(seqs), batch_size), desc=f"score {task.name}", disable=not progress, leave=False):
        logits.append(clf(*pad_batch(seqs[s:s + batch_size])))
    out = torch.cat(logits)
    labels = torch.tensor([e.label for e in examples])
    return _scored(task, labels.tolist(), out.argmax(-1).tolist(), F.cross_entropy(out, labels).item(), "finetune")


def task_calibration(clf: SequenceClassifier, tokenizer, task: Task, examples: list[Example],
                     held_out: list[Example], seqlen: int) -> tuple[Calibration, Objective]:
    """The task's own labelled examples as calibration windows (right-padded to one length, padding
    with end-of-text) and the classification loss on them as the engine's task objective (for stages
    with ``objective: task``): the paper's Table 6 setting, compressing a fine-tuned classifier."""
    pad = tokenizer.eos_token_id or 0
    held_out = held_out or examples[:1]  # tiny train splits: the engine needs at least one held-out row
    ids, mask = pad_batch(encode_examples(tokenizer, task, examples, seqlen), pad)
    eval_ids, _ = pad_batch(encode_examples(tokenizer, task, held_out, seqlen), pad)
    labels = torch.tensor([e.label for e in examples])

    def objective(idx: Tensor) -> Tensor:
        return F.cross_entropy(clf(ids[idx], mask[idx]), labels[idx])

    return Calibration(ids, eval_ids, f"{task.name} train"), objective
