"""Allocation: how much each group of each layer gives up, chosen from measured sensitivity so that
the whole model reaches an exact overall compression with the least damage.

Units: the embedding table(s), and in every block its Q and K projections together, V, O, and the
feed-forward matrices together (the paper's groups). For each unit and each rate of a grid, the
unit alone is pruned (``sensitivity: wanda``: lowest ``|W_ij| * ||X_i||``, no weight update;
``sensitivity: stage``: by the stage that will prune it, so SparseGPT's reconstruction of the
surviving weights is in the measurement; the embedding by its own criterion) and the model's
next-token loss on the held-out calibration windows is measured, then the unit is restored.
With ``sensitivity: joint`` the units are measured together instead: every unit is first pruned by the
stage at the mean rate the target needs, then each unit alone is moved to mean +- k * spread / points
with all the others kept there, and the damage is the divergence (KL) of the model's next-token
distribution from the dense model's on the held-out windows -- so a unit's cost is measured where it will
be pruned, beside the others' damage, and from every token's whole distribution rather than the one
observed token (single-unit loss increases at low rates are mostly noise on a small model).
Each unit's loss-increase curve is replaced by its lower convex hull, and removed parameters are
handed out segment by segment in order of the lowest loss increase per parameter (optimal for convex
curves: the non-uniform, layer-wise allocation OWL motivates, here measured rather than inferred from
outliers). The last segment is cut so the total is exact.

The chosen rate of every matrix goes to the stages through ``Plan.allocation``.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from smartprune.adapters import Adapter
from smartprune.device import retained_heap
from smartprune.errors import RecipeError
from smartprune.methods.criteria import wanda_score
from smartprune.methods.fpp import criterion_score, lookup_counts
from smartprune.modules.masked import forward_pre_hooks, run_in_chunks
from smartprune.recipes.schema import OverallConfig

log = logging.getLogger(__name__)


@dataclass
class Unit:
    """A group of matrices that share one rate (paths into the model)."""

    name: str  # "embedding" or "block 3 qk" / "v" / "o" / "ff"
    paths: list[str]
    size: int  # entries of all its matrices
    block: int | None = None  # None: before the first block (the embedding)


def units(adapter: Adapter, embedding: bool, blocks: bool) -> list[Unit]:
    model = adapter.model

    def unit(name: str, paths: list[str], block: int | None = None) -> Unit:
        return Unit(name, paths, sum(model.get_submodule(p).weight.numel() for p in paths), block)

    out = [unit("embedding", adapter.embedding_paths())] if embedding else []
    if blocks:
        for i in range(len(adapter.blocks())):
            att, ff = adapter.attention_paths(i), adapter.ff_paths(i)
            out += [unit(f"block {i} qk", [att["q"], att["k"]], i), unit(f"block {i} v", [att["v"]], i),
                    unit(f"block {i} o", [att["o"]], i), unit(f"block {i} ff", list(ff.values()), i)]
    return out


def input_norms(model: nn.Module, ids: Tensor, paths: list[str]) -> dict[str, Tensor]:
    """``||X_i||`` of every input feature of each projection over the calibration windows."""
    return _input_stats(model, ids, paths, gram=False)


def _input_stats(model: nn.Module, ids: Tensor, paths: list[str], gram: bool) -> dict[str, Tensor]:
    """Per projection, over the calibration windows: ``||X_i||`` of every input feature, or with `gram`
    the Gram matrix ``X^T X`` (float64) SparseGPT's update needs."""
    sums = {p: None for p in paths}

    def hook(path: str):
        def add(_module, args) -> None:
            x = args[0].detach().double()
            x = x.reshape(-1, x.shape[-1])
            s = x.T @ x if gram else x.pow(2).sum(0)
            sums[path] = s if sums[path] is None else sums[path] + s
        return add

    with forward_pre_hooks((model.get_submodule(p), hook(p)) for p in paths):
        run_in_chunks(model, ids)
    return sums if gram else {p: v.sqrt() for p, v in sums.items()}


