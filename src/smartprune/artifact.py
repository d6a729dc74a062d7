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
  matrix; everything else as is. Floating-point tensors are stored in the chosen ``dtype``
  (float32, float16 or bfloat16) and loaded as float32. Tied tensors are stored once;
- the tokenizer files, when the model has a tokenizer, and ``report.json`` from the run.

``smartprune.json`` also records the SHA-256 of ``model.safetensors``; `load` verifies it, so flipped
bytes are refused rather than evaluated. The same model and seed give a byte-identical
``model.safetensors``, and output files get the permissions the user's umask gives.

`write_dense` instead writes a plain Hugging Face folder with every compressed weight materialized.
Every folder is written under a temporary name beside its target and moved into place at the end.
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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from smartprune.adapters import get_adapter
from smartprune.errors import ArtifactError, OutputError, did_you_mean
from smartprune.nn import ColumnFoldedProjection, FoldedProjection, Maskable, Projection, report_non_finite
from smartprune.paths import apply_umask, read_json, umask

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

FORMAT = "smartprune"
VERSION = 2
READABLE = (1, 2)  # version 1: bitmask only, float32, no resized projections; the loader reads it unchanged
MANIFEST = "smartprune.json"
TENSORS = "model.safetensors"
KINDS = ("masked", "folded", "folded_columns", "projection")
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


def _encode_masked(name: str, w: Tensor, mask: Tensor, dtype: torch.dtype) -> tuple[dict, dict[str, Tensor]]:
    values = w.detach()[mask].to(dtype).contiguous()
    enc = _sparse_encoding(tuple(mask.shape), values.numel(), values.element_size()) if mask.dim() == 2 else "bitmask"
    rec = {"kind": "masked", "shape": list(mask.shape), "encoding": enc}
    if enc == "bitmask":
        return rec, {f"{name}.weight.values": values, f"{name}.weight.mask": _pack(mask.cpu())}
    counts = mask.sum(1)
    indptr = torch.zeros(mask.shape[0] + 1, dtype=torch.int32)
    indptr[1:] = counts.cumsum(0).to(torch.int32)
    indices = mask.nonzero()[:, 1].to(_index_dtype(mask.shape[1])).contiguous()
    return rec, {f"{name}.weight.values": values, f"{name}.weight.indices": indices, f"{name}.weight.indptr": indptr}


def _encode(model: nn.Module, dtype: torch.dtype = torch.float32
            ) -> tuple[dict[str, Tensor], dict[str, dict], dict[str, str]]:
    """Tensors to store, per-module structure records, and tied-tensor aliases (key -> stored key)."""
    modules: dict[str, dict] = {}
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
        if isinstance(mod, Maskable) and mod.mask is not None:
            rec, stored = _encode_masked(name, mod.weight, mod.mask, dtype)
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
        tensors[key] = (t.to(dtype) if t.is_floating_point() else t).detach().contiguous()
    return tensors, modules, aliases


def save(model: nn.Module, out: str | os.PathLike, *, tokenizer=None, report: dict | None = None,
         overwrite: bool = False, dtype: str = "float32") -> Path:
    """Write compressed `model` to folder `out` (see the module docstring for the layout)."""
    if dtype not in DTYPES:
        raise OutputError(f"unknown dtype '{dtype}'{did_you_mean(dtype, DTYPES)}; known: {', '.join(DTYPES)}")
    out = Path(out)
    _check_not_structured(model)
    tensors, modules, aliases = _encode(model, DTYPES[dtype])
    manifest = {"format": FORMAT, "version": VERSION, "model_type": model.config.model_type, "dtype": dtype,
                "modules": modules, "aliases": aliases}
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
    return manifest


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _check_record(file: Path, name: str, rec) -> None:
    where = f"{file}: module '{name}'"
    if not isinstance(rec, dict) or rec.get("kind") not in KINDS:
        raise ArtifactError(f"{where} has no known kind ({', '.join(KINDS)})")
    if rec["kind"] != "masked" and not (_positive_int(rec.get("d_in")) and _positive_int(rec.get("d_out"))):
        raise ArtifactError(f"{where}: d_in and d_out must be positive whole numbers")
    if rec["kind"] == "masked" and "shape" not in rec:
        raise ArtifactError(f"{where}: a masked module needs a shape")
    if "shape" in rec:
        shape = rec["shape"]
        if not isinstance(shape, list) or len(shape) not in (1, 2) or not all(map(_positive_int, shape)):
            raise ArtifactError(f"{where}: shape {shape!r} is not a list of one or two positive whole numbers")
        if rec.get("encoding", "bitmask") not in ENCODINGS or (rec.get("encoding") == "csr" and len(shape) != 2):
            raise ArtifactError(f"{where}: unknown encoding {rec.get('encoding')!r}")


def _verify(path: Path, manifest: dict) -> None:
    """Compare the stored SHA-256 (folders written before checksums were recorded have none)."""
    expected = manifest.get("sha256", {}).get(TENSORS) if isinstance(manifest.get("sha256"), dict) else None
    if expected is None:
        return
    if sha256(path / TENSORS) != expected:
        raise ArtifactError(f"{path / TENSORS} does not match the checksum in {MANIFEST}: the file was changed "
                            "or damaged after it was written (load with verify=False to read it anyway)")


