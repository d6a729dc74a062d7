"""Allocation across the structured stages: how many blocks, heads and feed-forward neurons to remove
so that the model loses exactly the asked share of its parameters with the least held-out loss.

The result is always one width per kind for every block (one depth, one head count, one feed-forward
width), which a standard config expresses. Importance is measured once on the dense model: the
held-out loss of skipping each block, each head's and each neuron's squared contribution to its
sublayer's output on the calibration windows (the same scores the stages use). Each candidate
(blocks removed ``d`` x query heads per group removed ``r``) gets the feed-forward width that meets
the target exactly (to one neuron per block), is applied reversibly (blocks skipped, the removed
heads' and neurons' inputs to the output projections zeroed) and scored by the held-out loss; the
least loss wins, and the stages then run at those rates (with their own iterative schedules).

Where a stage compensates at removal (``compensate``, methods/compensate.py), its candidates are scored
compensated too: the removed inputs are replaced by their least-squares prediction from the kept ones
(the dense model's Gram matrix of each output projection's input), which is what re-fitting the kept
rows does. Each unit is then scored where it will be removed: a width that compensation recovers well
costs less than a block that nothing recovers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from smartprune.adapters import Adapter
from smartprune.methods.compensate import predictor
from smartprune.methods.depth import held_out_loss, skip_losses
from smartprune.modules.masked import forward_pre_hooks, run_in_chunks
from smartprune.recipes.schema import OverallConfig

log = logging.getLogger(__name__)


@dataclass
class Sizes:
    """Parameter counts of one removable unit of each kind."""

    block: int  # a whole block (its linears, norms, biases)
    neuron: int  # one feed-forward neuron (its column in each input projection, its row in the output one)
    width: int  # feed-forward neurons per block
    head_unit: int  # one query head per group removed in every group (q columns + o rows of kv heads)
    group: int  # query heads per key/value group
    heads: int
    head_dim: int


def sizes_of(adapter: Adapter) -> Sizes:
    model = adapter.model
    block = sum(p.numel() for p in adapter.blocks()[0].parameters())
    ff = [model.get_submodule(p) for p in adapter.ff_paths(0).values()]
    *inputs, down = ff
    width = down.weight.shape[0]
    neuron = sum(m.weight.shape[0] + (1 if m.bias is not None else 0) for m in inputs) + down.weight.shape[1]
    heads, kv, hd = adapter.head_counts(0)
    q = model.get_submodule(adapter.attention_paths(0)["q"])
    d = q.weight.shape[0]
    head_unit = kv * (2 * d * hd + (hd if q.bias is not None else 0))
    return Sizes(block, neuron, width, head_unit, heads // kv, heads, hd)


@dataclass
class Scores:
    blocks: dict[int, float]  # held-out loss with the block skipped
    neurons: list[Tensor]  # per block
    heads: list[Tensor]  # per block, one per query head
    # per block, the Gram matrix of the output projection's input, where that stage compensates
    grams: dict[str, list[Tensor]] | None = None  # "ff_neurons": down projections, "attn_heads": o projections


def measure(adapter: Adapter, ids: Tensor, held_out: Tensor, sizes: Sizes, blocks: bool = True,
            compensate: frozenset[str] = frozenset()) -> Scores:
    """The dense model's importance scores (see the module docstring); the blocks' skip losses only
    when `blocks` (one held-out evaluation per block); the Gram matrices of the stages in `compensate`."""
    model, n = adapter.model, len(adapter.blocks())
    downs = [model.get_submodule(list(adapter.ff_paths(i).values())[-1]) for i in range(n)]
    outs = [model.get_submodule(adapter.attention_paths(i)["o"]) for i in range(n)]
    energy = [torch.zeros(sizes.width, dtype=torch.float64) for _ in range(n)]
    heads = [torch.zeros(sizes.heads, dtype=torch.float64) for _ in range(n)]

    grams = {kind: [torch.zeros(d, d, dtype=torch.float64) for _ in range(n)]
             for kind, d in (("ff_neurons", sizes.width), ("attn_heads", sizes.heads * sizes.head_dim))
             if kind in compensate}

    def neuron_hook(i: int):
        def hook(_m, args) -> None:
            x = args[0].detach().double().reshape(-1, sizes.width)
            energy[i] += x.pow(2).sum(0).cpu()
            if "ff_neurons" in grams:
                grams["ff_neurons"][i] += (x.T @ x).cpu()
        return hook

    def head_hook(i: int):
        w = outs[i].weight.detach().double().reshape(sizes.heads, sizes.head_dim, -1)

        def hook(_m, args) -> None:
            x = args[0].detach().double().reshape(-1, sizes.heads, sizes.head_dim)
            heads[i] += torch.einsum("thd,hde->the", x, w.to(x.device)).pow(2).sum((0, 2)).cpu()
            if "attn_heads" in grams:
                flat = x.reshape(x.shape[0], -1)
                grams["attn_heads"][i] += (flat.T @ flat).cpu()
        return hook

    hooks = [(downs[i], neuron_hook(i)) for i in range(n)] + [(outs[i], head_hook(i)) for i in range(n)]
    with torch.no_grad(), forward_pre_hooks(hooks):
        run_in_chunks(lambda x: model(input_ids=x, use_cache=False).logits[:, :1], ids)
    neurons = [e * downs[i].weight.detach().double().pow(2).sum(1).cpu() for i, e in enumerate(energy)]
    skips = skip_losses(adapter, held_out, set(), list(range(n))) if blocks else dict.fromkeys(range(n), 0.0)
    return Scores(skips, neurons, heads, grams)


def _lowest_per_group(scores: Tensor, group: int, r: int) -> Tensor:
    """Alive mask over query heads with the `r` lowest of each group removed."""
    alive = torch.ones_like(scores, dtype=torch.bool)
    per = scores.reshape(-1, group)
    for g in range(per.shape[0]):
        alive[g * group + per[g].argsort()[:r]] = False
    return alive


def _masked_loss(adapter: Adapter, held_out: Tensor, scores: Scores, sizes: Sizes, drop: set[int], r: int,
                 neurons: int) -> float:
    """Held-out loss with `drop` skipped, `r` heads per group and `neurons` per block zeroed."""
    model, hooks = adapter.model, []
    for i in range(len(adapter.blocks())):
        if i in drop:
            continue
        if neurons:
            keep = torch.ones(sizes.width)
            keep[scores.neurons[i].argsort()[:neurons]] = 0
            hooks.append((model.get_submodule(list(adapter.ff_paths(i).values())[-1]),
                          _removal(keep, scores, "ff_neurons", i)))
        if r:
            keep = _lowest_per_group(scores.heads[i], sizes.group, r).float().repeat_interleave(sizes.head_dim)
            o = model.get_submodule(adapter.attention_paths(i)["o"])
            hooks.append((o, _removal(keep, scores, "attn_heads", i)))
    with forward_pre_hooks(hooks), adapter.without_blocks(drop):
        return held_out_loss(model, held_out)


def _removal(keep: Tensor, scores: Scores, kind: str, i: int):
    """A pre-hook removing the inputs `keep` marks 0: zeroed, or, where `kind` compensates, replaced by
    their least-squares prediction from the kept inputs (see the module docstring)."""
    if scores.grams is None or kind not in scores.grams:
        return _scale(keep)
    k, r = keep.bool(), ~keep.bool()
    b = predictor(scores.grams[kind][i], k, r)

    def hook(_m, args):
        x = args[0].clone()
        x[..., r.to(x.device)] = x[..., k.to(x.device)] @ b.to(x.device, x.dtype)
        return (x, *args[1:])
    return hook


def _scale(keep: Tensor):
    def hook(_m, args):
        return (args[0] * keep.to(args[0].device, args[0].dtype), *args[1:])
    return hook


def plan_structure(adapter: Adapter, overall: OverallConfig, ids: Tensor, held_out: Tensor, kinds: set[str],
                   total: int, progress: bool = True, compensate: frozenset[str] = frozenset()
                   ) -> tuple[dict[str, float], dict]:
    """Rates for the structured stages in `kinds` (``depth``, ``attn_heads``, ``ff_neurons``) that remove
    ``overall.target`` of the `total` parameters with the least held-out loss (the stages in `compensate`
    scored compensated); and the report."""
    sizes = sizes_of(adapter)
    n = len(adapter.blocks())
    scores = measure(adapter, ids, held_out, sizes, blocks="depth" in kinds, compensate=compensate & kinds)
    ranked = sorted(scores.blocks, key=scores.blocks.get)
    want = overall.target * total
    depths = range(int(overall.max_rate * n) + 1) if "depth" in kinds else [0]
    head_options = range(sizes.group) if "attn_heads" in kinds and sizes.group > 1 else [0]
    candidates = []
    for d in depths:
        for r in head_options:
            rest = want - d * sizes.block - (n - d) * r * sizes.head_unit
            neurons = round(rest / (sizes.neuron * (n - d))) if "ff_neurons" in kinds else 0
            if neurons < 0 or neurons > overall.max_rate * sizes.width:
                continue
            removed = d * sizes.block + (n - d) * (r * sizes.head_unit + neurons * sizes.neuron)
            if "ff_neurons" not in kinds and abs(removed - want) > max(0.01 * total, sizes.block / 2):
                continue  # without a width to absorb the rest, only the nearest combinations count
            candidates.append((d, r, neurons, removed))
    if not candidates:
        raise ValueError(f"overall.target: no combination of {', '.join(sorted(kinds))} up to max_rate "
                         f"{overall.max_rate} removes {overall.target:.1%} of the parameters")
    rows = []
    for d, r, neurons, removed in tqdm(candidates, desc="structure plan", leave=False, disable=not progress):
        loss = _masked_loss(adapter, held_out, scores, sizes, set(ranked[:d]), r, neurons)
        rows.append({"blocks_removed": d, "heads_removed_per_group": r, "neurons_removed_per_block": neurons,
                     "compression": removed / total, "held_out_loss": loss})
    best = min(rows, key=lambda row: row["held_out_loss"])
    log.info("structure plan: %d blocks, %d heads per group, %d neurons per block (held-out loss %.3f, %.2f%%)",
             best["blocks_removed"], best["heads_removed_per_group"], best["neurons_removed_per_block"],
             best["held_out_loss"], 100 * best["compression"])
    rates = {"depth": best["blocks_removed"] / n, "attn_heads": best["heads_removed_per_group"] / sizes.group,
             "ff_neurons": best["neurons_removed_per_block"] / sizes.width}
    report = {"target": overall.target, "chosen": best, "candidates": rows, "compensated": sorted(compensate & kinds),
              "dense_held_out_loss": held_out_loss(adapter.model, held_out),
              **({"skip_one_block_loss": scores.blocks} if "depth" in kinds else {})}
    return {k: v for k, v in rates.items() if k in kinds}, report