class Pruner:
    """How a block matrix is pruned while its unit's sensitivity is measured: called as
    ``prune(path, w, rate)`` it prunes `w` (d_in x d_out) in place; `at_rates` gives the versions at
    several rates from the same weights (one sweep where the method allows)."""

    def __init__(self, one: Callable[[str, Tensor, float], None]) -> None:
        self.one = one

    def __call__(self, path: str, w: Tensor, rate: float) -> None:
        self.one(path, w, rate)

    def at_rates(self, path: str, w: Tensor, rates: list[float]) -> list[Tensor]:
        out = []
        for rate in rates:
            v = w.detach().clone()
            self.one(path, v, rate)
            out.append(v)
        return out


class _SparseGPTPruner(Pruner):
    """OBS with the weight update; all the rates of a matrix in one sweep (`sparsegpt_at_rates`)."""

    def __init__(self, grams: dict[str, Tensor], blocksize: int, damp: float) -> None:
        from smartprune.methods.sparsegpt import sparsegpt_at_rates

        def one(path: str, w: Tensor, rate: float) -> None:
            w.copy_(self.at_rates(path, w, [rate])[0])

        super().__init__(one)
        self.grams, self.blocksize, self.damp, self._sweep = grams, blocksize, damp, sparsegpt_at_rates

    def at_rates(self, path: str, w: Tensor, rates: list[float]) -> list[Tensor]:
        new = self._sweep(w.detach().T, self.grams[path].to(w.device), rates, self.blocksize, self.damp)
        return [v.T.contiguous() for v in new]


def block_pruner(model: nn.Module, paths: list[str], ids: Tensor, how: str, stage_cfg=None) -> Pruner:
    """The `Pruner` of `how`: ``wanda`` (``|W_ij| * ||X_i||``), ``magnitude`` or ``sparsegpt`` (OBS with the
    weight update, the stage's blocksize and dampening)."""
    if how == "magnitude":
        return Pruner(lambda path, w, rate: _prune_lowest(w, w.detach().abs(), rate))
    if how == "sparsegpt":
        grams = _input_stats(model, ids, paths, gram=True)
        blocksize, damp = (stage_cfg.blocksize, stage_cfg.damp) if stage_cfg is not None else (128, 0.01)
        return _SparseGPTPruner(grams, blocksize, damp)
    norms = input_norms(model, ids, paths)
    return Pruner(lambda path, w, rate: _prune_lowest(w, wanda_score(w, norms[path]), rate))


class Divergence:
    """KL(p || softmax z) per position, averaged, against the distributions `p` of reference `logits`
    (rows: positions), as ``sum p log p - sum p z + logsumexp z`` per row (sum p = 1): per measurement no
    vocabulary-sized log-softmax or divergence tensor, only an elementwise product and per-row sums.

    Precision matters: the differences measured are 1e-4 nats or less. `p` is normalized in float64, then
    kept in float32 (its rows summed to 1 +- 2e-5 from a float32 softmax, and each row's sum multiplies a
    logsumexp of about 20 nats); the products are summed pairwise (a float32 dot product (bmm) of 50k
    terms of mixed sign drifted by up to 1e-2 per row)."""

    def __init__(self, logits: Tensor) -> None:
        p = F.softmax(logits.double(), dim=-1)
        self.neg_entropy = float(torch.special.xlogy(p, p).sum())  # sum p log p
        self.p = p.float()

    def __call__(self, z: Tensor) -> float:
        cross = (self.p * z).sum(-1).double()
        lse = torch.logsumexp(z, dim=-1).double()
        return (self.neg_entropy - float(cross.sum()) + float(lse.sum())) / z.shape[0]


