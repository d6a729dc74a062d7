"""Writing a standard model as GGUF (llama.cpp's format), with the `gguf` package llama.cpp ships,
as llama.cpp's own converter (``convert_hf_to_gguf.py``) writes the same model saved as a folder.

Only a model that a standard config describes can be written (one width per kind for every block:
what the structured stages and the plain Hugging Face export produce). What the converter writes,
this writes too, and tests compare the two files key by key and byte by byte (tests/test_llamacpp.py):
tensor names from the `gguf` package's name map, Llama's Q and K rows permuted as llama.cpp expects,
the per-family size keys; ``general.*`` from `gguf.Metadata` (name, basename, size label: the model's
name, never a local path); the tokenizer's vocabulary and token types, its llama.cpp pre-tokenizer name
(``tokenizer.ggml.pre``, without which llama.cpp splits text another way), merges, special ids, the
add-BOS flag and chat template (`gguf.SpecialVocab`). One key more than the converter: where it leaves
``add_bos_token`` to llama.cpp's default, this writes what the tokenizer does.

Types: ``f32``, ``f16``, ``bf16``, ``q8_0`` (vectors stay f32; a matrix whose rows a block cannot hold
falls back to f16, as in the converter) and ``q4_0`` (the token table and output head at q8_0: llama.cpp's
own quantizer keeps them wider too). k-quants (``q4_k``...) the `gguf` package cannot write: refused in
one line (llama.cpp's ``llama-quantize`` makes them from an f16 file). Families: Llama (SmolLM2), Qwen 3
and Gemma 3 (whose norms llama.cpp stores as ``1 + w``, the scale Gemma applies).

GGUF carries sizes, not every setting: readers take the rest from the family's defaults (transformers:
Qwen 3's head size 128, Gemma 3's query scale 256 and its five-local-one-global layer pattern; llama.cpp:
Gemma 3's queries scaled by the head size). `check_gguf_shape` refuses a config a reader would rebuild
differently instead of writing a file that loads into another model.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from smartprune.errors import OutputError
from smartprune.files import disk_full, no_space

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "bf16": 32}  # gguf.LlamaFileType
# types llama.cpp has that the gguf package cannot quantize to (its own llama-quantize makes them)
NOT_WRITABLE = ("q4_k", "q4_k_m", "q4_k_s", "q5_k", "q5_k_m", "q6_k", "q2_k", "q3_k", "iq4_xs")
ARCHITECTURES = {"llama": "LLAMA", "qwen3": "QWEN3", "gemma3_text": "GEMMA3"}  # model_type -> gguf.MODEL_ARCH
NORM_OFFSET = {"gemma3_text": 1.0}  # llama.cpp stores these families' RMSNorm weights as 1 + w


def check_gguf(model_type: str, gguf_type: str) -> None:
    """Refuse, before any work, what this writer cannot write (one line)."""
    if gguf_type.lower() in NOT_WRITABLE:
        raise OutputError(f"--gguf-type {gguf_type}: the gguf package cannot write this type; write f16 and run "
                          f"llama.cpp's llama-quantize on it (written here: {', '.join(GGUF_TYPES)})")
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
    if config.model_type == "gemma3_text" and config.head_dim != config.query_pre_attn_scalar:
        raise OutputError(f"GGUF export of gemma3_text with heads of {config.head_dim}: llama.cpp scales its queries "
                          f"by the head size, transformers by query_pre_attn_scalar ({config.query_pre_attn_scalar}); "
                          "use --dense-out")
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


# A token table and output head stay at 8 bits in a 4-bit file: llama.cpp's own quantizer keeps them
# wider too (it picks 6-bit k-quants, which the gguf package cannot write).
WIDE_AT_4_BITS = ("token_embd.weight", "output.weight")


def _tensor(writer, name: str, data: np.ndarray, gguf_type: str) -> None:
    """One tensor at the type llama.cpp's converter gives it: vectors in f32, matrices at `gguf_type`,
    and f16 where a quantized type cannot hold a row (its length not a multiple of the block)."""
    import gguf

    if data.ndim == 1 or gguf_type == "f32":
        writer.add_tensor(name, data.astype(np.float32))
        return
    kind = "q8_0" if gguf_type == "q4_0" and name in WIDE_AT_4_BITS else gguf_type
    qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
    try:
        writer.add_tensor(name, gguf.quants.quantize(data.astype(np.float32), qtype), raw_dtype=qtype)
    except gguf.QuantError:
        writer.add_tensor(name, data.astype(np.float16))


def _config(writer, config, gguf_type: str) -> None:
    """The model's sizes, as llama.cpp's converter writes them for the same config."""
    from smartprune.adapters.layout import head_sizes

    heads, kv, hd = head_sizes(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    if getattr(config, "head_dim", None) is not None:  # the converter writes these only when the config does
        writer.add_key_length(hd)
        writer.add_value_length(hd)
    writer.add_rope_freq_base(_rope_theta(config))
    local = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention", {}).get("rope_theta")
    if local is not None:  # Gemma 3's local layers have their own rotary base
        writer.add_rope_freq_base_swa(float(local))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    if config.model_type == "llama":  # the converter writes these for Llama only (others take them from tensors)
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(hd)
    writer.add_file_type(FILE_TYPES[gguf_type])
    if getattr(config, "sliding_window", None) and "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        writer.add_sliding_window(config.sliding_window)


# llama.cpp's name for a byte-level BPE pre-tokenizer (`tokenizer.ggml.pre`), told from what the
# tokenizer does: GPT-2's split, or the same with one token per digit ("smollm"). llama.cpp's converter
# tells the two apart by the ids of a check text, so a vocabulary without multi-digit tokens (SmolLM2's,
# rebuilt by transformers' GGUF reader without its Digits step) is "smollm" there too; a test compares
# ours with the converter's. Without the right name llama.cpp splits text another way: other tokens.
def _pre_tokenizer(tokenizer, spec: dict) -> str | None:
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if spec.get("normalizer") is not None or kinds[-1:] != ["ByteLevel"] or not parts[-1].get("use_regex", True):
        return None
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds != ["ByteLevel"]:
        return None
    multi_digit = any(re.search("[0-9]{2}", token) for token in tokenizer.get_vocab())
    return "gpt-2" if multi_digit else "smollm"


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts a text with its BOS token (llama.cpp must do the same)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def check_tokenizer(tokenizer) -> str | None:
    """Refuse, before any work, a tokenizer this writer cannot write as llama.cpp reads it (one line);
    returns its llama.cpp pre-tokenizer name (None without a tokenizer)."""
    if tokenizer is None:
        return None
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise OutputError("GGUF export writes byte-level BPE tokenizers (GPT-2, SmolLM2); this one is "
                          f"{spec['model']['type']} without byte-level pre-tokenization: use --dense-out and "
                          "llama.cpp's convert_hf_to_gguf.py")
    pre = _pre_tokenizer(tokenizer, spec)
    if pre is None:
        raise OutputError("GGUF export: this tokenizer's pre-tokenizer is not one whose llama.cpp name this writer "
                          "knows (gpt-2, smollm), and a wrong one gives other tokens in llama.cpp: use --dense-out "
                          "and llama.cpp's convert_hf_to_gguf.py")
    return pre


def _looks_special(token: str) -> bool:
    """Added tokens llama.cpp treats as control tokens although the tokenizer does not mark them special."""
    return (token in ("<pad>", "<mask>") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _tokenizer(writer, tokenizer, pre: str, model_type: str, vocab_size: int, folder: Path) -> None:
    """Vocabulary, token types, pre-tokenizer, merges, special ids, add-BOS/EOS flags and chat template
    of a byte-level BPE tokenizer saved in `folder`; the last four through the gguf package's own reader
    (`gguf.SpecialVocab`, which llama.cpp's converter uses too)."""
    import gguf

    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            special = decoder[i].special or _looks_special(token)
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    if model_type == "llama" and settings.get("add_prefix_space") is not None:  # the converter's Llama does
        writer.add_add_space_prefix(settings["add_prefix_space"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True)
    special.add_to_gguf(writer, quiet=True)
    if "bos" not in special.add_special_token:  # else llama.cpp picks a default per vocabulary type
        writer.add_add_bos_token(_adds_bos(tokenizer))


def _folder_name(name: str) -> str:
    """A folder name for `name` (the gguf package reads basename, size and fine-tune from it)."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip(".-") or "model"


def _save_sources(model: nn.Module, tokenizer, folder: Path) -> None:
    """What llama.cpp's converter reads besides the weights: config, generation settings, tokenizer."""
    folder.mkdir(parents=True)
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _tensors(writer, model: nn.Module, gguf_type: str) -> None:
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, ARCHITECTURES[config.model_type]),
                                     config.num_hidden_layers)
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


