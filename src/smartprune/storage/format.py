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
Reading a folder back is `smartprune.storage.load.load`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from smartprune.errors import ArtifactError
from smartprune.files import read_json
from smartprune.modules.masked import ColumnFoldedProjection, FoldedProjection, Projection

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
















def pack_bits(mask: Tensor) -> Tensor:
    return torch.from_numpy(np.packbits(mask.flatten().numpy()))


def index_dtype(n: int) -> torch.dtype:
    return torch.int16 if n <= 2**15 else torch.int32


def sparse_encoding(shape: tuple[int, int], alive: int, value_bytes: int) -> str:
    """The smaller of bitmask and CSR for a matrix of `shape` with `alive` stored entries."""
    rows, cols = shape
    bitmask = alive * value_bytes + (rows * cols + 7) // 8
    csr = alive * (value_bytes + index_dtype(cols).itemsize) + (rows + 1) * 4
    return "csr" if csr < bitmask else "bitmask"


def channel_axis(module: nn.Module) -> int:
    """The output-channel axis of a module's weight: columns for ``d_in x d_out`` layouts
    (`Projection`, GPT-2's ``Conv1D``), rows for ``nn.Linear`` and embedding tables."""
    return 1 if isinstance(module, Projection | Conv1D) else 0












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
    _check_total(file, modules)
    aliases = manifest.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        raise ArtifactError(f"{file}: 'aliases' is not an object of tensor names")
    quantized = manifest.get("quantized", {})
    if not isinstance(quantized, dict) or not all(v in (0, 1) for v in quantized.values()):
        raise ArtifactError(f"{file}: 'quantized' is not an object of tensor names and axes 0 or 1")
    return manifest


def _check_total(file: Path, modules: dict) -> None:
    """The values the manifest's modules would allocate (float32), within this machine's memory: a
    damaged or hand-edited shape is one line, not an attempt at a TiB."""
    from smartprune.hf import physical_memory

    values = 0
    for rec in modules.values():
        shape = rec.get("shape") or [rec.get("d_in", 1), rec.get("d_out", 1)]
        n = 1
        for d in shape:
            n *= d
        values += n
    have = physical_memory()
    if have and 4 * values > have:
        raise ArtifactError(f"{file}: its modules' shapes ask for {4 * values / 2**30:,.1f} GiB of float32 values, "
                            f"more than this machine's {have / 2**30:,.1f} GiB (a damaged or hand-edited manifest?)")


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