class HeldOutLoss:
    """The next-token loss on held-out windows, recomputed from a unit's block on: the blocks before
    it are unchanged while it is pruned, so their outputs are computed once (about half the work).
    With `divergence`, the loss is instead KL(dense || model) per token against the model as it is now
    (the dense one), whose next-token distributions are kept; `refresh` recomputes the blocks' inputs
    after the model changed."""

    def __init__(self, adapter: Adapter, ids: Tensor, divergence: bool = False) -> None:
        self.adapter, self.ids = adapter, ids
        self.divergence = Divergence(self._from(None)) if divergence else None
        self.refresh()

    def refresh(self) -> None:
        self.inputs = []
        with torch.no_grad():
            h = self.adapter.embed(self.ids)
            for i in range(len(self.adapter.blocks())):
                self.inputs.append(h)
                h = self.adapter.run_block(i, h)

    def _from(self, block: int | None) -> Tensor:
        """The logits of all but the last position, run from `block` on, one row per position."""
        a = self.adapter
        with torch.no_grad():
            h = a.embed(self.ids) if block is None else self.inputs[block]
            for i in range(block or 0, len(a.blocks())):
                h = a.run_block(i, h)
            return self._logits(h)

    def _logits(self, h: Tensor) -> Tensor:
        logits = self.adapter.head(h[:, :-1]).float()
        return logits.reshape(-1, logits.shape[-1])

    def __call__(self, block: int | None = None) -> float:
        return self._score(self._from(block))

    def after(self, block: int, outputs: list[Tensor]) -> list[float]:
        """The loss of each of `outputs` (block `block`'s output under one version of its weights), run
        through the blocks after it as one batch (larger products run faster than several small ones)."""
        a = self.adapter
        with torch.no_grad():
            h = torch.cat(outputs)
            for i in range(block + 1, len(a.blocks())):
                h = a.run_block(i, h)
            return [self._score(self._logits(part)) for part in h.split(self.ids.shape[0])]

    def _score(self, z: Tensor) -> float:
        if self.divergence is None:
            return float(F.cross_entropy(z, self.ids[:, 1:].reshape(-1)))
        return self.divergence(z)


def _prune_lowest(weight: Tensor, score: Tensor, rate: float) -> None:
    k = round(rate * weight.numel())
    if k:
        keep = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
        keep[torch.topk(score.flatten(), k, largest=False).indices] = False
        weight.mul_(keep.view_as(weight))  # the weight may be a transposed view: no flat view of it


def embedding_scores(adapter: Adapter, modules: list[nn.Module], calib_ids: Tensor, criterion: str) -> list[Tensor]:
    """How the embedding table(s) are ranked while measured: by their FPP criterion (no input
    activations), magnitude where the criterion gives none."""
    counts = lookup_counts(adapter.embed, calib_ids, modules)
    found = [criterion_score(m.weight, criterion, c) for m, c in zip(modules, counts, strict=True)]
    return [m.weight.detach().abs() if s is None else s for m, s in zip(modules, found, strict=True)]


def sensitivity(adapter: Adapter, all_units: list[Unit], calib_ids: Tensor, eval_ids: Tensor,
                grid: tuple[float, ...], emb_criterion: str, progress: bool = True,
                prune: Pruner | None = None) -> dict[str, list[float]]:
    """Loss increase (nats per token) of pruning each unit alone at each rate of `grid` (block matrices
    by `prune`; default Wanda's score, no update)."""
    model = adapter.model
    if prune is None:
        prune = block_pruner(model, [p for u in all_units if u.block is not None for p in u.paths], calib_ids, "wanda")
    loss = HeldOutLoss(adapter, eval_ids)
    base = loss()
    out = {}
    for u in tqdm(all_units, desc="sensitivity", disable=not progress, leave=False):
        modules = [model.get_submodule(p) for p in u.paths]
        weights = [m.weight for m in modules]
        saved = [w.detach().clone() for w in weights]
        scores = None
        if u.block is None:
            scores = embedding_scores(adapter, modules, calib_ids, emb_criterion)
        curve = []
        with torch.no_grad():
            for rate in grid:
                for i, (p, w) in enumerate(zip(u.paths, weights, strict=True)):
                    if scores is None:
                        prune(p, w, rate)
                    else:
                        _prune_lowest(w, scores[i], rate)
                curve.append(max(0.0, loss(u.block) - base))
                for w, keep in zip(weights, saved, strict=True):
                    w.copy_(keep)
        out[u.name] = curve
    return out


