"""Fully sharded data parallel (FSDP) recovery: parameters, gradients and optimizer moments split over
the processes, so a model that does not fit one device can still be retrained.

torch's FSDP2 (``fully_shard``) wraps each block and then the whole model; each process then holds a
slice (along the first dimension) of every parameter as a DTensor, gathers a block's full weights
only while that block runs, and reduce-scatters its gradients. The compressed structure is kept on
the slices: every mask is cut the same way as its weight (`StructureMasks`). Checkpoints and the
final weights are gathered into full tensors, so a sharded run writes the same files as any other.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from smartprune.modules.masked import Maskable


def local_part(t: Tensor) -> Tensor:
    """The part of `t` this process holds (a plain tensor is all of it)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def shard(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> nn.Module:
    """A copy of `model` wrapped block by block with FSDP2 over all processes, its slices on `device`
    (the caller's model stays whole, where it is: it receives the trained weights at the end)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    names = {id(m): n for n, m in model.named_modules()}
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for p in copied.parameters():  # FSDP splits contiguous storage; projections hold transposed views
            if not p.is_contiguous():
                p.data = p.data.contiguous()
    for block in blocks:
        fully_shard(copied.get_submodule(names[id(block)]), mesh=mesh)
    fully_shard(copied, mesh=mesh)
    return copied


class StructureMasks:
    """Every masked weight with its mask, as this process holds them (a slice of each under FSDP).
    `mask_gradients` before the optimizer step and `rezero` after it keep pruned entries exactly zero."""

    def __init__(self, model: nn.Module) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        self.pairs: list[tuple[nn.Parameter, Tensor]] = []
        for name, m in model.named_modules():
            if not (isinstance(m, Maskable) and m.mask is not None):
                continue
            w, mask = m.weight, m.mask.to(device=m.weight.device, dtype=torch.bool)
            if isinstance(w, DTensor):
                mask = distribute_tensor(mask, w.device_mesh, w.placements).to_local()
            if mask.shape != local_part(w).shape:
                raise RuntimeError(f"{name}: mask slice {tuple(mask.shape)} != weight slice "
                                   f"{tuple(local_part(w).shape)}")
            self.pairs.append((w, mask))

    def subset(self, params: list[nn.Parameter]) -> StructureMasks:
        """The masks of `params` alone: a block fit re-zeroes its own block, not the whole model, each step."""
        ids = {id(p) for p in params}
        out = object.__new__(StructureMasks)
        out.pairs = [(w, mask) for w, mask in self.pairs if id(w) in ids]
        return out

    def mask_gradients(self) -> None:
        for w, mask in self.pairs:
            if w.grad is not None:
                local_part(w.grad).mul_(mask)

    def rezero(self) -> None:
        with torch.no_grad():
            for w, mask in self.pairs:
                local_part(w).mul_(mask)


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Model and optimizer state as full (unsharded) CPU tensors on every process (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=False))


def load_full_state(model: nn.Module, opt: torch.optim.Optimizer, model_state: dict, opt_state: dict) -> None:
    """Load full states into a sharded model and its optimizer (each process keeps its slices)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, opt, model_state_dict=model_state, optim_state_dict=opt_state,
                   options=StateDictOptions(full_state_dict=True))


def gather_into(sharded: nn.Module, whole: nn.Module) -> None:
    """Copy the trained weights of `sharded` into the caller's unsharded `whole` (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    whole.load_state_dict({k: local_part(v).detach().to(whole.state_dict()[k].device) for k, v in state.items()})
