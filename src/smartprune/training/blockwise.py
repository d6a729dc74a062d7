"""Block-wise reconstruction: each block of the compressed model fitted to the dense block's outputs.

The cheaper recovery objective (the shape of EBFT and of the paper's own local fits): the dense
model's hidden states entering block 0 are cached for `cache_windows` training windows; then, block by
block, the dense block's outputs are the target and the compressed block, fed the compressed model's
own hidden states (so each block also corrects what the blocks before it got wrong), is trained for
`block_steps` AdamW steps on batches drawn from the cache, its structure kept as in end-to-end
recovery. Where blocks were removed (stage depth), each kept block is fitted to the output of the dense
span it now stands for: itself and the removed blocks after it (`block_spans`). A step touches one
block and no output head, teacher forward or vocabulary-sized softmax, so it costs a small fraction of
an end-to-end step (on SmolLM2-135M the 49,152-token head alone is a fifth of the multiply-adds). What
it cannot see is the loss itself; end-to-end steps after it (the recovery budget) close that gap.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from smartprune.adapters import get_adapter
from smartprune.data import random_windows
from smartprune.device import autocast
from smartprune.errors import DataError
from smartprune.modules.masked import Projection
from smartprune.recipes.schema import RecoverConfig
from smartprune.training.schedule import warmup_cosine
from smartprune.training.sharding import StructureMasks

CHUNK = 8  # windows per no-grad pass when the cache is filled or carried to the next block


def check_blockwise(student: nn.Module, teacher: nn.Module, world_size: int, removed: Sequence[int] = ()) -> None:
    """One line, before any work, for what block-wise fitting cannot do (the teacher itself is required
    by the config and checked by recovery's setup)."""
    if world_size > 1:
        raise DataError("recovery objective 'blockwise' runs in one process; use --nproc 1 (or objective end_to_end)")
    check_paired(student, teacher, removed, "recovery objective 'blockwise'", "objective end_to_end")


def check_paired(student: nn.Module, teacher: nn.Module, removed: Sequence[int], what: str, instead: str) -> None:
    """One line where `what` (a setting that pairs each kept block with the dense span it stands for) cannot pair
    the student's blocks with the teacher's once the `removed` ones are taken out; `instead`: the setting to use."""
    n, m = len(get_adapter(student).blocks()), len(get_adapter(teacher).blocks())
    if not _paired(n, m, removed) or any(not 0 <= i < m for i in removed):
        raise DataError(f"{what} pairs each block with the dense model's, but the model has {n} of the teacher's {m} "
                        f"blocks and its report names {len(set(removed))} removed (stage depth records which); use "
                        f"{instead}")


def shapes_changed(student: nn.Module, teacher: nn.Module) -> bool:
    """Whether compression changed the model's shapes (blocks, heads or widths removed: structured), rather
    than zeroing or folding entries of matrices that keep their sizes."""
    sa, ta = get_adapter(student), get_adapter(teacher)

    def sizes(a) -> list[int]:  # every block linear's logical size (a pruned or folded matrix keeps its own)
        mods = (a.model.get_submodule(p) for i in range(len(a.blocks())) for p in a.linear_paths(i).values())
        return [m.d_in * m.d_out if isinstance(m, Projection) else m.weight.numel() for m in mods]

    return len(sa.blocks()) != len(ta.blocks()) or sizes(sa) != sizes(ta)


def resolve_objective(cfg: RecoverConfig, student: nn.Module, teacher: nn.Module | None, world_size: int,
                      removed: Sequence[int] = ()) -> RecoverConfig:
    """`cfg` with objective auto made concrete: blockwise where the compression changed the model's shapes
    and block fits can run (one process, the dense teacher, each kept block paired with the dense span it
    stands for: `removed` names the dense model's removed blocks), the full budget's case measured to win
    per CPU-minute (docs/structured-results.md); end_to_end otherwise."""
    if cfg.objective != "auto":
        return cfg
    fits = cfg.teacher == "dense" and teacher is not None and world_size == 1 and shapes_changed(student, teacher) \
        and _paired(len(get_adapter(student).blocks()), len(get_adapter(teacher).blocks()), removed)
    return replace(cfg, objective="blockwise" if fits else "end_to_end")


def _paired(kept: int, dense: int, removed: Sequence[int]) -> bool:
    """Whether `kept` blocks pair with the `dense` model's once the `removed` ones are taken out."""
    return kept == dense - len(set(removed))


def removed_in(report: dict) -> list[int]:
    """The dense model's blocks that a compression report says were removed (stage depth)."""
    return list(report.get("structure", {}).get("depth", {}).get("removed", []))


def block_spans(dense_blocks: int, removed: Sequence[int]) -> list[range]:
    """The dense blocks each kept block stands for: itself and the removed blocks after it (removed blocks
    before the first kept one belong to the first)."""
    gone = set(removed)
    kept = [i for i in range(dense_blocks) if i not in gone]
    return [range(0 if k == 0 else start, end) for k, (start, end) in enumerate(zip(kept, [*kept[1:], dense_blocks],
                                                                                    strict=True))]


def _map(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.cat([fn(x[s:s + CHUNK]) for s in range(0, x.shape[0], CHUNK)])


def fit_blocks(student: nn.Module, teacher: nn.Module, train: Tensor, cfg: RecoverConfig, gen: torch.Generator,
               masks: StructureMasks, device: torch.device, dtype: torch.dtype, progress: bool = True,
               removed: Sequence[int] = ()) -> dict:
    """Fit every block of `student` in turn (see the module docstring; `removed`: the dense model's blocks
    the student no longer has); returns the phase's report: the relative error of each block's output
    against the dense span's, before and after its fit (on the first few cached windows)."""
    started = time.perf_counter()
    sa, ta = get_adapter(student), get_adapter(teacher)
    n = len(sa.blocks())
    spans = block_spans(len(ta.blocks()), removed)
    ids = random_windows(train, cfg.cache_windows, cfg.seqlen, gen).to(device)
    for a in (sa, ta):
        a.prepare_calls(cfg.seqlen, {cfg.batch_size, CHUNK, cfg.cache_windows % CHUNK or CHUNK})
    with autocast(device, dtype):
        x_dense, x_own = _map(ta.embed, ids), _map(sa.embed, ids)
    before, after = [], []
    bar = tqdm(total=n * cfg.block_steps, desc="fit blocks", unit="step", disable=not progress)
    try:
        for i in range(n):
            with autocast(device, dtype):
                target = _map(lambda h, i=i: _run_span(ta, spans[i], h), x_dense)
                before.append(_relative_error(_map(lambda h, i=i: sa.run_block(i, h), x_own[:CHUNK]),
                                              target[:CHUNK]))  # a sample: the fit, not this, should cost
            _fit_block(sa, i, x_own, target, cfg, gen, masks, device, dtype, bar)
            with autocast(device, dtype):
                x_own = _map(lambda h, i=i: sa.run_block(i, h), x_own)  # the next block's inputs
            after.append(_relative_error(x_own[:CHUNK], target[:CHUNK]))
            x_dense = target
    finally:
        bar.close()
    return {"blocks": n, "spans": [[s.start, s.stop - 1] for s in spans], "block_steps": cfg.block_steps,
            "cache_windows": cfg.cache_windows,
            "seconds": time.perf_counter() - started, "relative_error_before": before, "relative_error_after": after}


def _run_span(adapter, span: range, h: Tensor) -> Tensor:
    for j in span:
        h = adapter.run_block(j, h)
    return h


def _fit_block(adapter, i: int, x: Tensor, target: Tensor, cfg: RecoverConfig, gen: torch.Generator,
               masks: StructureMasks, device: torch.device, dtype: torch.dtype, bar) -> None:
    params = [p for p in adapter.blocks()[i].parameters() if p.numel() and p.requires_grad]
    if not params or cfg.block_steps == 0:
        return
    masks = masks.subset(params)  # only this block's weights change
    opt = torch.optim.AdamW(params, lr=cfg.block_lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    warmup = max(1, round(cfg.warmup * cfg.block_steps)) if cfg.warmup > 0 else 0
    for step in range(cfg.block_steps):
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, cfg.block_steps, cfg.block_lr, warmup)
        pick = torch.randint(0, x.shape[0], (cfg.batch_size,), generator=gen).to(device)
        with autocast(device, dtype):
            out = adapter.run_block(i, x[pick])
        loss = _block_loss(out.float(), target[pick].float(), cfg.block_loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        masks.mask_gradients()
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        masks.rezero()
        bar.update(1)
        bar.set_postfix(block=i, loss=f"{loss.item():.4g}")
    for p in params:
        p.grad = None


def _block_loss(out: Tensor, target: Tensor, kind: str) -> Tensor:
    """mse: the plain squared error; token: each token's squared error relative to its target's squared norm
    (a few tokens carry hidden states far larger than the rest, and would otherwise be most of the loss)."""
    if kind == "mse":
        return F.mse_loss(out, target)
    return ((out - target).square().sum(-1) / target.square().sum(-1).clamp_min(1e-12)).mean()


def _relative_error(out: Tensor, target: Tensor) -> float:
    """||out - target|| / ||target||."""
    return float((out.float() - target.float()).norm() / target.float().norm().clamp_min(1e-12))
