"""Saving and loading compressed models.

A compressed-model folder holds:

- ``config.json``: the base model's Hugging Face config;
- ``smartprune.json``: format name and version, model type, and each compressed module's structure;
- ``model.safetensors``: the tensors. A masked matrix is stored as its surviving values (row-major)
  plus either its mask packed 8 entries to a byte (``bitmask``) or CSR column indices and row
  pointers (``csr``), whichever takes fewer bytes at its sparsity (CSR wins only above ~94%
  sparsity with 16-bit indices); a folded (IRC) matrix as its shared vector and its unfolded rows
  (kind ``folded``; ``folded_columns`` for the column reading: the shared column and unfolded columns);
  a projection made smaller by structured pruning (whole neurons removed) as its smaller dense
  matrix; a low-rank output head (kind ``low_rank``) as its two factors; everything else as is.
  Floating-point tensors are stored in the chosen ``dtype`` (float32, float16 or bfloat16). With
  ``int8`` every weight matrix (its surviving values, when masked) is stored as symmetric 8-bit
  integers with one float32 scale per output channel (``<tensor>.scale``; the record's ``quant`` or
  the manifest's ``quantized`` names the axis), and the other floating-point tensors (norms, biases,
  IRC vectors) as float32. Tied tensors are stored once;
- the tokenizer files, when the model has a tokenizer, and ``report.json`` from the run.

``smartprune.json`` also records the SHA-256 of ``model.safetensors``; `load` verifies it, so flipped
bytes are refused rather than evaluated. The same model and seed give a byte-identical
``model.safetensors``, and output files get the permissions the user's umask gives.

`write_dense` instead writes a plain Hugging Face folder with every compressed weight materialized.
Every folder is written under a temporary name beside its target and moved into place at the end.
Reading a folder back is `smartprune.loader.load`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from smartprune.adapters import get_adapter
from smartprune.compact import quantize
from smartprune.errors import ArtifactError, OutputError, did_you_mean
from smartprune.head import LowRankHead
from smartprune.nn import ColumnFoldedProjection, FoldedProjection, Maskable, Projection
from smartprune.paths import apply_umask, read_json, umask

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}

FORMAT = "smartprune"
VERSION = 2
QUANTIZED_VERSION = 3  # 8-bit values (their scales, the "quant" records) need a reader of version 3
READABLE = (1, 2, 3)  # version 1: bitmask only, float32, no resized projections; the loader reads it unchanged
MANIFEST = "smartprune.json"
TENSORS = "model.safetensors"
KINDS = ("masked", "folded", "folded_columns", "projection", "low_rank")
# folded kind -> (module, stored positions, the axis they index, the shared vector's length): the two IRC readings
FOLDED_KINDS = {"folded": (FoldedProjection, "folded_rows", "d_in", "d_out"),
                "folded_columns": (ColumnFoldedProjection, "folded_cols", "d_out", "d_in")}
ENCODINGS = ("bitmask", "csr")


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse an output location that already holds something, unless `overwrite`; refuse always a
    location whose replacement would delete what is not ours: the file-system root, the home folder,
    the current folder or one of its ancestors (``.``, ``..``)."""
    path = Path(path)
    resolved, cwd = path.expanduser().resolve(), Path.cwd().resolve()
    if resolved == Path(resolved.anchor) or resolved == Path.home().resolve() or cwd.is_relative_to(resolved):
        raise OutputError(f"refusing output folder {path}: it is the root, the home folder, or the current "
                          "folder or one of its parents; name a new folder")
    if path.exists() and not path.is_dir():
        raise OutputError(f"output {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputError(f"output folder {path} is not empty (use --overwrite to replace it)")
    parent = resolved.parent
    while not parent.exists():  # the folders still to be made go into the nearest existing one
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write output folder {path}: {parent} is not a writable folder")


def check_outputs_apart(*paths: Path | str | None) -> None:
    """Refuse two locations of one run (outputs, the input model) that are equal or nested."""
    named = [Path(p).expanduser().resolve() for p in paths if p is not None]
    for i, a in enumerate(named):
        for b in named[i + 1:]:
            if a == b or a.is_relative_to(b) or b.is_relative_to(a):
                raise OutputError(f"{a} and {b} overlap: an output may not be, contain or lie inside the other "
                                  "output or the input model")


@contextmanager
def atomic_dir(target: Path, overwrite: bool):
    """Yield a temporary folder beside `target`; move it into place only if the block succeeds. An
    existing `target` is moved aside first and deleted only once the new one is in place, so no
    failure loses both."""
    check_output(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = None
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
        apply_umask(tmp)
        os.replace(tmp, target)
    except BaseException:
        if old is not None and not target.exists():
            os.replace(old / target.name, target)  # put the previous output back
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder and move it into place (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it private; the user's umask decides
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, default=float) + "\n")


def write_results(folder: Path, stem: str, data: dict, markdown: str) -> None:
    """A measurement as ``folder/stem.json`` and its readable twin ``folder/stem.md`` (benchmark scripts)."""
    write_json(folder / f"{stem}.json", data)
    write_text(folder / f"{stem}.md", markdown)


def _pack(mask: Tensor) -> Tensor:
    return torch.from_numpy(np.packbits(mask.flatten().numpy()))


def _unpack(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    n = int(np.prod(shape))
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=n).astype(bool)).view(shape)


def _index_dtype(n: int) -> torch.dtype:
    return torch.int16 if n <= 2**15 else torch.int32


