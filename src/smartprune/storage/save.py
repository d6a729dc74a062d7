"""Writing a compressed model: the compact folder (`save`) and the plain Hugging Face folder with the
compressed weights materialized (`write_dense`). The format itself is in `smartprune.storage.format`."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from smartprune.adapters import get_adapter
from smartprune.errors import OutputError, did_you_mean
from smartprune.files import atomic_dir, sha256, write_json
from smartprune.modules.head import LowRankHead
from smartprune.modules.masked import ColumnFoldedProjection, FoldedProjection, Maskable, Projection
from smartprune.modules.packed import quantize
from smartprune.storage.format import (
    DTYPES,
    FORMAT,
    MANIFEST,
    QUANTIZED_VERSION,
    TENSORS,
    VERSION,
    channel_axis,
    index_dtype,
    pack_bits,
    sparse_encoding,
)


def _encode_masked(name: str, w: Tensor, mask: Tensor, dtype: torch.dtype, axis: int
                   ) -> tuple[dict, dict[str, Tensor]]:
    rec = {"kind": "masked", "shape": list(mask.shape)}
    extra: dict[str, Tensor] = {}
    if dtype == torch.int8 and mask.dim() == 2:
        q, scale = quantize(w, axis)
        values = q[mask].contiguous()
        rec["quant"] = {"bits": 8, "axis": axis}
        extra[f"{name}.weight.scale"] = scale
    else:
        values = w.detach()[mask].to(torch.float32 if dtype == torch.int8 else dtype).contiguous()
    enc = sparse_encoding(tuple(mask.shape), values.numel(), values.element_size()) if mask.dim() == 2 else "bitmask"
    rec["encoding"] = enc
    if enc == "bitmask":
        return rec, {f"{name}.weight.values": values, f"{name}.weight.mask": pack_bits(mask.cpu()), **extra}
    counts = mask.sum(1)
    indptr = torch.zeros(mask.shape[0] + 1, dtype=torch.int32)
    indptr[1:] = counts.cumsum(0).to(torch.int32)
    indices = mask.nonzero()[:, 1].to(index_dtype(mask.shape[1])).contiguous()
    return rec, {f"{name}.weight.values": values, f"{name}.weight.indices": indices, f"{name}.weight.indptr": indptr,
                 **extra}


def _encode_plain(model: nn.Module, key: str, t: Tensor, dtype: torch.dtype, quantized: dict[str, int]
                  ) -> dict[str, Tensor]:
    """One unmasked tensor in the stored dtype; in int8, a weight matrix with its scales."""
    if not t.is_floating_point():
        return {key: t.detach().contiguous()}
    if dtype != torch.int8:
        return {key: t.to(dtype).detach().contiguous()}
    if t.dim() == 2 and t.numel() and key.endswith("weight"):
        axis = channel_axis(model.get_submodule(key.rpartition(".")[0]))
        q, scale = quantize(t, axis)
        quantized[key] = axis
        return {key: q.contiguous(), f"{key}.scale": scale}
    return {key: t.detach().float().contiguous()}


def _encode(model: nn.Module, dtype: torch.dtype = torch.float32
            ) -> tuple[dict[str, Tensor], dict[str, dict], dict[str, str], dict[str, int]]:
    """Tensors to store, per-module structure records, tied-tensor aliases (key -> stored key), and
    the unmasked 8-bit weights with their channel axis."""
    modules: dict[str, dict] = {}
    quantized: dict[str, int] = {}
    skip: set[str] = set()
    tensors: dict[str, Tensor] = {}
    seen: dict[tuple[int, int, tuple], str] = {}
    aliases: dict[str, str] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, FoldedProjection):
            modules[name] = {"kind": "folded", "d_in": mod.d_in, "d_out": mod.d_out}
        elif isinstance(mod, ColumnFoldedProjection):
            modules[name] = {"kind": "folded_columns", "d_in": mod.d_in, "d_out": mod.d_out}
        elif isinstance(mod, Projection):  # its shape may differ from the config's (whole neurons removed)
            modules[name] = {"kind": "projection", "d_in": mod.d_in, "d_out": mod.d_out, "bias": mod.bias is not None}
        elif isinstance(mod, LowRankHead):
            modules[name] = {"kind": "low_rank", "d_in": mod.down.in_features, "d_out": mod.up.out_features,
                             "rank": mod.rank, "bias": mod.up.bias is not None}
        if isinstance(mod, Maskable) and mod.mask is not None:
            rec, stored = _encode_masked(name, mod.weight, mod.mask, dtype, channel_axis(mod))
            modules[name] = {**rec, **modules.get(name, {})}  # a projection keeps its kind and shape
            tensors.update(stored)
            skip |= {f"{name}.weight", f"{name}.mask"}
            w = mod.weight
            seen[(w.data_ptr(), w.numel(), tuple(w.shape))] = f"{name}.weight"  # a tied head aliases it
    for key, t in model.state_dict(keep_vars=False).items():
        if key in skip:
            continue
        ident = (t.data_ptr(), t.numel(), tuple(t.shape))
        if t.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors.update(_encode_plain(model, key, t, dtype, quantized))
    return tensors, modules, aliases, quantized


def save(model: nn.Module, out: str | os.PathLike, *, tokenizer=None, report: dict | None = None,
         overwrite: bool = False, dtype: str = "float32") -> Path:
    """Write compressed `model` to folder `out` (see the module docstring for the layout)."""
    if dtype not in DTYPES:
        raise OutputError(f"unknown dtype '{dtype}'{did_you_mean(dtype, DTYPES)}; known: {', '.join(DTYPES)}")
    out = Path(out)
    _check_not_structured(model)
    # the format stores a model's layers as smartprune's modules lay them out (what `load` rebuilds): a model
    # never compressed (plain nn.Linear layers, e.g. the dense model re-encoded in int8) is converted first
    get_adapter(model)
    tensors, modules, aliases, quantized = _encode(model, DTYPES[dtype])
    manifest = {"format": FORMAT, "version": QUANTIZED_VERSION if dtype == "int8" else VERSION,
                "model_type": model.config.model_type, "dtype": dtype, "modules": modules, "aliases": aliases}
    if quantized:
        manifest["quantized"] = quantized
    with atomic_dir(out, overwrite) as tmp:
        model.config.save_pretrained(tmp)
        # One metadata key: safetensors writes metadata in hash order, so two keys vary between runs.
        save_file(tensors, str(tmp / TENSORS), metadata={"format": FORMAT})
        manifest["sha256"] = {TENSORS: sha256(tmp / TENSORS)}
        write_json(tmp / MANIFEST, manifest)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            write_json(tmp / "report.json", report)
    return out


def _check_not_structured(model: nn.Module) -> None:
    from smartprune.modules.structured import STRUCTURED_MODULES

    if any(isinstance(m, STRUCTURED_MODULES) for m in model.modules()):
        raise OutputError("this model runs structured inference modules; save the model as compressed "
                          "(or load it with structured=False) instead")


def plain_model(model: nn.Module) -> nn.Module:
    """A copy of `model` as the plain Hugging Face model its config describes: every compressed weight
    materialized (zeros, identical rows, diagonals) into the family's own layers."""
    _check_not_structured(model)
    dense = copy.deepcopy(model)
    adapter = get_adapter(dense)
    sizes = adapter.block_sizes()
    for key, values in sizes.items():
        if len(values) > 1:
            raise OutputError(f"blocks have different {key} {sorted(values)} after structured pruning; a plain "
                              "Hugging Face config holds one value, so only the compressed format can store this")
    adapter.sync_config()
    adapter.materialize()
    head = dense.get_output_embeddings()
    if isinstance(head, LowRankHead):  # a plain Linear holding up @ down (config already untied)
        dense.set_output_embeddings(head.to_linear())
    return dense


def write_dense(model: nn.Module, out: str | os.PathLike, *, tokenizer=None, overwrite: bool = False) -> Path:
    """Write a plain Hugging Face folder of `model` (`plain_model`) that vanilla ``from_pretrained`` loads."""
    out = Path(out)
    dense = plain_model(model)
    with atomic_dir(out, overwrite) as tmp:
        dense.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out
