"""Atomic training checkpoints: a resumed run continues bit for bit."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from smartprune.errors import DataError
from smartprune.files import disk_full
from smartprune.recipes.schema import RecoverConfig
from smartprune.training.distributed import world
from smartprune.training.sharding import full_state, load_full_state

log = logging.getLogger(__name__)

CHECKPOINT = "recover-checkpoint.pt"


@dataclass
class RecoveryState:
    """Everything besides weights and optimizer moments that a resumed run needs."""

    step: int = 0
    total_steps: int = 0  # fixed once (from steps, tokens, or the measured speed for minutes)
    tokens: int = 0
    seconds: float = 0.0
    loss: list[float] = field(default_factory=list)
    held_out: list[dict] = field(default_factory=list)  # {"step", "tokens", "seconds", "perplexity"}
    blockwise: dict | None = None  # the block-wise phase's report, once it is done (objective blockwise)


class Checkpointer:
    """Atomic checkpoints (write a temporary file, then rename), so a crash or Ctrl-C while saving
    leaves the previous checkpoint usable."""

    def __init__(self, folder: Path | None, minutes: float, sharded: bool = False, seed: int = 0) -> None:
        self.path = None if folder is None else folder / CHECKPOINT
        self.seed = seed  # saved beside the settings: a resume with another seed would silently keep the old draws
        self.every = minutes * 60
        self.last = time.monotonic()
        self.saved_step = -1  # the step of the last checkpoint this run wrote
        self.full = False  # a save found the disk full
        self.sharded = sharded  # states are gathered from every process first (all must call save)

    def _settings(self, cfg: RecoverConfig) -> dict:
        """What a checkpoint must have been made with to be resumed: the recovery settings and the seed."""
        return {**asdict(cfg), "seed": self.seed}

    def due(self) -> bool:
        return self.path is not None and time.monotonic() - self.last >= self.every

    def save(self, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator, state: RecoveryState,
             cfg: RecoverConfig) -> None:
        if self.path is None:
            return
        model_state, opt_state = full_state(model, opt) if self.sharded else (model.state_dict(), opt.state_dict())
        self.saved_step = state.step
        if world()[0] != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as f:  # through a Python file: a full disk then surfaces as an OSError
                torch.save({"model": model_state, "optimizer": opt_state, "generator": gen.get_state(),
                            "state": asdict(state), "config": self._settings(cfg)}, f)
            os.replace(tmp, self.path)
        except (OSError, RuntimeError) as exc:
            tmp.unlink(missing_ok=True)
            # torch's zip writer reports a short write (a full disk) as "unexpected pos", the file's close as
            # the OSError itself, depending on where the space ran out
            if not (disk_full(exc) or disk_full(exc.__context__) or "unexpected pos" in str(exc)):
                raise
            if not self.full:  # once: every later save will likely fail the same way
                log.warning("no space for the checkpoint at step %d in %s; training goes on (%s)", state.step,
                            self.path.parent, "the previous checkpoint stays" if self.path.is_file() else
                            "nothing to resume from yet")
            self.full = True
            return
        self.last = time.monotonic()
        log.info("checkpoint at step %d: %s", state.step, self.path)

    def load(self, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
             cfg: RecoverConfig) -> RecoveryState:
        if self.path is None or not self.path.is_file():
            raise DataError(f"nothing to resume: no checkpoint at {self.path}")
        try:
            ckpt = torch.load(self.path, map_location="cpu", weights_only=True)  # plain tensors and containers
        except Exception as exc:  # damaged, truncated, or a pickle with anything but tensors in it
            raise DataError(f"checkpoint {self.path} cannot be read ({type(exc).__name__}): it is damaged or not a "
                            "smartprune recovery checkpoint; remove it and run without --resume") from None
        if not isinstance(ckpt, dict) or not {"model", "optimizer", "generator", "state", "config"} <= set(ckpt) \
                or not isinstance(ckpt["config"], dict):
            raise DataError(f"checkpoint {self.path} is not a smartprune recovery checkpoint; remove it and run "
                            "without --resume")
        want = self._settings(cfg)
        if ckpt["config"] != want:
            changed = sorted(k for k in {*ckpt["config"], *want} if ckpt["config"].get(k) != want.get(k))
            raise DataError(f"checkpoint {self.path} was made with other recovery settings ({', '.join(changed)}); "
                            "resume with the same ones")
        _check_fields(self.path, ckpt["state"])
        if not self.sharded:
            _check_weights(self.path, ckpt["model"], model)
        if self.sharded:
            load_full_state(model, opt, ckpt["model"], ckpt["optimizer"])
        else:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
        try:
            gen.set_state(ckpt["generator"])
        except (TypeError, RuntimeError):
            raise DataError(f"checkpoint {self.path}: its generator state is damaged; remove it and run without "
                            "--resume") from None
        return RecoveryState(**ckpt["state"])


# RecoveryState's fields and the types a checkpoint's copy of them must have
_FIELDS = {"step": int, "total_steps": int, "tokens": int, "seconds": (int, float), "loss": list, "held_out": list,
           "blockwise": (dict, type(None))}


def _check_fields(path: Path, state) -> None:
    """The saved state field by field: a hand-edited or damaged value is one line, never a wrong resume."""
    if not isinstance(state, dict) or set(state) != set(_FIELDS):
        raise DataError(f"checkpoint {path}: its state does not hold the fields {', '.join(_FIELDS)}; remove it and "
                        "run without --resume")
    for key, kind in _FIELDS.items():
        value = state[key]
        bad = isinstance(value, bool) or not isinstance(value, kind) or (kind is int and value < 0)
        if bad:
            raise DataError(f"checkpoint {path}: state '{key}' is {value!r}; remove it and run without --resume")


def _check_weights(path: Path, saved, model: nn.Module) -> None:
    """The checkpoint holds this model's weights (names and shapes), not another model's."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if not isinstance(saved, dict) or not all(isinstance(v, torch.Tensor) for v in saved.values()):
        raise DataError(f"checkpoint {path}: its weights are not a dict of tensors; remove it and run without --resume")
    got = {k: tuple(v.shape) for k, v in saved.items()}
    if got != want:
        diff = sorted(set(got) ^ set(want)) or sorted(k for k in want if got[k] != want[k])
        raise DataError(f"checkpoint {path} holds another model's weights ({diff[0]}"
                        f"{f' and {len(diff) - 1} more' if len(diff) > 1 else ''} differ); resume the run that wrote "
                        "it, or remove it and run without --resume")