def _sparse_encoding(shape: tuple[int, int], alive: int, value_bytes: int) -> str:
    """The smaller of bitmask and CSR for a matrix of `shape` with `alive` stored entries."""
    rows, cols = shape
    bitmask = alive * value_bytes + (rows * cols + 7) // 8
    csr = alive * (value_bytes + _index_dtype(cols).itemsize) + (rows + 1) * 4
    return "csr" if csr < bitmask else "bitmask"


def channel_axis(module: nn.Module) -> int:
    """The output-channel axis of a module's weight: columns for ``d_in x d_out`` layouts
    (`Projection`, GPT-2's ``Conv1D``), rows for ``nn.Linear`` and embedding tables."""
    return 1 if isinstance(module, Projection | Conv1D) else 0


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
    enc = _sparse_encoding(tuple(mask.shape), values.numel(), values.element_size()) if mask.dim() == 2 else "bitmask"
    rec["encoding"] = enc
    if enc == "bitmask":
        return rec, {f"{name}.weight.values": values, f"{name}.weight.mask": _pack(mask.cpu()), **extra}
    counts = mask.sum(1)
    indptr = torch.zeros(mask.shape[0] + 1, dtype=torch.int32)
    indptr[1:] = counts.cumsum(0).to(torch.int32)
    indices = mask.nonzero()[:, 1].to(_index_dtype(mask.shape[1])).contiguous()
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
    from smartprune.inference import STRUCTURED_MODULES

    if any(isinstance(m, STRUCTURED_MODULES) for m in model.modules()):
        raise OutputError("this model runs structured inference modules; save the model as compressed "
                          "(or load it with structured=False) instead")


def read_manifest(path: Path) -> dict:
    """The manifest, checked field by field so a damaged one is one line, not a traceback later."""
    file = path / MANIFEST
    manifest = read_json(file, "manifest", ArtifactError)
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a smartprune folder (format {manifest.get('format')!r})")
    if manifest.get("version") not in READABLE:
        raise ArtifactError(f"{path} has format version {manifest.get('version')!r}; this smartprune reads "
                            f"versions {', '.join(map(str, READABLE))}")
    modules = manifest.get("modules")
    if not isinstance(modules, dict):
        raise ArtifactError(f"{file}: 'modules' is missing or not an object")
    for name, rec in modules.items():
        _check_record(file, name, rec)
    aliases = manifest.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        raise ArtifactError(f"{file}: 'aliases' is not an object of tensor names")
    quantized = manifest.get("quantized", {})
    if not isinstance(quantized, dict) or not all(v in (0, 1) for v in quantized.values()):
        raise ArtifactError(f"{file}: 'quantized' is not an object of tensor names and axes 0 or 1")
    return manifest


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _check_record(file: Path, name: str, rec) -> None:
    where = f"{file}: module '{name}'"
    if not isinstance(rec, dict) or rec.get("kind") not in KINDS:
        raise ArtifactError(f"{where} has no known kind ({', '.join(KINDS)})")
    if rec["kind"] != "masked" and not (_positive_int(rec.get("d_in")) and _positive_int(rec.get("d_out"))):
        raise ArtifactError(f"{where}: d_in and d_out must be positive whole numbers")
    if rec["kind"] == "low_rank" and not _positive_int(rec.get("rank")):
        raise ArtifactError(f"{where}: a low-rank head needs a positive whole rank")
    if rec["kind"] == "masked" and "shape" not in rec:
        raise ArtifactError(f"{where}: a masked module needs a shape")
    if "shape" in rec:
        shape = rec["shape"]
        if not isinstance(shape, list) or len(shape) not in (1, 2) or not all(map(_positive_int, shape)):
            raise ArtifactError(f"{where}: shape {shape!r} is not a list of one or two positive whole numbers")
        if rec.get("encoding", "bitmask") not in ENCODINGS or (rec.get("encoding") == "csr" and len(shape) != 2):
            raise ArtifactError(f"{where}: unknown encoding {rec.get('encoding')!r}")
    if "quant" in rec and (rec["quant"] != {"bits": 8, "axis": (rec["quant"] or {}).get("axis")}
                           or rec["quant"]["axis"] not in (0, 1) or len(rec.get("shape", [])) != 2):
        raise ArtifactError(f"{where}: quant {rec['quant']!r} is not 8 bits along axis 0 or 1 of a matrix")


def write_dense(model: nn.Module, out: str | os.PathLike, *, tokenizer=None, overwrite: bool = False) -> Path:
    """Write a plain Hugging Face folder of `model` with every compressed weight materialized
    (zeros, identical rows, diagonals) that vanilla ``from_pretrained`` loads."""
    out = Path(out)
    _check_not_structured(model)
    dense = copy.deepcopy(model)
    adapter = get_adapter(dense)
    sizes = {adapter.ff_intermediate_size(i) for i in range(len(adapter.blocks()))}
    if len(sizes) > 1:
        raise OutputError(f"feed-forward blocks have different sizes {sorted(sizes)} after structured pruning; a "
                          "plain Hugging Face config holds one size, so only the compressed format can store this")
    setattr(dense.config, adapter.ff_size_key, sizes.pop())
    adapter.materialize()
    head = dense.get_output_embeddings()
    if isinstance(head, LowRankHead):  # a plain Linear holding up @ down (config already untied)
        dense.set_output_embeddings(head.to_linear())
    with atomic_dir(out, overwrite) as tmp:
        dense.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out
