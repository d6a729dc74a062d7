"""Saving and loading compressed models.

A compressed-model folder holds:

- ``config.json``: the base model's Hugging Face config;
- ``smartprune.json``: format name and version, model type, and each compressed module's structure;
- ``model.safetensors``: the tensors. A masked matrix is stored as its surviving values (row-major)
  plus its mask packed 8 entries to a byte; a folded (IRC) matrix as its shared vector and its
  unfolded rows; everything else as is. Tied tensors are stored once;
- the tokenizer files, when the model has a tokenizer, and ``report.json`` from the run.

`write_dense` instead writes a plain Hugging Face folder with every compressed weight materialized.
Every folder is written under a temporary name beside its target and moved into place at the end.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from smartprune.adapters import get_adapter
from smartprune.errors import ArtifactError, OutputError
from smartprune.nn import FoldedProjection, Maskable

FORMAT = "smartprune"
VERSION = 1
MANIFEST = "smartprune.json"
TENSORS = "model.safetensors"


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse an output location that already holds something, unless `overwrite`."""
    if path.exists() and not path.is_dir():
        raise OutputError(f"output {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputError(f"output folder {path} is not empty (use --overwrite to replace it)")


@contextmanager
def atomic_dir(target: Path, overwrite: bool):
    """Yield a temporary folder beside `target`; move it into place only if the block succeeds."""
    check_output(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder and move it into place (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, default=float) + "\n")


def _pack(mask: Tensor) -> Tensor:
    return torch.from_numpy(np.packbits(mask.flatten().numpy()))


def _unpack(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    n = int(np.prod(shape))
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=n).astype(bool)).view(shape)


def _encode(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, dict], dict[str, str]]:
    """Tensors to store, per-module structure records, and tied-tensor aliases (key -> stored key)."""
    modules: dict[str, dict] = {}
    skip: set[str] = set()
    tensors: dict[str, Tensor] = {}
    seen: dict[tuple[int, int, tuple], str] = {}
    aliases: dict[str, str] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, FoldedProjection):
            modules[name] = {"kind": "folded", "d_in": mod.d_in, "d_out": mod.d_out}
        if isinstance(mod, Maskable) and mod.mask is not None:
            modules.setdefault(name, {"kind": "masked"})["shape"] = list(mod.weight.shape)
            tensors[f"{name}.weight.values"] = mod.weight.detach()[mod.mask].contiguous()
            tensors[f"{name}.weight.mask"] = _pack(mod.mask.cpu())
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
        tensors[key] = t.detach().contiguous()
    return tensors, modules, aliases


def save(model: nn.Module, out: str | os.PathLike, *, tokenizer=None, report: dict | None = None,
         overwrite: bool = False) -> Path:
    """Write compressed `model` to folder `out` (see the module docstring for the layout)."""
    out = Path(out)
    tensors, modules, aliases = _encode(model)
    manifest = {"format": FORMAT, "version": VERSION, "model_type": model.config.model_type,
                "modules": modules, "aliases": aliases}
    with atomic_dir(out, overwrite) as tmp:
        model.config.save_pretrained(tmp)
        save_file(tensors, str(tmp / TENSORS), metadata={"format": FORMAT, "version": str(VERSION)})
        write_json(tmp / MANIFEST, manifest)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            write_json(tmp / "report.json", report)
    return out


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        raise ArtifactError(f"{path / MANIFEST} is missing or not valid JSON") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a smartprune folder (format {manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        raise ArtifactError(f"{path} has format version {manifest.get('version')!r}; this smartprune reads "
                            f"version {VERSION}")
    return manifest


def _tensor(tensors: dict[str, Tensor], key: str, path: Path) -> Tensor:
    if key not in tensors:
        raise ArtifactError(f"{path / TENSORS} lacks tensor '{key}' named by {MANIFEST}")
    return tensors[key]


def load(path: str | os.PathLike) -> nn.Module:
    """Load a folder written by `save` (``smartprune compress --out``) into a ready model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"compressed model folder not found: {path}")
    manifest = _read_manifest(path)
    try:
        tensors = load_file(str(path / TENSORS))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{path / TENSORS} is missing, truncated or corrupt ({exc})") from None
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config._attn_implementation = "sdpa"
    adapter = get_adapter(model)
    state: dict[str, Tensor] = {}
    for name, rec in manifest["modules"].items():
        if rec["kind"] == "folded":
            folded = torch.zeros(rec["d_in"], dtype=torch.bool)
            folded[_tensor(tensors, f"{name}.folded_rows", path)] = True
            q = _tensor(tensors, f"{name}.q", path)
            bias = tensors.get(f"{name}.bias")
            adapter.replace(name, FoldedProjection(torch.zeros(rec["d_in"], rec["d_out"]), bias, folded, q))
        if "shape" in rec:
            mask = _unpack(_tensor(tensors, f"{name}.weight.mask", path), tuple(rec["shape"]))
            weight = torch.zeros(rec["shape"])
            weight[mask] = _tensor(tensors, f"{name}.weight.values", path)
            state[f"{name}.weight"] = weight
            state[f"{name}.mask"] = mask
            model.get_submodule(name).mask = mask
    for key, t in tensors.items():
        if not key.endswith((".weight.values", ".weight.mask")):
            state[key] = t
    for key, target in manifest.get("aliases", {}).items():
        state[key] = state[target] if target in state else _tensor(tensors, target, path)
    _load_state(model, state, path)
    return model.eval()


def _load_state(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise ArtifactError(f"{path / TENSORS} lacks tensor '{missing[0]}'" +
                            (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    for key, t in state.items():
        if key in expected and tuple(expected[key].shape) != tuple(t.shape):
            raise ArtifactError(f"tensor '{key}' has shape {tuple(t.shape)}, expected {tuple(expected[key].shape)}")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True)


def write_dense(model: nn.Module, out: str | os.PathLike, *, tokenizer=None, overwrite: bool = False) -> Path:
    """Write a plain Hugging Face folder of `model` with every compressed weight materialized
    (zeros, identical rows, diagonals) that vanilla ``from_pretrained`` loads."""
    out = Path(out)
    dense = copy.deepcopy(model)
    get_adapter(dense).materialize()
    with atomic_dir(out, overwrite) as tmp:
        dense.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out
