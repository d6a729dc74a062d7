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
parameters, gradients and optimizer state (`smartprune.sharding`), for models that do not fit one
device; the arithmetic is the same. Only rank 0 writes checkpoints and shows progress.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from smartprune.adapters import get_adapter
from smartprune.data import check_positions, recovery_streams, windows_at
from smartprune.device import autocast, resolve_compute_dtype, resolve_device
from smartprune.errors import DataError
from smartprune.evaluation.perplexity import perplexity_of_ids
from smartprune.nn import FOLDED, Maskable
from smartprune.recipes.schema import RecoverConfig
from smartprune.sharding import StructureMasks, full_state, gather_into, load_full_state, local_part, shard

log = logging.getLogger(__name__)

DEFAULT_STEPS = 200
CHECKPOINT = "recover-checkpoint.pt"


@dataclass
class RecoveryState:
    """Everything besides weights and optimizer moments that a resumed run needs."""

    step: int = 0
    total_steps: int = 0  # fixed once (from steps, tokens, or the measured speed for minutes)
    tokens: int = 0
    seconds: float = 0.0
    loss: list[float] = field(default_factory=list)
    held_out: list[dict] = field(default_factory=list)  # {"step", "tokens", "perplexity"}


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_batch_split(batch_size: int, processes: int) -> None:
    """The global batch must split evenly over the processes (each takes an equal slice)."""
    if batch_size % processes:
        raise DataError(f"batch_size {batch_size} does not split evenly over {processes} processes")


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


def lr_at(step: int, total: int, cfg: RecoverConfig) -> float:
    """Linear warm-up over ``warmup * total`` steps, then cosine decay to a tenth of the peak."""
    warm = max(1, round(cfg.warmup * total)) if cfg.warmup > 0 else 0
    if step < warm:
        return cfg.lr * (step + 1) / warm
    done = (step - warm) / max(1, total - warm)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0))))


def distillation_loss(student: nn.Module, teacher: nn.Module | None, ids: Tensor, cfg: RecoverConfig) -> Tensor:
    """The recovery loss on windows `ids` (batch, seqlen), accumulated in float32."""
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
    if want_hidden:
        loss = loss + cfg.hidden_weight * F.mse_loss(out.hidden_states[-1].float(), ref.hidden_states[-1].float())
    return loss


def _all_reduce_mean(tensors: list[Tensor], size: int) -> None:
    """Average `tensors` over processes with one all-reduce of their concatenation."""
    if size == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


class Checkpointer:
    """Atomic checkpoints (write a temporary file, then rename), so a crash or Ctrl-C while saving
    leaves the previous checkpoint usable."""

    def __init__(self, folder: Path | None, minutes: float, sharded: bool = False) -> None:
        self.path = None if folder is None else folder / CHECKPOINT
        self.every = minutes * 60
        self.last = time.monotonic()
        self.sharded = sharded  # states are gathered from every process first (all must call save)

    def due(self) -> bool:
        return self.path is not None and time.monotonic() - self.last >= self.every

    def save(self, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator, state: RecoveryState,
             cfg: RecoverConfig) -> None:
        if self.path is None:
            return
        model_state, opt_state = full_state(model, opt) if self.sharded else (model.state_dict(), opt.state_dict())
        if world()[0] != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({"model": model_state, "optimizer": opt_state, "generator": gen.get_state(),
                    "state": asdict(state), "config": asdict(cfg)}, tmp)
        os.replace(tmp, self.path)
        self.last = time.monotonic()
        log.info("checkpoint at step %d: %s", state.step, self.path)

    def load(self, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
             cfg: RecoverConfig) -> RecoveryState:
        if self.path is None or not self.path.is_file():
            raise DataError(f"nothing to resume: no checkpoint at {self.path}")
        ckpt = torch.load(self.path, map_location="cpu", weights_only=True)  # plain tensors and containers
        if ckpt["config"] != asdict(cfg):
            changed = sorted(k for k in ckpt["config"] if ckpt["config"][k] != asdict(cfg).get(k))
            raise DataError(f"checkpoint {self.path} was made with other recovery settings ({', '.join(changed)}); "
                            "resume with the same ones")
        if self.sharded:
            load_full_state(model, opt, ckpt["model"], ckpt["optimizer"])
        else:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["generator"])
        return RecoveryState(**ckpt["state"])


def _held_out_ppl(model: nn.Module, stream: Tensor, cfg: RecoverConfig, device: torch.device,
                  dtype: torch.dtype) -> float:
    with autocast(device, dtype):
        return perplexity_of_ids(model, stream, cfg.seqlen, limit=cfg.eval_windows, task="held-out",
                                 progress=False).perplexity


