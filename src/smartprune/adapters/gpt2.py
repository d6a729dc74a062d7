"""GPT-2: ``Conv1D`` layers (weights stored ``d_in x d_out``), Q, K and V fused in one ``c_attn``,
learned position embeddings, an output head tied to the token embedding."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from smartprune.adapters.base import Adapter, positions
from smartprune.nn import FusedProjections, Projection


class GPT2Adapter(Adapter):
    model_types = ("gpt2",)
    ff_size_key = "n_inner"

    def blocks(self) -> nn.ModuleList:
        return self.model.transformer.h

    def embedding_paths(self) -> list[str]:
        return ["transformer.wte", "transformer.wpe"]

    def attention_paths(self, i: int) -> dict[str, str]:
        p = f"transformer.h.{i}.attn"
        return {"q": f"{p}.c_attn.q", "k": f"{p}.c_attn.k", "v": f"{p}.c_attn.v", "o": f"{p}.c_proj"}

    def ff_paths(self, i: int) -> dict[str, str]:
        p = f"transformer.h.{i}.mlp"
        return {"c_fc": f"{p}.c_fc", "c_proj": f"{p}.c_proj"}

    def embed(self, ids: Tensor) -> Tensor:
        t = self.model.transformer
        return t.wte(ids) + t.wpe(positions(ids))

    def attn_norm(self, i: int) -> nn.Module:
        return self.blocks()[i].ln_1

    def ff_norm(self, i: int) -> nn.Module:
        return self.blocks()[i].ln_2

    def attention(self, i: int, x: Tensor) -> Tensor:
        return self.blocks()[i].attn(x, attention_mask=None)[0]

    def attention_module_path(self, i: int) -> str:
        return f"transformer.h.{i}.attn"

    def head(self, h: Tensor) -> Tensor:
        return self.model.lm_head(self.model.transformer.ln_f(h))

    def prepare(self) -> None:
        # Split the fused c_attn first, so the generic conversion finds q/k/v at ".c_attn.q" etc.
        for block in self.blocks():
            if isinstance(block.attn.c_attn, Conv1D):
                w, b = block.attn.c_attn.weight.detach(), block.attn.c_attn.bias.detach()
                d = w.shape[1] // 3
                parts = [Projection(w[:, j * d:(j + 1) * d], b[j * d:(j + 1) * d]) for j in range(3)]
                block.attn.c_attn = FusedProjections(*parts)
        super().prepare()

    def materialize(self) -> None:
        super().materialize()
        for block in self.blocks():
            fused = block.attn.c_attn
            if isinstance(fused, FusedProjections):
                parts = [fused.q, fused.k, fused.v]
                conv = Conv1D(sum(p.weight.shape[1] for p in parts), parts[0].weight.shape[0])
                conv.weight.data = torch.cat([p.weight.detach() for p in parts], dim=1).clone()
                conv.bias.data = torch.cat([p.bias.detach() for p in parts]).clone()
                block.attn.c_attn = conv

    def _to_projection(self, native: nn.Module) -> Projection:
        return Projection(native.weight.detach(), native.bias.detach())

    def _to_native(self, proj: Projection) -> nn.Module:
        conv = Conv1D(proj.d_out, proj.d_in)
        conv.weight.data = proj.dense_weight().clone()
        conv.bias.data = proj.bias.detach().clone()
        return conv
