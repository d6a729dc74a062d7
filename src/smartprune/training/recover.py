"""Recovery: retraining a compressed model so it is usable again, with its structure kept exactly.

One loop (nanoGPT's shape): draw a seeded global batch of windows, compute the loss (KL to the dense
teacher's logits at a temperature, next-token cross-entropy, optionally last-hidden-state matching),
step AdamW with warm-up + cosine and gradient clipping, and keep the structure: gradients of pruned
entries are zeroed and the entries re-zeroed after each step (so weight decay or rounding cannot
revive them); folded rows are one shared parameter and stay one. Dropout is off (the model stays in
eval mode), so a run is a pure function of its seed and a resumed run continues bit for bit.

Data parallel: under torch.distributed every process draws the same global batch, takes its slice,
and gradients are averaged with one all-reduce (what DDP does), so the loss curve equals a single
process with the same global batch. With ``sharding: fsdp`` the processes instead split the
parameters, gradients and optimizer state (`smartprune.training.sharding`), for models that do not fit one
device; the arithmetic is the same. Only rank 0 writes checkpoints and shows progress.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from smartprune.adapters import get_adapter
from smartprune.data import check_positions, recovery_streams, windows_at
from smartprune.device import autocast, resolve_compute_dtype, resolve_device, retained_heap
from smartprune.errors import DataError
from smartprune.evaluation.perplexity import perplexity_of_ids
from smartprune.modules.masked import FOLDED, Maskable
from smartprune.recipes.schema import RecoverConfig
from smartprune.training.blockwise import block_spans, check_blockwise, check_paired, fit_blocks, resolve_objective
from smartprune.training.checkpoint import Checkpointer, RecoveryState
from smartprune.training.distributed import agreed, all_reduce_mean, any_rank, check_batch_split, world
from smartprune.training.schedule import lr_at
from smartprune.training.sharding import StructureMasks, gather_into, local_part, shard
from smartprune.training.stopping import StopAtBoundary, interruption

log = logging.getLogger(__name__)

DEFAULT_STEPS = 200


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter with elements (a fully folded projection keeps an empty free-row block)."""
    return [p for p in model.parameters() if p.numel()]


def structure_report(model: nn.Module) -> dict:
    """What of the compressed structure is intact: pruned entries that are non-zero (must be 0),
    masked and folded modules counted."""
    revived, masked, folded = 0, 0, 0
    for m in model.modules():
        if isinstance(m, FOLDED) and m.n_folded:
            folded += 1
        if isinstance(m, Maskable) and m.mask is not None:
            masked += 1
            revived += int((m.weight.detach()[~m.mask] != 0).sum())
    return {"pruned_entries_nonzero": revived, "masked_modules": masked, "folded_projections": folded,
            "kept": revived == 0}


def hidden_pairs(student: nn.Module, teacher: nn.Module, removed: Sequence[int]) -> list[tuple[int, int]]:
    """For ``hidden_layers: blocks``: (student, teacher) indices into the models' ``hidden_states``, one pair per
    kept block: its output against the output of the dense span it stands for (itself and the removed blocks
    after it), as the block-wise fits pair them. Index 0 is the embeddings, index i the output of block i-1."""
    check_paired(student, teacher, removed, "hidden_layers blocks", "hidden_layers last")
    return [(k + 1, span.stop) for k, span in enumerate(block_spans(len(get_adapter(teacher).blocks()), removed))]


def distillation_loss(student: nn.Module, teacher: nn.Module | None, ids: Tensor, cfg: RecoverConfig,
                      pairs: Sequence[tuple[int, int]] = ()) -> Tensor:
    """The recovery loss on windows `ids` (batch, seqlen), accumulated in float32 (`pairs`: `hidden_pairs`,
    for ``hidden_layers: blocks``)."""
    want_hidden = teacher is not None and cfg.hidden_weight > 0
    out = student(ids, output_hidden_states=want_hidden)
    logits = out.logits[:, :-1].float()
    loss = logits.new_zeros(())
    if cfg.ce_weight > 0:
        loss = loss + cfg.ce_weight * F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    if teacher is None:
        return loss
    with torch.no_grad():
        ref = teacher(ids, output_hidden_states=want_hidden)
    if cfg.kl_weight > 0:
        t = cfg.temperature
        log_p = F.log_softmax(ref.logits[:, :-1].float() / t, -1)
        log_q = F.log_softmax(logits / t, -1)
        kl = F.kl_div(log_q.reshape(-1, log_q.shape[-1]), log_p.reshape(-1, log_p.shape[-1]), log_target=True,
                      reduction="batchmean")
        loss = loss + cfg.kl_weight * t * t * kl
    if want_hidden and cfg.hidden_layers == "blocks":
        # relative: the residual stream grows from block to block, and each block should count alike
        errors = [F.mse_loss(out.hidden_states[s].float(), ref.hidden_states[t].float())
                  / ref.hidden_states[t].float().pow(2).mean().clamp_min(1e-12) for s, t in pairs]
        loss = loss + cfg.hidden_weight * torch.stack(errors).mean()
    elif want_hidden:
        loss = loss + cfg.hidden_weight * F.mse_loss(out.hidden_states[-1].float(), ref.hidden_states[-1].float())
    return loss