def joint_sensitivity(adapter: Adapter, all_units: list[Unit], calib_ids: Tensor, eval_ids: Tensor,
                      rates: tuple[float, ...], base: int, emb_criterion: str, prune: Pruner,
                      progress: bool = True) -> dict[str, list[float]]:
    """Divergence from the dense model (nats per token) of each unit at each of `rates` while every other
    unit is pruned at ``rates[base]`` (the mean rate), minus the divergence with all at the mean rate: the
    cost of moving one unit away from a uniform allocation. Block matrices are pruned by `prune` from
    their dense weights (a unit's rates in one sweep, `Pruner.at_rates`), the embedding by its FPP criterion."""
    model = adapter.model
    loss = HeldOutLoss(adapter, eval_ids, divergence=True)  # the dense reference, before anything is pruned
    dense = {p: model.get_submodule(p).weight.detach().clone() for u in all_units for p in u.paths}
    emb_scores = {}
    for u in all_units:
        if u.block is None:
            modules = [model.get_submodule(p) for p in u.paths]
            emb_scores.update(zip(u.paths, embedding_scores(adapter, modules, calib_ids, emb_criterion), strict=True))

    def versions(u: Unit, at: list[float]) -> dict[str, list[Tensor]]:
        """Each matrix of `u` pruned from its dense weights at each rate of `at`."""
        out = {}
        for p in u.paths:
            if u.block is not None:
                out[p] = prune.at_rates(p, dense[p], at)
                continue
            out[p] = []
            for rate in at:
                w = dense[p].clone()
                _prune_lowest(w, emb_scores[p], rate)
                out[p].append(w)
        return out

    def put(u: Unit, chosen: dict[str, list[Tensor]], i: int) -> None:
        for p in u.paths:
            model.get_submodule(p).weight.copy_(chosen[p][i])

    mean, moves = rates[base], [r for i, r in enumerate(rates) if i != base]
    with torch.no_grad():
        at_mean = {}
        for u in tqdm(all_units, desc="joint sensitivity: all at the mean", disable=not progress, leave=False):
            at_mean[u.name] = versions(u, [mean])
            put(u, at_mean[u.name], 0)
        loss.refresh()  # the blocks' inputs with every unit at the mean rate
        base_loss = loss()
        out = {}
        for u in tqdm(all_units, desc="joint sensitivity", disable=not progress, leave=False):
            moved = versions(u, moves)  # one unit's versions at a time: memory stays one model's worth
            if u.block is None:  # the embedding: every block's input moves
                curve = []
                for i in range(len(moves)):
                    put(u, moved, i)
                    curve.append(loss() - base_loss)
            else:  # the unit's block on each version, the blocks after it once for all
                outputs = []
                for i in range(len(moves)):
                    put(u, moved, i)
                    outputs.append(adapter.run_block(u.block, loss.inputs[u.block]))
                curve = [v - base_loss for v in loss.after(u.block, outputs)]
            curve.insert(base, 0.0)
            put(u, at_mean[u.name], 0)
            out[u.name] = curve
        for p, w in dense.items():  # the dense model back: the stages prune it for real
            model.get_submodule(p).weight.copy_(w)
    return out