def export_name(model: str, recipe: str) -> str:
    """The GGUF file's ``general.name``: the model as the user named it (a folder's or file's name, a hub
    id's last part, a built-in name) and the recipe; never a local path."""
    ref = Path(model).expanduser()
    return f"{ref.stem if ref.suffix == '.gguf' else ref.name}-{Path(recipe).stem}"


def write_gguf(model: nn.Module, path: str | os.PathLike, *, tokenizer=None, gguf_type: str = "f16",
               name: str | None = None) -> Path:
    """Write `model` (a plain Hugging Face model of a standard config) to the GGUF file `path`
    (written beside it under a temporary name, then renamed), with the metadata llama.cpp's converter
    writes for the same model saved in a folder called `name` (``general.name``; default: the file's
    stem, never a local path)."""
    import gguf

    config = model.config
    check_gguf(config.model_type, gguf_type)
    check_gguf_shape(config)
    pre = check_tokenizer(tokenizer)
    path = Path(path).expanduser()
    name = name or path.stem
    arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[config.model_type])
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
    try:
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch) / _folder_name(name)
            _save_sources(model, tokenizer, folder)
            _tensors(writer, model, gguf_type)
            total, shared, experts, count = writer.get_total_parameter_count()
            meta = gguf.Metadata.load(None, folder, name, total)
            if meta.size_label is None and total > 0:
                meta.size_label = gguf.size_label(total, shared, experts, count)
            writer.add_type(gguf.GGUFType.MODEL)
            meta.set_gguf_meta_model(writer)
            _config(writer, config, gguf_type)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            if tokenizer is not None:
                _tokenizer(writer, tokenizer, pre, config.model_type, config.vocab_size, folder)
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