@dataclass
class _Run:
    """What the loop works on, set up once (`_setup`) and stepped (`_step`)."""

    student: nn.Module  # the model itself, or its FSDP-sharded copy
    teacher: nn.Module | None
    params: list[nn.Parameter]
    masks: StructureMasks
    opt: torch.optim.Optimizer
    gen: torch.Generator
    ckpt: Checkpointer
    state: RecoveryState
    train: Tensor
    held: Tensor
    device: torch.device
    dtype: torch.dtype
    rank: int
    size: int
    sharded: bool
    removed: tuple[int, ...] = ()  # the dense model's blocks the student no longer has (block-wise spans)
    pairs: tuple[tuple[int, int], ...] = ()  # hidden_layers blocks: student / teacher hidden-state indices


def _setup(model: nn.Module, tokenizer, cfg: RecoverConfig, teacher: nn.Module | None, device: torch.device,
           seed: int, checkpoint_dir: str | Path | None, resume: bool, removed: tuple[int, ...] = ()) -> _Run:
    """Check the inputs, place (or shard) the models, build the optimizer, resume or start the state."""
    rank, size = world()
    check_batch_split(cfg.batch_size, size)
    dtype = resolve_compute_dtype(cfg.compute_dtype, device)
    if cfg.teacher == "none":
        teacher = None
    elif teacher is None:
        raise DataError("recovery with teacher 'dense' needs the dense model (or set teacher: none)")
    if teacher is not None and teacher.config.vocab_size != model.config.vocab_size:
        raise DataError(f"the teacher's vocabulary ({teacher.config.vocab_size} tokens) differs from the compressed "
                        f"model's ({model.config.vocab_size}); distillation needs the model it was compressed from")
    if cfg.objective == "blockwise":  # the config refuses it without a teacher; the dense one is there now
        check_blockwise(model, teacher, size, removed)
    pairs = ()
    if teacher is not None and cfg.hidden_weight > 0 and cfg.hidden_layers == "blocks":
        pairs = tuple(hidden_pairs(model, teacher, removed))
    check_positions(model, cfg.seqlen, "recovery seqlen")
    train, held = recovery_streams(tokenizer, cfg.text, cfg.seqlen, cfg.eval_windows)
    if train.numel() < cfg.seqlen + cfg.batch_size:
        raise DataError(f"training text '{cfg.text}' has {train.numel()} tokens, too few for windows of {cfg.seqlen}")
    sharded = cfg.sharding == "fsdp" and size > 1
    if cfg.sharding == "fsdp" and size == 1:
        log.info("sharding fsdp with one process: nothing to split, training the whole model")
    model.eval()  # eval: no dropout, so the run is a function of its seed (gradients still flow)
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    if sharded:  # the caller's model stays whole on its device and receives the trained weights at the end
        student = shard(model, get_adapter(model).blocks(), device)
        teacher = None if teacher is None else shard(teacher, get_adapter(teacher).blocks(), device)
    else:
        student = model.to(device)
        if teacher is not None:
            teacher.to(device)
    params = trainable_parameters(student)
    for p in params:
        p.requires_grad_(True)
    masks = StructureMasks(student)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    ckpt = Checkpointer(None if checkpoint_dir is None else Path(checkpoint_dir), cfg.checkpoint_minutes, sharded,
                         seed)
    state = ckpt.load(student, opt, gen, cfg) if resume else RecoveryState()
    if not state.total_steps:
        per_step = cfg.batch_size * cfg.seqlen
        if cfg.steps is not None:
            state.total_steps = cfg.steps
        else:  # a minutes budget starts from the default and is sized after two steps (`_step`)
            state.total_steps = math.ceil(cfg.tokens / per_step) if cfg.tokens else DEFAULT_STEPS
    run = _Run(student, teacher, params, masks, opt, gen, ckpt, state, train, held, device, dtype, rank, size, sharded,
               removed, pairs)
    if not state.held_out:  # a resumed run has its starting perplexity already
        state.held_out.append({"step": 0, "tokens": 0, "seconds": 0.0, "perplexity": _held_out_ppl(run, cfg)})
    return run


