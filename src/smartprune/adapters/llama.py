"""Llama-layout models: Llama, Mistral, Qwen2 (``nn.Linear`` layers, RoPE, grouped-query attention,
gated feed-forward, optionally tied input/output embeddings)."""

from __future__ import annotations

from torch import Tensor, nn

from smartprune.adapters.base import Adapter, positions
from smartprune.nn import Projection


class LlamaAdapter(Adapter):
    model_types = ("llama", "mistral", "qwen2")

    def blocks(self) -> nn.ModuleList:
        return self.model.model.layers

    def embedding_paths(self) -> list[str]:
        return ["model.embed_tokens"]

    def attention_paths(self, i: int) -> dict[str, str]:
        p = f"model.layers.{i}.self_attn"
        return {"q": f"{p}.q_proj", "k": f"{p}.k_proj", "v": f"{p}.v_proj", "o": f"{p}.o_proj"}

    def ff_paths(self, i: int) -> dict[str, str]:
        p = f"model.layers.{i}.mlp"
        return {"gate": f"{p}.gate_proj", "up": f"{p}.up_proj", "down": f"{p}.down_proj"}

    def embed(self, ids: Tensor) -> Tensor:
        return self.model.model.embed_tokens(ids)

    def attn_norm(self, i: int) -> nn.Module:
        return self.blocks()[i].input_layernorm

    def ff_norm(self, i: int) -> nn.Module:
        return self.blocks()[i].post_attention_layernorm

    def attention(self, i: int, x: Tensor) -> Tensor:
        # RoPE tables are cheap to rebuild; attention_mask=None makes SDPA causal.
        rope = self.model.model.rotary_emb(x, positions(x))
        return self.blocks()[i].self_attn(x, position_embeddings=rope, attention_mask=None)[0]

    def attention_module_path(self, i: int) -> str:
        return f"model.layers.{i}.self_attn"

    def rotary(self) -> nn.Module | None:
        return self.model.model.rotary_emb

    def head(self, h: Tensor) -> Tensor:
        return self.model.lm_head(self.model.model.norm(h))

    def _to_projection(self, native: nn.Module) -> Projection:
        return Projection(native.weight.detach().t(), None if native.bias is None else native.bias.detach())

    def _to_native(self, proj: Projection) -> nn.Module:
        lin = nn.Linear(proj.d_in, proj.d_out, bias=proj.bias is not None)
        lin.weight.data = proj.dense_weight().t().contiguous().clone()
        if proj.bias is not None:
            lin.bias.data = proj.bias.detach().clone()
        return lin