def recover(model: nn.Module, tokenizer, cfg: RecoverConfig, *, teacher: nn.Module | None = None,
            device: str | torch.device = "auto", seed: int = 0, checkpoint_dir: str | Path | None = None,
            resume: bool = False, progress: bool = True,
            on_step: Callable[[RecoveryState], None] | None = None) -> dict:
    """Retrain compressed `model` in place with `cfg` (distilling from `teacher` unless ``cfg.teacher``
    is ``none``); returns the ``recovery`` section of report.json."""
    rank, size = world()
    check_batch_split(cfg.batch_size, size)
    dev = resolve_device(device)
    dtype = resolve_compute_dtype(cfg.compute_dtype, dev)
    if cfg.teacher == "none":
        teacher = None
    elif teacher is None:
        raise DataError("recovery with teacher 'dense' needs the dense model (or set teacher: none)")
    if teacher is not None and teacher.config.vocab_size != model.config.vocab_size:
        raise DataError(f"the teacher's vocabulary ({teacher.config.vocab_size} tokens) differs from the compressed "
                        f"model's ({model.config.vocab_size}); distillation needs the model it was compressed from")
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
        student = shard(model, get_adapter(model).blocks(), dev)
        teacher = None if teacher is None else shard(teacher, get_adapter(teacher).blocks(), dev)
    else:
        student = model.to(dev)
        if teacher is not None:
            teacher.to(dev)
    params = trainable_parameters(student)
    for p in params:
        p.requires_grad_(True)
    masks = StructureMasks(student)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    ckpt = Checkpointer(None if checkpoint_dir is None else Path(checkpoint_dir), cfg.checkpoint_minutes, sharded)
    state = ckpt.load(student, opt, gen, cfg) if resume else RecoveryState()
    per_step = cfg.batch_size * cfg.seqlen
    if not state.total_steps:
        state.total_steps = cfg.steps or (math.ceil(cfg.tokens / per_step) if cfg.tokens else None) or DEFAULT_STEPS
    if not state.held_out:  # a resumed run has its starting perplexity already
        state.held_out.append({"step": 0, "tokens": 0, "perplexity": _held_out_ppl(student, held, cfg, dev, dtype)})
    before = state.held_out[0]["perplexity"]
    log.info("recovering for %d steps of %d x %d tokens on %s (%s, %d process(es)%s)", state.total_steps,
             cfg.batch_size, cfg.seqlen, dev, str(dtype).removeprefix("torch."), size, ", FSDP" if sharded else "")
    bar = tqdm(total=state.total_steps, initial=state.step, desc="recover", unit="step",
               disable=not progress or rank != 0)
    started = time.perf_counter() - state.seconds
    try:
        while state.step < state.total_steps:
            ids = _batch(train, cfg, gen)[rank * (cfg.batch_size // size):(rank + 1) * (cfg.batch_size // size)]
            for group in opt.param_groups:
                group["lr"] = lr_at(state.step, state.total_steps, cfg)
            with autocast(dev, dtype):
                loss = distillation_loss(student, teacher, ids.to(dev), cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if not sharded:  # FSDP has already reduce-scattered (averaged) the gradients
                _all_reduce_mean([p.grad for p in params if p.grad is not None], size)
            masks.mask_gradients()
            if cfg.clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
            masks.rezero()  # weight decay or rounding must not revive a pruned entry
            value = loss.detach().float().reshape(1)
            _all_reduce_mean([value], size)
            state.step += 1
            state.tokens += per_step
            state.loss.append(value.item())
            state.seconds = time.perf_counter() - started
            if state.step == 2 and cfg.minutes is not None and not cfg.steps and not cfg.tokens:
                state.total_steps = max(2, int(cfg.minutes * 60 / (state.seconds / 2)))  # sized by measured speed
                bar.total = state.total_steps
            if state.step % cfg.eval_every == 0 or state.step == state.total_steps:
                ppl = _held_out_ppl(student, held, cfg, dev, dtype)
                state.held_out.append({"step": state.step, "tokens": state.tokens, "perplexity": ppl})
            bar.update(1)
            bar.set_postfix(loss=f"{state.loss[-1]:.3f}", tok_s=f"{state.tokens / max(state.seconds, 1e-9):,.0f}",
                            held_out=f"{state.held_out[-1]['perplexity']:,.1f}")
            if on_step is not None:
                on_step(state)
            if _agreed(ckpt.due(), sharded, dev):
                ckpt.save(student, opt, gen, state, cfg)
    except KeyboardInterrupt:
        # A sharded checkpoint needs every process at the same point, which an interrupt does not give;
        # the last periodic one stays usable (checkpoints are written atomically).
        if not sharded:
            ckpt.save(student, opt, gen, state, cfg)
        if ckpt.path is not None and rank == 0:
            log.warning("interrupted at step %d of %d; %s", state.step, state.total_steps,
                        f"the checkpoint {ckpt.path} resumes it (--resume)" if ckpt.path.is_file() else
                        "no checkpoint was written yet, so there is nothing to resume")
        raise
    finally:
        bar.close()
    ckpt.save(student, opt, gen, state, cfg)
    for p in params:
        p.grad = None
    if sharded:
        gather_into(student, model)
    model.eval()
    return {"loss": state.loss, "steps": state.step, "tokens": state.tokens, "seconds": state.seconds,
            "world_size": size, "sharding": "fsdp" if sharded else "none",
            "parameters_held": sum(local_part(p).numel() for p in params), "device": str(dev),
            "compute_dtype": str(dtype).removeprefix("torch."),
            "perplexity_before": before, "perplexity_after": state.held_out[-1]["perplexity"],
            "held_out": state.held_out, "held_out_text": f"{cfg.text} (validation, {cfg.eval_windows} windows of "
                                                          f"{cfg.seqlen})",
            "text": cfg.text, "budget": cfg.budget(), "config": asdict(cfg), "structure": structure_report(model)}


def _agreed(flag: bool, sharded: bool, device: torch.device) -> bool:
    """Rank 0's decision on every process (clocks differ, and a sharded save needs all of them)."""
    if not sharded:
        return flag
    t = torch.tensor([int(flag)], device=device)  # NCCL sends only GPU tensors
    dist.broadcast(t, 0)
    return bool(t.item())


def _batch(stream: Tensor, cfg: RecoverConfig, gen: torch.Generator) -> Tensor:
    """`batch_size` windows at seeded random starts (the same on every process)."""
    starts = torch.randint(0, stream.numel() - cfg.seqlen, (cfg.batch_size,), generator=gen)
    return windows_at(stream, starts.tolist(), cfg.seqlen)
