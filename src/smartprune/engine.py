"""The compression engine: the sequential strategy (Eq. 3) around the recursive one (Algorithm 1).

Order: the embedding stages first, then for each block in turn its attention stages (IRC, then
DWC) and its feed-forward stages (FPP). Each sublayer is compressed given the compressed layers
before it: calibration activations flow through the compressed prefix (``sequential: true``), or
through the dense model (``false``). Within a stage the rate grows through its schedule; after each
increment the stage's weights are re-fitted, and with a threshold the state is evaluated and the
last state within the threshold is kept.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from smartprune.accounting import accounting, group_counts, unique_parameters
from smartprune.adapters import Adapter, get_adapter
from smartprune.data import Calibration, calibration, check_positions
from smartprune.evaluation.perplexity import perplexity_of_ids
from smartprune.methods import METHODS
from smartprune.methods.base import Sublayer
from smartprune.methods.fit import Fitter, Objective, lm_objective, local_objective, relative_error
from smartprune.recipes import Recipe

log = logging.getLogger(__name__)


@dataclass
class CompressionResult:
    model: nn.Module
    adapter: Adapter
    report: dict = field(default_factory=dict)


def _chunked(fn: Callable[[Tensor], Tensor], x: Tensor, chunk: int = 8) -> Tensor:
    with torch.no_grad():
        return torch.cat([fn(x[s:s + chunk]) for s in range(0, x.shape[0], chunk)])


def _calibration_ppl(model: nn.Module, ids: Tensor) -> float:
    """Perplexity on the held-out calibration windows (each window scored on its own)."""
    return perplexity_of_ids(model, ids.flatten(), ids.shape[1], task="calibration", progress=False).perplexity


class _Run:
    """State of one compression run (kept off module level so runs never share anything)."""

    def __init__(self, adapter: Adapter, recipe: Recipe, calib: Calibration, seed: int,
                 task_objective: Objective | None, progress: bool) -> None:
        self.adapter, self.recipe, self.calib = adapter, recipe, calib
        self.model = adapter.model
        self.generator = torch.Generator().manual_seed(seed)
        self.task_objective = task_objective or lm_objective(self.model, calib.ids)
        self.progress = progress
        self.seconds: dict[str, float] = defaultdict(float)
        self.layers: list[dict] = []
        self.shared: dict = {}  # state a method keeps across sublayers of this run (e.g. a global threshold)
        s = recipe.strategy
        self.check = s.recursive and s.threshold is not None
        self.dense_ppl = _calibration_ppl(self.model, calib.eval_ids) if self.check and s.metric == "perplexity" \
            else None

    def stages(self, scope: str) -> list[str]:
        return [k for k, spec in METHODS.items() if scope in spec.scopes and k in self.recipe.stages]

    def _within_threshold(self, sub: Sublayer) -> tuple[bool, float]:
        s = self.recipe.strategy
        if s.metric == "perplexity":
            ppl = _calibration_ppl(self.model, self.calib.eval_ids)
            return ppl <= (1 + s.threshold) * self.dense_ppl, ppl
        err = relative_error(sub.forward, sub.inputs, sub.target)
        return err <= s.threshold, err

    def run_stage(self, key: str, sub: Sublayer) -> None:
        cfg = self.recipe.stages[key]
        start = time.perf_counter()
        stage = METHODS[key].stage(cfg, sub, self.generator)
        fitter = Fitter(self.model, cfg, self.calib.ids.shape[0], self.generator)
        objective = self.task_objective if cfg.objective == "task" else \
            local_objective(sub.forward, sub.inputs, sub.target)
        rates = stage.schedule(self.recipe.strategy)
        best, reached, value = (stage.snapshot() if self.check else None), 0.0, None
        where = "embedding" if sub.block is None else f"block {sub.block}"
        losses: list[float] = []
        for rate in tqdm(rates, desc=f"{key} {where}", leave=False, disable=not self.progress):
            stage.compress_to(rate)
            losses += fitter.fit(stage.trainable(), stage.masked(), objective).losses
            if self.check:
                ok, value = self._within_threshold(sub)
                if not ok:
                    log.info("%s %s: rate %.3f is past the threshold (%.4g); keeping %.3f", key, where, rate,
                             value, reached)
                    stage.restore(best)
                    break
                best = stage.snapshot()
            reached = rate
        stage.finalize()
        err = relative_error(sub.forward, sub.inputs, sub.target)
        seconds = time.perf_counter() - start
        self.seconds[key] += seconds
        self.layers.append({"stage": key, "block": sub.block, "rate": reached, "relative_error": err,
                            "fit_loss_first": losses[0] if losses else None,
                            "fit_loss_last": losses[-1] if losses else None, "seconds": seconds})

    def compress_embeddings(self) -> None:
        keys = self.stages("embedding")
        if not keys:
            return
        ids = self.calib.ids
        sub = Sublayer(self.adapter, "embedding", None, {p: p for p in self.adapter.embedding_paths()},
                       inputs=ids, target=_chunked(self.adapter.embed, ids), shared=self.shared)
        for key in keys:
            self.run_stage(key, sub)

    def compress_sublayer(self, scope: str, block: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """Compress one attention or feed-forward sublayer given its normalized input `x`; returns
        (dense output, compressed output) on `x`."""
        a = self.adapter
        fn = (lambda t: a.attention(block, t)) if scope == "attention" else (lambda t: a.feed_forward(block, t))
        dense = _chunked(fn, x)
        keys = self.stages(scope)
        if not keys:
            return dense, dense
        paths = a.attention_paths(block) if scope == "attention" else a.ff_paths(block)
        sub = Sublayer(a, scope, block, paths, inputs=x, target=dense, shared=self.shared)
        for key in keys:
            self.run_stage(key, sub)
        return dense, _chunked(fn, x)

    def compress_blocks(self) -> None:
        a, sequential = self.adapter, self.recipe.strategy.sequential
        h = _chunked(a.embed, self.calib.ids)
        n = len(a.blocks())
        for i in tqdm(range(n), desc="blocks", disable=not self.progress):
            attn_dense, attn_out = self.compress_sublayer("attention", i, _chunked(a.attn_norm(i), h))
            mid = h + (attn_out if sequential else attn_dense)
            ff_dense, ff_out = self.compress_sublayer("ff", i, _chunked(a.ff_norm(i), mid))
            h = mid + (ff_out if sequential else ff_dense)


def compress(model: nn.Module, tokenizer, recipe: Recipe, *, seed: int = 0, calib: Calibration | None = None,
             task_objective: Objective | None = None, progress: bool = True) -> CompressionResult:
    """Compress `model` in place with `recipe`; returns the model, its adapter and a report.

    `calib` defaults to seeded windows of the recipe's calibration text; `task_objective` replaces
    the language-modelling loss for stages with ``objective: task`` (e.g. a classification loss).
    """
    torch.manual_seed(seed)
    model.eval()
    adapter = get_adapter(model)
    if calib is None:
        c = recipe.calibration
        check_positions(model, c.seqlen, "calibration window length (calib-seqlen)")
        calib = calibration(tokenizer, c.text, c.samples, c.seqlen, c.eval_samples, seed)
    total = unique_parameters(model)
    before = group_counts(adapter)
    start = time.perf_counter()
    run = _Run(adapter, recipe, calib, seed, task_objective, progress)
    log.info("compressing %d blocks with recipe '%s' (%s)", len(adapter.blocks()), recipe.name,
             ", ".join(recipe.stages))
    run.compress_embeddings()
    run.compress_blocks()
    report = accounting(before, group_counts(adapter), total)
    report.update({
        "recipe": recipe.name, "recipe_config": recipe.to_dict(), "seed": seed,
        "calibration": {"text": calib.source, "samples": int(calib.ids.shape[0]), "seqlen": int(calib.ids.shape[1]),
                        "eval_samples": int(calib.eval_ids.shape[0])},
        "stages": {k: {"seconds": run.seconds[k],
                       "mean_rate": _mean([r["rate"] for r in run.layers if r["stage"] == k]),
                       "mean_relative_error": _mean([r["relative_error"] for r in run.layers if r["stage"] == k])}
                   for k in recipe.stages},
        "layers": run.layers,
        "seconds": time.perf_counter() - start,
    })
    return CompressionResult(model, adapter, report)


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values) if values else float("nan")