def _hull(grid: tuple[float, ...], curve: list[float], origin: bool = True) -> list[tuple[float, float]]:
    """The lower convex hull of (0, 0) (the unit unpruned; without `origin`, the curve starts at the
    grid's first rate) and the measured points (rate, loss increase), made non-decreasing first (more
    pruning never helps)."""
    points, best = ([(0.0, 0.0)], 0.0) if origin else ([], -math.inf)
    for r, v in zip(grid, curve, strict=True):
        best = max(best, v)
        points.append((r, best))
    hull: list[tuple[float, float]] = []
    for p in points:
        while len(hull) >= 2 and (hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0]) >= \
                (p[1] - hull[-2][1]) * (hull[-1][0] - hull[-2][0]):
            hull.pop()
        hull.append(p)
    return hull


def allocate(all_units: list[Unit], curves: dict[str, list[float]], grid: tuple[float, ...],
             remove: int, spread: float | None = None, origin: bool = True) -> dict[str, int]:
    """Entries to remove per unit, `remove` in all, by increasing loss per removed entry; with `spread`,
    every unit's rate stays within it of the mean rate ``remove / entries`` (OWL's bounded spread).
    Without `origin` the curves start at ``grid[0]`` (no implied unpruned point; `joint_sensitivity`)."""
    capacity = sum(round(grid[-1] * u.size) for u in all_units)
    if remove > capacity:
        raise RecipeError(f"overall.target asks to remove {remove:,} entries, more than the {capacity:,} the "
                          f"allocatable matrices hold at the grid's highest rate {grid[-1]}")
    mean = remove / sum(u.size for u in all_units)
    lo, hi = (0.0, grid[-1]) if spread is None else (max(0.0, mean - spread), min(grid[-1], mean + spread))
    # each unit's bounds in entries: floors rounded down and caps up, so the floors never pass `remove`
    # and the caps always reach it
    bounds = {u.name: (math.floor(lo * u.size), min(round(grid[-1] * u.size), math.ceil(hi * u.size)))
              for u in all_units}
    counts = {name: floor for name, (floor, _) in bounds.items()}  # every unit's floor first
    segments = []
    for u in all_units:
        floor, cap = bounds[u.name]
        hull = _hull(grid, curves[u.name], origin)
        for (r0, v0), (r1, v1) in itertools.pairwise(hull):  # the hull cut to the bounds, slopes unchanged
            a, b = round(r0 * u.size), round(r1 * u.size)
            if min(b, cap) > max(a, floor):
                segments.append(((v1 - v0) / (b - a), u.name, min(b, cap) - max(a, floor)))
    segments.sort(key=lambda s: s[0])  # a unit's hull segments have rising slopes, so they stay in order
    left = remove - sum(counts.values())
    for _, name, entries in segments:
        take = min(entries, left)
        counts[name] += take
        left -= take
        if left == 0:
            break
    return counts


def matrix_rates(all_units: list[Unit], counts: dict[str, int], model: nn.Module) -> dict[str, float]:
    """Each matrix's rate: its unit's count spread over its matrices by size, exactly (the last
    matrix takes the rounding remainder), as count / size so ``round(rate * size)`` gives it back."""
    rates = {}
    for u in all_units:
        left = counts[u.name]
        for i, p in enumerate(u.paths):
            n = model.get_submodule(p).weight.numel()
            c = left if i == len(u.paths) - 1 else min(left, round(counts[u.name] * n / u.size))
            rates[p] = c / n
            left -= c
    return rates


def joint_grid(mean: float, cfg: OverallConfig) -> tuple[tuple[float, ...], int]:
    """The rates a joint measurement visits, ``mean + spread * k / points`` for k = -points..points clipped
    to [0, max_rate] (the bounds `allocate` keeps to), and the index of the mean among them."""
    steps = [cfg.spread * k / cfg.points for k in range(1, cfg.points + 1)]
    lower = sorted({max(0.0, mean - d) for d in steps if mean > 0.0})
    upper = sorted({min(cfg.max_rate, mean + d) for d in steps if mean < cfg.max_rate})
    return (*lower, mean, *upper), len(lower)