def _indices(tensors: dict[str, Tensor], key: str, size: int, path: Path) -> Tensor:
    """Stored positions (folded rows or columns), each within [0, size)."""
    idx = _tensor(tensors, key, path).long()
    if idx.dim() != 1 or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size)):
        raise ArtifactError(f"tensor '{key}' holds positions outside [0, {size})")
    return idx


def _vector(tensors: dict[str, Tensor], key: str, size: int, path: Path) -> Tensor:
    v = _tensor(tensors, key, path)
    if tuple(v.shape) != (size,):
        raise ArtifactError(f"tensor '{key}' has shape {tuple(v.shape)}, expected ({size},)")
    return v.float()


def _tensor(tensors: dict[str, Tensor], key: str, path: Path) -> Tensor:
    if key not in tensors:
        raise ArtifactError(f"{path / TENSORS} lacks tensor '{key}' named by {MANIFEST}")
    return tensors[key]


def load(path: str | os.PathLike, *, structured: bool = True, verify: bool = True) -> nn.Module:
    """Load a folder written by `save` (``smartprune compress --out``) into a ready model.

    ``structured`` (default) swaps in the modules that run the structure instead of its zeros
    (`smartprune.structure.use_structure`); ``False`` gives the modules compression works on (what
    `save`, further compression and `write_dense` need). ``verify`` checks the weights file against
    the SHA-256 in the manifest."""
    from transformers import AutoModelForCausalLM

    from smartprune.loading import read_config, use_sdpa

    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"compressed model folder not found: {path}")
    manifest = read_manifest(path)
    config = read_config(path)
    if verify:
        _verify(path, manifest)
    try:
        tensors = load_file(str(path / TENSORS))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{path / TENSORS} is missing, truncated or corrupt ({exc})") from None
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    use_sdpa(model)
    adapter = get_adapter(model)
    names = {n for n, _ in model.named_modules()}
    state: dict[str, Tensor] = {}
    for name, rec in manifest["modules"].items():
        if name not in names:
            raise ArtifactError(f"{path / MANIFEST} names module '{name}', which a {config.model_type} model lacks")
        if rec["kind"] in FOLDED_KINDS:
            cls, positions, folded_axis, q_axis = FOLDED_KINDS[rec["kind"]]
            folded = torch.zeros(rec[folded_axis], dtype=torch.bool)
            folded[_indices(tensors, f"{name}.{positions}", rec[folded_axis], path)] = True
            q = _vector(tensors, f"{name}.q", rec[q_axis], path)
            bias = tensors.get(f"{name}.bias")
            adapter.replace(name, cls(torch.zeros(rec["d_in"], rec["d_out"]), None if bias is None else bias.float(),
                                      folded, q))
        elif rec["kind"] == "projection":
            adapter.replace(name, Projection(torch.zeros(rec["d_in"], rec["d_out"]),
                                             torch.zeros(rec["d_out"]) if rec["bias"] else None))
        if "shape" in rec:
            mask = _decode_mask(tensors, name, rec, path)
            weight = torch.zeros(rec["shape"])
            values = _tensor(tensors, f"{name}.weight.values", path)
            if values.numel() != int(mask.sum()):
                raise ArtifactError(f"tensor '{name}.weight.values' holds {values.numel()} values, its mask "
                                    f"{int(mask.sum())}")
            weight[mask] = values.float()
            state[f"{name}.weight"] = weight
            state[f"{name}.mask"] = mask
            model.get_submodule(name).mask = mask
    for key, t in tensors.items():
        if not key.endswith((".weight.values", ".weight.mask", ".weight.indices", ".weight.indptr")):
            state[key] = t.float() if t.is_floating_point() else t
    for key, target in manifest.get("aliases", {}).items():
        state[key] = state[target] if target in state else _tensor(tensors, target, path)
    _load_state(model, state, path)
    report_non_finite(model, str(path))
    if structured:
        from smartprune.structure import use_structure

        use_structure(model)
    return model.eval()


def _decode_mask(tensors: dict[str, Tensor], name: str, rec: dict, path: Path) -> Tensor:
    shape = tuple(rec["shape"])
    if rec.get("encoding", "bitmask") == "bitmask":
        return _unpack(_tensor(tensors, f"{name}.weight.mask", path), shape)
    indptr = _tensor(tensors, f"{name}.weight.indptr", path).long()
    indices = _tensor(tensors, f"{name}.weight.indices", path).long()
    if indptr.numel() != shape[0] + 1 or int(indptr[-1]) != indices.numel():
        raise ArtifactError(f"CSR tensors of '{name}' do not match its shape {shape}")
    rows = torch.repeat_interleave(torch.arange(shape[0]), indptr.diff())
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[rows, indices] = True
    return mask


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
    _check_not_structured(model)
    dense = copy.deepcopy(model)
    adapter = get_adapter(dense)
    sizes = {adapter.ff_intermediate_size(i) for i in range(len(adapter.blocks()))}
    if len(sizes) > 1:
        raise OutputError(f"feed-forward blocks have different sizes {sorted(sizes)} after structured pruning; a "
                          "plain Hugging Face config holds one size, so only the compressed format can store this")
    setattr(dense.config, adapter.ff_size_key, sizes.pop())
    adapter.materialize()
    with atomic_dir(out, overwrite) as tmp:
        dense.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out
