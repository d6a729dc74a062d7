"""Writing a standard model as GGUF (llama.cpp's format), with the `gguf` package llama.cpp ships.

Only a model that a standard config describes can be written (one width per kind for every block:
what the structured stages and the plain Hugging Face export produce); its tensors are named with
the `gguf` package's own name map, Q and K of Llama are permuted the way llama.cpp's converter
permutes them (transformers' GGUF reader undoes it), and the tokenizer goes in as its vocabulary,
merges and special tokens. Types: ``f32``, ``f16``, ``bf16`` (matrices; norms stay f32, as llama.cpp
keeps them) and ``q8_0`` (8-bit blocks of 32 with one scale each; a matrix whose rows are not a
multiple of 32 stays f16, as llama.cpp's converter does). Families whose GGUF round trip through
transformers' reader is checked here: Llama (SmolLM2), Qwen 3 and Gemma 3 (whose norms llama.cpp
stores as ``1 + w``, the scale Gemma applies).

GGUF carries sizes, not every setting: transformers' reader takes the rest from the family's defaults
(Qwen 3's head size 128; Gemma 3's query scale 256 and its five-local-one-global layer pattern).
`check_gguf_shape` refuses a config the reader would rebuild differently instead of writing a file
that loads into another model.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from smartprune.errors import OutputError
from smartprune.files import disk_full, no_space

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
ARCHITECTURES = {"llama": "LLAMA", "qwen3": "QWEN3", "gemma3_text": "GEMMA3"}  # model_type -> gguf.MODEL_ARCH
NORM_OFFSET = {"gemma3_text": 1.0}  # llama.cpp stores these families' RMSNorm weights as 1 + w


def check_gguf(model_type: str, gguf_type: str) -> None:
    """Refuse, before any work, what this writer cannot write (one line)."""
    if gguf_type not in GGUF_TYPES:
        raise OutputError(f"--gguf-type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    if model_type not in ARCHITECTURES:
        raise OutputError(f"GGUF export is written and checked for {', '.join(ARCHITECTURES)} only, not "
                          f"'{model_type}'; use --dense-out (a standard Hugging Face folder)")


def check_gguf_shape(config, stages: Iterable[str] = ()) -> None:
    """Refuse a config the GGUF readers would rebuild differently (before the work, with the recipe's
    `stages`, and again after the model is compressed, before writing)."""
    if config.model_type == "qwen3" and config.head_dim != 128:
        raise OutputError(f"GGUF export of qwen3 with heads of {config.head_dim}: transformers' GGUF reader does not "
                          "read the head size of qwen3 and takes 128 (every released Qwen 3); use --dense-out")
    if config.model_type == "gemma3_text":
        default = type(config)(num_hidden_layers=config.num_hidden_layers)  # what the reader fills in
        for key in ("query_pre_attn_scalar", "layer_types", "final_logit_softcapping", "attn_logit_softcapping"):
            if getattr(config, key) != getattr(default, key):
                raise OutputError(f"GGUF export of gemma3_text: its {key} ({getattr(config, key)}) is not in the "
                                  f"file and transformers' GGUF reader would take {getattr(default, key)}; use "
                                  "--dense-out")
        local = config.rope_parameters.get("sliding_attention", {})
        if local.get("rope_theta") != default.rope_parameters["sliding_attention"]["rope_theta"] or any(
                p.get("rope_type", "default") != "default" for p in config.rope_parameters.values()):
            raise OutputError("GGUF export of gemma3_text: its local rotary base or rope scaling is not in the file "
                              "and transformers' GGUF reader would take the defaults; use --dense-out")
    if config.model_type == "gemma3_text" and "depth" in stages:  # the settings first: they fail whatever the recipe
        raise OutputError("--gguf-out: stage 'depth' changes gemma3_text's pattern of local and global layers, which "
                          "a GGUF file does not carry; use --dense-out")


def _rope_theta(config) -> float:
    """The (global) rotary base: one entry, or the full-attention layers' one where each layer type has its own."""
    params = getattr(config, "rope_parameters", None)
    if not params:
        return float(config.rope_theta)
    return float(params.get("full_attention", params)["rope_theta"])


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order for Llama (rotary pairs interleaved per head)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor(writer, name: str, data: np.ndarray, gguf_type: str) -> None:
    import gguf

    if data.ndim == 1 or gguf_type == "f32":
        writer.add_tensor(name, data.astype(np.float32))
    elif gguf_type == "q8_0" and data.shape[-1] % 32 == 0:
        q = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(data.astype(np.float32), q), raw_dtype=q)
    elif gguf_type == "bf16":
        q = gguf.GGMLQuantizationType.BF16
        writer.add_tensor(name, gguf.quants.quantize(data.astype(np.float32), q), raw_dtype=q)
    else:
        writer.add_tensor(name, data.astype(np.float16))


def _config(writer, config) -> None:
    from smartprune.adapters.layout import head_sizes

    heads, kv, hd = head_sizes(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    writer.add_rope_dimension_count(hd)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    if getattr(config, "sliding_window", None) and "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        writer.add_sliding_window(config.sliding_window)


def _tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """Vocabulary, merges and special tokens of a byte-level BPE tokenizer (GPT-2, SmolLM2, Qwen)."""
    import json

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise OutputError("GGUF export writes byte-level BPE tokenizers (GPT-2, SmolLM2, Qwen); this one is "
                          f"{spec['model']['type']} without byte-level pre-tokenization: use --dense-out")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else (5 if i not in by_id else 1) for i in range(vocab_size)])
    merges = spec["model"].get("merges", [])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for key, ident in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id)):
        if ident is not None:
            getattr(writer, f"add_{key}_token_id")(ident)


def write_gguf(model: nn.Module, path: str | os.PathLike, *, tokenizer=None, gguf_type: str = "f16") -> Path:
    """Write `model` (a plain Hugging Face model of a standard config) to the GGUF file `path`
    (written beside it under a temporary name, then renamed)."""
    import gguf

    config = model.config
    check_gguf(config.model_type, gguf_type)
    check_gguf_shape(config)
    path = Path(path).expanduser()
    arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[config.model_type])
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
    try:
        writer.add_name(str(getattr(config, "_name_or_path", "") or "smartprune model"))
        writer.add_file_type({"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}[gguf_type])
        _config(writer, config)
        if tokenizer is not None:
            _tokenizer(writer, tokenizer, config.vocab_size)
        heads, kv = config.num_attention_heads, config.num_key_value_heads
        for hf_name, tensor in model.state_dict().items():
            if hf_name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise OutputError(f"GGUF export: no GGUF name for tensor {hf_name}")
            data = tensor.detach().to(torch.float32).cpu().numpy()
            if name.endswith("norm.weight"):
                data = data + NORM_OFFSET.get(config.model_type, 0.0)
            if config.model_type == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
                data = _permute(data, heads if "attn_q" in name else kv)
            _tensor(writer, name, data, gguf_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # closing a file the disk could not hold fails again
            writer.close()
        tmp.unlink(missing_ok=True)
        if disk_full(exc):
            raise no_space(path) from None
        raise
    return path
