"""The compression engine: the sequential strategy (Eq. 3) around the recursive one (Algorithm 1).

Order: the embedding stages first, then for each block in turn its attention stages (IRC, then
DWC) and its feed-forward stages (FPP). Each sublayer is compressed given the compressed layers
before it: calibration activations flow through the compressed prefix (``sequential: true``), or
through the dense model (``false``). Within a stage the rate grows through its schedule; after each
increment the stage's weights are re-fitted, and with a threshold the state is evaluated and the
last state within the threshold is kept.

Where: the model and its calibration activations run on ``device`` (a GPU, say), forward passes in
``compute_dtype`` (input statistics and Hessians are accumulated in float64, fit losses in float32
whatever it is). With ``offload`` only the block being compressed is on the device, the others wait
in host memory (as SparseGPT and llm-compressor do), so a model larger than the device's memory can
be compressed; offload works with objectives local to each sublayer (the default), since the
model's own loss or perplexity would need every block on the device at once.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from smartprune.adapters import Adapter, get_adapter, paper_methods_unsupported
from smartprune.compression.accounting import accounting, group_counts, unique_parameters
from smartprune.compression.allocation import plan
from smartprune.compression.owl import owl_rates
from smartprune.compression.structured import plan_structure
from smartprune.data import Calibration, calibration, check_positions
from smartprune.device import autocast, model_device, resolve_compute_dtype, resolve_device
from smartprune.errors import DataError, ModelError
from smartprune.evaluation.perplexity import perplexity_of_ids
from smartprune.methods import METHODS, STRUCTURED
from smartprune.methods.base import Plan, Sublayer
from smartprune.methods.fit import Fitter, Objective, lm_objective, local_objective, relative_error
from smartprune.modules.head import head_gram, low_rank_head, untie_head
from smartprune.recipes import Recipe
from smartprune.recipes.schema import PRUNING_STAGES

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
                 task_objective: Objective | None, progress: bool, placement: Placement) -> None:
        self.adapter, self.recipe, self.calib, self.placement = adapter, recipe, calib, placement
        self.model = adapter.model
        self.generator = torch.Generator().manual_seed(seed)
        self.task_objective = task_objective or lm_objective(self.model, calib.ids)
        self.progress = progress
        self.seconds: dict[str, float] = defaultdict(float)
        self.layers: list[dict] = []
        self.plan = Plan()  # what the run decides before the per-block work, read by every stage
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
                       inputs=ids, target=_chunked(self.adapter.embed, ids), plan=self.plan)
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
        sub = Sublayer(a, scope, block, paths, inputs=x, target=dense, plan=self.plan)
        for key in keys:
            self.run_stage(key, sub)
        return dense, _chunked(fn, x)

    def compress_blocks(self) -> None:
        a = self.adapter
        h = _chunked(a.embed, self.calib.ids)
        n = len(a.blocks())
        for i in tqdm(range(n), desc="blocks", disable=not self.progress):
            with self.placement.block(a.blocks()[i]):
                h = self.compress_block(i, h) if a.sublayers else self.compress_whole_block(i, h)

    def compress_block(self, i: int, h: Tensor) -> Tensor:
        """Block `i`'s attention, then its feed-forward; returns the block's output on `h`."""
        a, sequential = self.adapter, self.recipe.strategy.sequential
        attn_dense, attn_out = self.compress_sublayer("attention", i, _chunked(a.attn_norm(i), h))
        mid = h + (attn_out if sequential else attn_dense)
        ff_dense, ff_out = self.compress_sublayer("ff", i, _chunked(a.ff_norm(i), h if a.parallel_residual else mid))
        return mid + (ff_out if sequential else ff_dense)

    def compress_whole_block(self, i: int, h: Tensor) -> Tensor:
        """A block of a model without a table entry: every linear at once, the block as the sublayer."""
        a = self.adapter

        def fn(t: Tensor) -> Tensor:
            return a.run_block(i, t)

        dense = _chunked(fn, h)
        keys = self.stages("block")
        if keys:
            sub = Sublayer(a, "block", i, a.linear_paths(i), inputs=h, target=dense, plan=self.plan)
            for key in keys:
                self.run_stage(key, sub)
        return _chunked(fn, h) if self.recipe.strategy.sequential else dense


class Placement:
    """Where the model's parts are while it is compressed: all of it on `device`, or (offload) all
    but the blocks, each block moved there only while it is compressed."""

    def __init__(self, model: nn.Module, adapter: Adapter, device: torch.device, offload: bool) -> None:
        self.model, self.device, self.offload = model, device, offload
        self.home = model_device(model)
        if not offload:
            model.to(device)
            return
        inside = {id(t) for b in adapter.blocks() for t in itertools.chain(b.parameters(), b.buffers())}
        self._move_outside(inside, device)

    def _move_outside(self, inside: set[int], device: torch.device) -> None:
        with torch.no_grad():
            for m in self.model.modules():
                for p in m._parameters.values():
                    if p is not None and id(p) not in inside:
                        p.data = p.data.to(device)  # in place: tied weights stay tied
                for name, b in m._buffers.items():
                    if b is not None and id(b) not in inside:
                        m._buffers[name] = b.to(device)

    @contextlib.contextmanager
    def block(self, block: nn.Module):
        if not self.offload:
            yield
            return
        block.to(self.device)
        try:
            yield
        finally:
            block.to(self.home)

    def restore(self) -> None:
        """Everything back where the caller had it."""
        self.model.to(self.home)


def _auto_offload(model: nn.Module, device: torch.device) -> bool:
    """Offload when the model (with room for activations and fits) would not fit the GPU's free memory."""
    if device.type != "cuda":
        return False
    weights = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
    return 1.5 * weights > torch.cuda.mem_get_info(device)[0]