def _fit_blocks(run: _Run, cfg: RecoverConfig, progress: bool) -> None:
    """The block-wise phase (objective blockwise), once: a resumed run that has it skips it."""
    state = run.state
    if cfg.objective != "blockwise" or state.blockwise is not None:
        return
    state.blockwise = fit_blocks(run.student, run.teacher, run.train, cfg, run.gen, run.masks, run.device, run.dtype,
                                 progress, run.removed)
    state.seconds += state.blockwise["seconds"]
    state.held_out.append({"step": 0, "tokens": 0, "seconds": state.seconds, "after": "blockwise",
                           "perplexity": _held_out_ppl(run, cfg)})
    run.ckpt.save(run.student, run.opt, run.gen, state, cfg)


def _step(run: _Run, cfg: RecoverConfig, started: float) -> None:
    """One optimizer step on this process's slice of the global batch, structure kept, state updated."""
    state, size = run.state, run.size
    part = cfg.batch_size // size
    ids = _batch(run.train, cfg, run.gen)[run.rank * part:(run.rank + 1) * part]
    for group in run.opt.param_groups:
        group["lr"] = lr_at(state.step, state.total_steps, cfg)
    with autocast(run.device, run.dtype):
        loss = distillation_loss(run.student, run.teacher, ids.to(run.device), cfg, run.pairs)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    if not run.sharded:  # FSDP has already reduce-scattered (averaged) the gradients
        all_reduce_mean([p.grad for p in run.params if p.grad is not None], size)
    run.masks.mask_gradients()
    if cfg.clip > 0:
        torch.nn.utils.clip_grad_norm_(run.params, cfg.clip)
    run.opt.step()
    run.masks.rezero()  # weight decay or rounding must not revive a pruned entry
    value = loss.detach().float().reshape(1)
    all_reduce_mean([value], size)
    state.step += 1
    state.tokens += cfg.batch_size * cfg.seqlen
    state.loss.append(value.item())
    state.seconds = time.perf_counter() - started
    if state.step == 2 and cfg.minutes is not None and cfg.steps is None and not cfg.tokens:
        fits = state.blockwise["seconds"] if state.blockwise else 0.0  # the block fits spent part of the minutes
        per_step = (state.seconds - fits) / 2
        state.total_steps = max(2, int((cfg.minutes * 60 - fits) / per_step))  # sized by measured speed
    if state.step % cfg.eval_every == 0 or state.step == state.total_steps:
        state.held_out.append({"step": state.step, "tokens": state.tokens, "seconds": state.seconds,
                               "perplexity": _held_out_ppl(run, cfg)})


def _finish(run: _Run, model: nn.Module, cfg: RecoverConfig) -> dict:
    """The final checkpoint, the trained weights back in `model`, and the report section."""
    state = run.state
    run.ckpt.save(run.student, run.opt, run.gen, state, cfg)
    for p in run.params:
        p.grad = None
    if run.sharded:
        gather_into(run.student, model)
    model.eval()
    return {"loss": state.loss, "steps": state.step, "tokens": state.tokens, "seconds": state.seconds,
            "world_size": run.size, "sharding": "fsdp" if run.sharded else "none",
            "parameters_held": sum(local_part(p).numel() for p in run.params), "device": str(run.device),
            "compute_dtype": str(run.dtype).removeprefix("torch."),
            "perplexity_before": state.held_out[0]["perplexity"], "perplexity_after": state.held_out[-1]["perplexity"],
            "held_out": state.held_out, "held_out_text": f"{cfg.text} (validation, {cfg.eval_windows} windows of "
                                                          f"{cfg.seqlen})",
            "text": cfg.text, "budget": cfg.budget(), "config": asdict(cfg), "structure": structure_report(model),
            "objective": cfg.objective, **({"blockwise": state.blockwise} if state.blockwise else {})}