def plan(adapter: Adapter, cfg: OverallConfig, calib_ids: Tensor, eval_ids: Tensor, *, embedding: bool, blocks: bool,
         stage: str | None = None, stage_cfg=None, progress: bool = True) -> tuple[dict[str, float], dict]:
    """The per-matrix rates reaching ``cfg.target`` overall, and the report of how they were chosen;
    `stage` (and its config) is the pruning stage that will use the block rates."""
    from smartprune.compression.accounting import unique_parameters

    model = adapter.model
    all_units = units(adapter, embedding, blocks)
    if not all_units:
        raise RecipeError("overall: no stage the allocation can give rates to (fpp_emb, or a pruning stage "
                          "on the block linears: sparsegpt, wanda, magnitude)")
    remove = round(cfg.target * unique_parameters(model))
    by_stage = cfg.sensitivity in ("stage", "joint") and stage in ("sparsegpt", "wanda", "magnitude")
    how = stage if by_stage else "wanda"
    paths = [p for u in all_units if u.block is not None for p in u.paths]
    prune = block_pruner(model, paths, calib_ids, how, stage_cfg) if paths else None
    joint = cfg.sensitivity == "joint"
    with retained_heap():  # thousands of same-sized large tensors: no fresh pages from the kernel for each
        if joint:
            grid, base = joint_grid(remove / sum(u.size for u in all_units), cfg)
            curves = joint_sensitivity(adapter, all_units, calib_ids, eval_ids, grid, base, cfg.emb_criterion,
                                       prune, progress)
        else:
            grid = cfg.grid()
            curves = sensitivity(adapter, all_units, calib_ids, eval_ids, grid, cfg.emb_criterion, progress, prune)
    counts = allocate(all_units, curves, grid, remove, cfg.spread, origin=not joint)
    rates = matrix_rates(all_units, counts, model)
    report = {"target": cfg.target, "removed": sum(counts.values()), "grid": list(grid),
              "sensitivity": f"joint ({how})" if joint else how, "spread": cfg.spread,
              "units": [{"unit": u.name, "entries": u.size, "rate": counts[u.name] / u.size,
                         "loss_increase": curves[u.name]} for u in all_units]}
    log.info("allocation: %s of %d units pruned, rates %.2f-%.2f", sum(1 for c in counts.values() if c),
             len(all_units), min(r for r in rates.values()), max(r for r in rates.values()))
    if any(math.isnan(v) for c in curves.values() for v in c):
        raise RecipeError("overall: the calibration loss is not finite; the model or its calibration is broken")
    return rates, report


def allocation_table(report: dict) -> str:
    """The chosen rates as Markdown: the embedding's, then one row per block and the entry-weighted
    mean of each group over the blocks."""
    units = {u["unit"]: u for u in report["units"]}
    groups = ("qk", "v", "o", "ff")
    blocks = sorted({int(n.split()[1]) for n in units if n.startswith("block ")})
    lines = [f"allocation for {100 * report['target']:.2f}% overall (rates chosen by measured sensitivity)", ""]
    if "embedding" in units:
        lines += [f"embedding: {100 * units['embedding']['rate']:.1f}%", ""]
    if not blocks:
        return "\n".join(lines).rstrip()
    lines += ["| block | " + " | ".join(groups) + " |", "|---|" + "---:|" * len(groups)]
    for b in blocks:
        lines.append(f"| {b} | " + " | ".join(f"{100 * units[f'block {b} {g}']['rate']:.1f}%" for g in groups) + " |")
    means = []
    for g in groups:
        chosen = [units[f"block {b} {g}"] for b in blocks]
        means.append(sum(u["rate"] * u["entries"] for u in chosen) / sum(u["entries"] for u in chosen))
    lines.append("| **mean** | " + " | ".join(f"**{100 * m:.1f}%**" for m in means) + " |")
    return "\n".join(lines)