def _check_offload(recipe: Recipe) -> None:
    if any(getattr(cfg, "objective", "local") == "task" for cfg in recipe.stages.values()) or (
            recipe.strategy.threshold is not None and recipe.strategy.metric == "perplexity") or recipe.overall or \
            any("model" in METHODS[k].scopes for k in recipe.stages):
        raise DataError(f"recipe '{recipe.name}' fits the model's own loss, checks its perplexity or measures its "
                        "sensitivity (overall) or removes blocks (depth), which needs every block on the device at "
                        "once; run it without offload")


def check_recipe_for(config, recipe: Recipe) -> None:
    """The paper's methods and the allocation need a table entry's roles; the baselines do not
    (one line naming what is missing, before any work)."""
    hidden = getattr(config, "hidden_size", None)
    if recipe.head is not None and recipe.head.kind == "low-rank" and hidden and recipe.head.rank >= hidden:
        raise ModelError(f"recipe '{recipe.name}': head rank {recipe.head.rank} is not below the hidden size "
                         f"{hidden}; a low-rank head needs a smaller rank")
    why = paper_methods_unsupported(config)
    if why is None:
        return
    paper = [k for k in recipe.stages if "block" not in METHODS[k].scopes]
    if paper or recipe.overall is not None:
        what = ", ".join(paper) if paper else "overall (the allocation)"
        raise ModelError(f"recipe '{recipe.name}' needs {what}: {why}; the baselines (magnitude, wanda, "
                         "sparsegpt) run on any causal LM")