@retained_heap()  # every step allocates the same vocabulary-wide tensors: served from the heap, no page faults
def recover(model: nn.Module, tokenizer, cfg: RecoverConfig, *, teacher: nn.Module | None = None,
            device: str | torch.device = "auto", seed: int = 0, checkpoint_dir: str | Path | None = None,
            resume: bool = False, progress: bool = True,
            on_step: Callable[[RecoveryState], None] | None = None, removed_blocks: Sequence[int] = ()) -> dict:
    """Retrain compressed `model` in place with `cfg` (distilling from `teacher` unless ``cfg.teacher``
    is ``none``); returns the ``recovery`` section of report.json. ``removed_blocks``: the teacher's
    blocks that `model` no longer has (the depth stage's report), for the block-wise objective."""
    asked = cfg.objective
    cfg = resolve_objective(cfg, model, teacher, world()[1], removed_blocks)
    if asked != cfg.objective:
        log.info("objective auto: %s (%s)", cfg.objective, "the model's shapes differ from the dense model's"
                 if cfg.objective == "blockwise" else "the model keeps the dense model's shapes, or no block fits")
    run = _setup(model, tokenizer, cfg, teacher, resolve_device(device), seed, checkpoint_dir, resume,
                 tuple(removed_blocks))
    state = run.state
    log.info("recovering for %d steps of %d x %d tokens on %s (%s, %d process(es)%s)", state.total_steps,
             cfg.batch_size, cfg.seqlen, run.device, str(run.dtype).removeprefix("torch."), run.size,
             ", FSDP" if run.sharded else "")
    bar = tqdm(total=state.total_steps, initial=state.step, desc="recover", unit="step",
               disable=not progress or run.rank != 0)
    _fit_blocks(run, cfg, progress and run.rank == 0)
    started = time.perf_counter() - state.seconds
    at_boundary = True  # the state is one the loop passes through (not half a step): a checkpoint may be taken
    try:
        with StopAtBoundary(escalate=run.size == 1) as stop:
            while state.step < state.total_steps:
                at_boundary = False
                _step(run, cfg, started)
                at_boundary = True
                bar.total = state.total_steps
                bar.update(1)
                bar.set_postfix(loss=f"{state.loss[-1]:.3f}", tok_s=f"{state.tokens / max(state.seconds, 1e-9):,.0f}",
                                held_out=f"{state.held_out[-1]['perplexity']:,.1f}")
                if on_step is not None:
                    on_step(state)
                signum = any_rank(stop.signum, run.size, run.device)  # every process stops at the same step
                if signum:
                    run.ckpt.save(run.student, run.opt, run.gen, state, cfg)
                    raise interruption(signum)
                if agreed(run.ckpt.due(), run.sharded, run.device):
                    run.ckpt.save(run.student, run.opt, run.gen, state, cfg)
    except KeyboardInterrupt:
        # Saved here only at a step boundary (an exception from `on_step`): half a step is not a state to
        # resume from, so then the last checkpoint stays (written atomically, it is whole). A sharded
        # checkpoint needs every process at the same point, which only the signal path above gives.
        if at_boundary and not run.sharded and run.ckpt.saved_step != state.step:
            run.ckpt.save(run.student, run.opt, run.gen, state, cfg)
        if run.ckpt.path is not None and run.rank == 0:
            log.warning("interrupted at step %d of %d; %s", state.step, state.total_steps,
                        f"the checkpoint {run.ckpt.path} resumes it (--resume)" if run.ckpt.path.is_file() else
                        "no checkpoint was written yet, so there is nothing to resume")
        raise
    finally:
        bar.close()
    return _finish(run, model, cfg)


def _held_out_ppl(run: _Run, cfg: RecoverConfig) -> float:
    with autocast(run.device, run.dtype):
        return perplexity_of_ids(run.student, run.held, cfg.seqlen, limit=cfg.eval_windows, task="held-out",
                                 progress=False).perplexity


def _batch(stream: Tensor, cfg: RecoverConfig, gen: torch.Generator) -> Tensor:
    """`batch_size` windows at seeded random starts (the same on every process)."""
    starts = torch.randint(0, stream.numel() - cfg.seqlen, (cfg.batch_size,), generator=gen)
    return windows_at(stream, starts.tolist(), cfg.seqlen)
