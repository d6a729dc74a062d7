"""The adapter table: one `Layout` per ``config.model_type``, the one place that knows where each
family keeps its layers. Families not listed get the generic adapter (baselines only).

Quirks, each said here and nowhere else:
- GPT-2: ``Conv1D`` layers (``d_in x d_out``), Q/K/V fused in ``c_attn``, a learned position table.
- Llama, Mistral (sliding window: the model's own mask is replayed), Qwen 2 (Q/K/V biases).
- Qwen 3 and Gemma 3: per-head RMS norms after Q and K (`HeadNorm` in structured inference).
- Gemma 3: norms after each sublayer's output, the embedding scaled by sqrt(hidden) (kept by
  `MaskedEmbedding`), sliding-window and global layers with their own RoPE frequencies
  (`LayoutAdapter.rope` reads them per layer type), a tied head.
- Phi-3: fused ``qkv_proj`` (q, k, v one after another) and ``gate_up_proj``.
- OPT: learned positions with an offset (a table with its own forward: not FPP-pruned, the token
  table is), ``fc1``/``fc2`` directly in the block, biases, optional ``project_in``/``project_out``;
  post-norm OPT (``do_layer_norm_before=False``, OPT-350m) is refused for the paper's methods.
- GPT-NeoX / Pythia: fused ``query_key_value`` laid out per head, partial rotary (fewer RoPE
  frequencies than head_dim / 2), a parallel residual.
"""

from __future__ import annotations

from torch import Tensor, nn

from smartprune.adapters.layout import Fused, Layout

_LLAMA_ATTENTION = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"}
_GATED_FF = {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}

_LLAMA = Layout(
    blocks="model.layers", embeddings=("model.embed_tokens",), attention_module="self_attn",
    attention=_LLAMA_ATTENTION, ff=_GATED_FF, attn_norm="input_layernorm", ff_norm="post_attention_layernorm",
    final=("model.norm", "lm_head"), rotary="model.rotary_emb",
)

_QWEN3 = Layout(
    blocks="model.layers", embeddings=("model.embed_tokens",), attention_module="self_attn",
    attention=_LLAMA_ATTENTION, ff=_GATED_FF, attn_norm="input_layernorm", ff_norm="post_attention_layernorm",
    final=("model.norm", "lm_head"), rotary="model.rotary_emb", qk_norm=("q_norm", "k_norm"),
)

_GEMMA3 = Layout(
    blocks="model.layers", embeddings=("model.embed_tokens",), attention_module="self_attn",
    attention=_LLAMA_ATTENTION, ff=_GATED_FF, attn_norm="input_layernorm", ff_norm="pre_feedforward_layernorm",
    post_attn_norm="post_attention_layernorm", post_ff_norm="post_feedforward_layernorm",
    final=("model.norm", "lm_head"), rotary="model.rotary_emb", qk_norm=("q_norm", "k_norm"),
)

_PHI3 = Layout(
    blocks="model.layers", embeddings=("model.embed_tokens",), attention_module="self_attn",
    attention={"q": "self_attn.qkv_proj.q", "k": "self_attn.qkv_proj.k", "v": "self_attn.qkv_proj.v",
               "o": "self_attn.o_proj"},
    ff={"gate": "mlp.gate_up_proj.gate", "up": "mlp.gate_up_proj.up", "down": "mlp.down_proj"},
    fused=(Fused("self_attn.qkv_proj", ("q", "k", "v")), Fused("mlp.gate_up_proj", ("gate", "up"))),
    attn_norm="input_layernorm", ff_norm="post_attention_layernorm", final=("model.norm", "lm_head"),
    rotary="model.rotary_emb",
)


def _opt_feed_forward(block: nn.Module, x: Tensor) -> Tensor:
    return block.fc2(block.activation_fn(block.fc1(x)))


_OPT = Layout(
    blocks="model.decoder.layers", embeddings=("model.decoder.embed_tokens",), attention_module="self_attn",
    attention={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj"},
    ff={"fc1": "fc1", "fc2": "fc2"}, ff_module=None, feed_forward=_opt_feed_forward,
    attn_norm="self_attn_layer_norm", ff_norm="final_layer_norm",
    final=("model.decoder.final_layer_norm", "model.decoder.project_out?", "lm_head"), ff_size_key="ffn_dim",
    requires=(("do_layer_norm_before", True, "a post-norm block (norm after the residual), which the "
               "sublayer-wise compression does not model"),),
)

_GPT_NEOX = Layout(
    blocks="gpt_neox.layers", embeddings=("gpt_neox.embed_in",), attention_module="attention",
    attention={"q": "attention.query_key_value.q", "k": "attention.query_key_value.k",
               "v": "attention.query_key_value.v", "o": "attention.dense"},
    ff={"up": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h"},
    fused=(Fused("attention.query_key_value", ("q", "k", "v"), per_head=True),),
    attn_norm="input_layernorm", ff_norm="post_attention_layernorm", final=("gpt_neox.final_layer_norm", "lm_head"),
    rotary="gpt_neox.rotary_emb", parallel_residual="use_parallel_residual",
)

_GPT2 = Layout(
    blocks="transformer.h", embeddings=("transformer.wte", "transformer.wpe"), attention_module="attn",
    attention={"q": "attn.c_attn.q", "k": "attn.c_attn.k", "v": "attn.c_attn.v", "o": "attn.c_proj"},
    ff={"c_fc": "mlp.c_fc", "c_proj": "mlp.c_proj"}, fused=(Fused("attn.c_attn", ("q", "k", "v")),), conv1d=True,
    attn_norm="ln_1", ff_norm="ln_2", final=("transformer.ln_f", "lm_head"), ff_size_key="n_inner",
)

LAYOUTS: dict[str, Layout] = {
    "gpt2": _GPT2,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _QWEN3,
    "gemma3_text": _GEMMA3,
    "phi3": _PHI3,
    "opt": _OPT,
    "gpt_neox": _GPT_NEOX,
}
