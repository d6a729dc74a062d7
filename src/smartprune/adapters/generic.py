"""The adapter for a causal LM without an entry in the table: its blocks and their linear layers are
found from the module tree and one forward pass, which is all the unstructured baselines
(magnitude, Wanda, SparseGPT) need.

- Blocks: the `nn.ModuleList` with one entry per hidden layer (the config's layer count) holding the
  most parameters.
- Linear layers of a block (``nn.Linear``, GPT-2-style ``Conv1D``), in the order the forward pass
  calls them; consecutive layers that read the very same input tensor form one data-flow group
  (Q, K, V; gate and up), which the baselines prune before the next group.
- A fused layer stays one matrix (its layout is family knowledge, which lives in the table): its
  rows are pruned together.
- Each block is compressed as a whole (``scope="block"``), called with the arguments the model
  passes it; the paper's methods need the roles of a table entry and are refused with the reason.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from smartprune.adapters.base import Adapter, CallCapture
from smartprune.device import model_device
from smartprune.errors import ModelError
from smartprune.modules.masked import Projection, forward_pre_hooks
from smartprune.modules.packed import PackedLinear, PackedProjection

_LINEAR = (nn.Linear, Conv1D, Projection, PackedProjection, PackedLinear)  # packed: a compact-resident load
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def _layer_count(config) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return next((getattr(text, k) for k in _LAYER_COUNT_KEYS if isinstance(getattr(text, k, None), int)), None)


def find_blocks(model: nn.Module) -> str:
    """Path of the decoder blocks: the ModuleList with one entry per layer and the most parameters."""
    n = _layer_count(model.config)
    candidates = [(sum(p.numel() for p in m.parameters()), path) for path, m in model.named_modules()
                  if isinstance(m, nn.ModuleList) and len(m) == n and path]
    if not candidates:
        raise ModelError(f"cannot find the decoder blocks of this {model.config.model_type} model (no module list "
                         f"of {n} layers)")
    return max(candidates)[1]


class GenericAdapter(Adapter):
    """Blocks and linear layers found by inspection (see the module docstring)."""

    sublayers = False

    def __init__(self, model: nn.Module, why: str) -> None:
        super().__init__(model)
        self.why = why  # why the paper's methods do not apply (no table entry, or the entry's reason)
        self._blocks = find_blocks(model)
        self.calls = CallCapture(model, [self.block_path(i) for i in range(len(self.blocks()))], per_batch=True)
        self._roles, self._groups, self._conv1d = self._discover()

    def _discover(self) -> tuple[list[str], list[list[str]], set[str]]:
        """Block 0's linear layers in call order, grouped by shared input; which are Conv1D."""
        block = self.blocks()[0]
        names = {id(m): n for n, m in block.named_modules() if isinstance(m, _LINEAR) and n}
        calls: list[tuple[str, Tensor]] = []  # the inputs are kept alive, so their ids stay unique

        def record(module, args):
            if id(module) in names and names[id(module)] not in {c[0] for c in calls}:
                calls.append((names[id(module)], args[0]))

        dummy = torch.zeros(1, 4, dtype=torch.long, device=model_device(self.model))
        with torch.no_grad(), forward_pre_hooks((m, record) for m in block.modules() if id(m) in names):
            self.model(input_ids=dummy, use_cache=False)
        if not calls:
            raise ModelError(f"found no linear layers in the blocks of this {self.config.model_type} model")
        groups: list[list[str]] = []
        for j, (role, x) in enumerate(calls):
            if j and x is calls[j - 1][1]:
                groups[-1].append(role)
            else:
                groups.append([role])
        conv1d = {n for n, m in block.named_modules() if isinstance(m, Conv1D)}
        return [c[0] for c in calls], groups, conv1d

    def blocks_path(self) -> str:
        return self._blocks

    def embedding_paths(self) -> list[str]:
        return []

    def linear_paths(self, i: int) -> dict[str, str]:
        return {role: f"{self.block_path(i)}.{role}" for role in self._roles}

    def accounting_groups(self, i: int) -> dict[str, list[str]]:
        return {"linear": list(self.linear_paths(i).values())}

    def prune_groups(self, scope: str, roles: list[str]) -> list[list[str]]:
        return [[r for r in g if r in roles] for g in self._groups if any(r in roles for r in g)]

    def run_block(self, i: int, h: Tensor) -> Tensor:
        return self.calls.call(self.block_path(i), h)

    def prepare_calls(self, seqlen: int, batches: set[int]) -> None:
        for b in batches:
            self.calls.capture(seqlen, b)

    def head(self, h: Tensor) -> Tensor:
        raise ModelError(f"the output head of a {self.config.model_type} model is not known here ({self.why})")

    def forward_logits(self, ids: Tensor) -> Tensor:
        return self.model(input_ids=ids, use_cache=False).logits

    def conv1d(self, path: str) -> bool:
        return path.removeprefix(self.blocks_path()).split(".", 2)[-1] in self._conv1d