def compress(model: nn.Module, tokenizer, recipe: Recipe, *, seed: int = 0, calib: Calibration | None = None,
             task_objective: Objective | None = None, progress: bool = True, device: str | torch.device = "cpu",
             offload: bool | None = None, compute_dtype: str = "auto") -> CompressionResult:
    """Compress `model` in place with `recipe`; returns the model, its adapter and a report.

    `calib` defaults to seeded windows of the recipe's calibration text; `task_objective` replaces
    the language-modelling loss for stages with ``objective: task`` (e.g. a classification loss).
    The work runs on `device` in `compute_dtype` (``auto``: bfloat16 on a GPU); ``offload`` keeps
    only the current block there (``None``: when the model would not fit). The model is returned
    to the device it came from.
    """
    dev = resolve_device(device)
    dtype = resolve_compute_dtype(compute_dtype, dev)
    offload = _auto_offload(model, dev) if offload is None else offload
    if offload:
        _check_offload(recipe)
    torch.manual_seed(seed)
    model.eval()
    check_recipe_for(model.config, recipe)
    adapter = get_adapter(model)
    if calib is None:
        c = recipe.calibration
        if tokenizer is None:
            raise DataError(f"the model has no tokenizer files; its calibration windows of {c.text} text need one")
        check_positions(model, c.seqlen, "calibration window length (calib-seqlen)")
        calib = calibration(tokenizer, c.text, c.samples, c.seqlen, c.eval_samples, seed)
    total = unique_parameters(model)
    before = group_counts(adapter)
    start = time.perf_counter()
    added = untie_head(model) if recipe.head is not None and recipe.head.kind == "untie" else 0
    planned, whole = _whole_model_stages(model, adapter, recipe, calib, total, dev, dtype, progress)
    if whole:
        adapter = get_adapter(model)  # the block list changed
        whole["other_params_removed"] = (total - unique_parameters(model)) - sum(
            before[g] - n for g, n in group_counts(adapter).items())  # norms of removed blocks
    n = calib.ids.shape[0]  # chunks of 8 windows (`_chunked`, `collect_stats`), then the rest
    adapter.prepare_calls(calib.ids.shape[1], {min(n, 8), n % 8 or min(n, 8)})  # before the model is spread
    placement = Placement(model, adapter, dev, offload)
    calib = Calibration(calib.ids.to(dev), calib.eval_ids.to(dev), calib.source)
    log.info("compressing %d blocks with recipe '%s' (%s) on %s (%s%s)", len(adapter.blocks()), recipe.name,
             ", ".join(recipe.stages), dev, str(dtype).removeprefix("torch."), ", offload" if offload else "")
    try:
        with autocast(dev, dtype):
            run = _Run(adapter, recipe, calib, seed, task_objective, progress, placement)
            run.plan = planned
            if recipe.overall is not None and planned.structure is None:
                pruning = next((k for k in recipe.stages if k in PRUNING_STAGES), None)
                run.plan.allocation, allocation = plan(
                    adapter, recipe.overall, calib.ids, calib.eval_ids, embedding="fpp_emb" in recipe.stages,
                    blocks=pruning is not None, stage=pruning,
                    stage_cfg=recipe.stages.get(pruning) if pruning else None, progress=progress)
            owl = next((c for k, c in recipe.stages.items() if k in PRUNING_STAGES and c.owl is not None), None)
            if owl is not None:  # OWL's block sparsities, from the dense model (the schema excludes `overall`)
                run.plan.allocation, owl_report = owl_rates(adapter, calib.ids, owl.sparsity, owl.owl.m,
                                                                 owl.owl.lam)
            run.compress_embeddings()
            run.compress_blocks()
    finally:
        placement.restore()
    adapter.sync_config()  # one width / head count for every block: the config says so (a standard model)
    if recipe.head is not None and recipe.head.kind == "low-rank":
        added = low_rank_head(model, recipe.head.rank, head_gram(model, calib.ids.to(model_device(model))))
    report = accounting(before, group_counts(adapter), total, added, whole.get("other_params_removed", 0))
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
        "device": {"device": str(dev), "compute_dtype": str(dtype).removeprefix("torch."), "offload": offload},
        **({"allocation": allocation} if recipe.overall is not None and planned.structure is None else {}),
        **({"structure": whole} if whole else {}),
        **({"owl": owl_report} if owl is not None else {}),
    })
    return CompressionResult(model, adapter, report)


def _whole_model_stages(model: nn.Module, adapter: Adapter, recipe: Recipe, calib: Calibration, total: int,
                        dev: torch.device, dtype: torch.dtype, progress: bool) -> tuple[Plan, dict]:
    """The structured allocation (an overall section over structured stages) and the stages that change
    the model as a whole (depth), before the per-block work; returns (the run's plan, report)."""
    kinds = {k for k in recipe.stages if k in STRUCTURED}
    keys = [k for k in recipe.stages if "model" in METHODS[k].scopes]
    plan_it = recipe.overall is not None and bool(kinds)
    planned, report = Plan(), {}
    if not keys and not plan_it:
        return planned, report
    model.to(dev)
    held = calib.eval_ids.to(dev)
    with autocast(dev, dtype):
        if plan_it:
            try:
                compensate = frozenset(k for k in kinds if getattr(recipe.stages[k], "compensate", False)) \
                    if recipe.overall.structure == "compensated" else frozenset()
                planned.structure, report["plan"] = plan_structure(adapter, recipe.overall, calib.ids.to(dev), held,
                                                                     kinds, total, progress, compensate)
                # the dense model's skip losses, measured for the plan: the depth stage's first ranking
                planned.skip_losses = report["plan"].get("skip_one_block_loss")
            except ValueError as exc:
                raise DataError(f"recipe '{recipe.name}': {exc}") from None
        for key in keys:
            report[key] = METHODS[key].stage(recipe.stages[key], adapter, held, planned, progress).run()
    return planned, report


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values) if values else float("nan")
