"""Reading a compressed-model folder (`smartprune.storage.format` writes it) back into a model.

The model is built with its parameters on the ``meta`` device (shapes, no memory), then each stored
tensor is put in place, so a full-size dense model never exists on the way. Two residencies:

- ``compact`` (the default for inference): what the file keeps stays that size in memory. Pruned
  matrices stay surviving values + packed mask (or CSR), in the stored dtype (8-bit ones with their
  scales), and are unpacked per product (`smartprune.modules.packed`); a tied head shares its embedding's
  packed table. Folded IRC rows are vectors and diagonals vectors in either residency.
- ``dense``: every matrix unpacked once, in float32, with its mask beside it: the modules compression
  and retraining edit, and the fastest forward (nothing to unpack per call).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from smartprune.adapters import get_adapter, paper_methods_unsupported
from smartprune.errors import ArtifactError
from smartprune.files import sha256
from smartprune.hf import read_config, use_sdpa
from smartprune.modules.head import LowRankHead
from smartprune.modules.masked import Projection, report_non_finite
from smartprune.modules.packed import PackedEmbedding, PackedLinear, PackedMatrix, PackedProjection, Quant, dequantize
from smartprune.paths import switch
from smartprune.storage.format import DTYPES, FOLDED_KINDS, MANIFEST, TENSORS, read_manifest

RESIDENT = ("compact", "dense")
_COMPACT_KEYS = (".weight.values", ".weight.mask", ".weight.indices", ".weight.indptr", ".weight.scale")
# the tensors stored as integers: masks, CSR positions, and which rows/columns a folded projection shares
_INTEGER_KEYS = (".weight.mask", ".weight.indices", ".weight.indptr", ".free_rows", ".folded_rows", ".free_cols",
                 ".folded_cols")


def check_dtypes(manifest: dict, tensors: dict[str, Tensor], path: Path) -> None:
    """Every tensor in the precision the manifest declares: floating values in its dtype (float32 beside
    8-bit values, which only the matrices it records as quantized hold), integers only where the format
    stores integers. A file edited to hold other types would otherwise be cast silently on load."""
    name = manifest.get("dtype", "float32")
    floating = torch.float32 if name == "int8" else DTYPES.get(name)
    if floating is None:
        raise ArtifactError(f"{path / MANIFEST} declares dtype '{name}'; known: {', '.join(DTYPES)}")
    quantized, modules = manifest.get("quantized", {}), manifest["modules"]
    for key, t in tensors.items():
        if t.is_floating_point():
            ok = t.dtype == floating
        elif t.dtype == torch.int8:  # a dense matrix listed as quantized, or a masked one whose record says so
            ok = key in quantized or "quant" in modules.get(key.removesuffix(".weight.values"), {})
        else:
            ok = key.endswith(_INTEGER_KEYS)
        if not ok:
            raise ArtifactError(f"{path / TENSORS}: tensor '{key}' is {str(t.dtype).removeprefix('torch.')}, but "
                                f"{MANIFEST} declares {name} values; the folder was damaged or edited")


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create every parameter registered inside the block on the meta device (no memory); buffers
    stay real, so the ones a model computes at construction (RoPE's frequencies) are right.

    accelerate's ``init_empty_weights(include_buffers=False)`` does the same but wraps a parameter
    that is already on meta (a tie: head = embedding) into a new Parameter, which unties the head
    (tests/test_compact.py shows it); hence this short twin."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:  # a meta one is a tie (head = embedding): kept as is
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def load(path: str | os.PathLike, *, structured: bool = True, verify: bool | None = None,
         resident: str | None = None) -> nn.Module:
    """Load a folder written by `save` (``smartprune compress --out``) into a ready model.

    ``structured`` (default) swaps in the modules that run the structure instead of its zeros
    (`smartprune.adapters.install.use_structure`); ``False`` gives the modules compression works on (what
    `save`, further compression, retraining and `write_dense` need). ``resident``: ``"compact"``
    (the default when structured) or ``"dense"`` (see the module docstring; measured trade-off in
    docs/compact-results.md). ``verify`` checks the weights file against the manifest's SHA-256 and refuses a
    manifest without one (default: on, unless ``$SMARTPRUNE_VERIFY`` is 0: the CLI's ``--no-verify``)."""
    from transformers import AutoModelForCausalLM

    resident = resident or ("compact" if structured else "dense")
    if resident not in RESIDENT:
        raise ArtifactError(f"unknown residency '{resident}'; expected {' or '.join(RESIDENT)}")
    if resident == "compact" and not structured:
        raise ArtifactError("resident='compact' runs inference only; structured=False (editable modules) needs "
                            "resident='dense'")
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"compressed model folder not found: {path}")
    manifest = read_manifest(path)
    config = read_config(path)
    if not (path / TENSORS).is_file():
        raise ArtifactError(f"{path / TENSORS} is missing: the compressed folder is incomplete")
    if verify is None:
        verify = switch("SMARTPRUNE_VERIFY") != "0"
    if verify:
        _verify(path, manifest)
    try:
        tensors = load_file(str(path / TENSORS))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{path / TENSORS} is missing, truncated or corrupt ({exc})") from None
    check_dtypes(manifest, tensors, path)
    # The generic adapter finds its layers with one forward pass, which needs real weights.
    on_meta = paper_methods_unsupported(config) is None
    with parameters_on_meta() if on_meta else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    use_sdpa(model)
    _Reader(model, manifest, tensors, path, compact=resident == "compact").read()
    report_non_finite(model, str(path))
    if structured:
        from smartprune.adapters.install import use_structure

        use_structure(model)
    return model.eval()


class _Reader:
    """Puts one folder's tensors into a model built on the meta device."""

    def __init__(self, model: nn.Module, manifest: dict, tensors: dict[str, Tensor], path: Path,
                 compact: bool) -> None:
        # An empty tensor from safetensors may keep a stale data pointer that another tensor reuses,
        # which torch.save (retraining checkpoints) refuses: empty ones are made afresh.
        tensors = {k: torch.empty(t.shape, dtype=t.dtype) if t.numel() == 0 else t for k, t in tensors.items()}
        self.model, self.manifest, self.tensors, self.path, self.compact = model, manifest, tensors, path, compact
        self.adapter = get_adapter(model)
        self.state: dict[str, Tensor] = {}
        self.packed: dict[str, PackedMatrix] = {}  # weight key -> its packed matrix (compact residency)

    def read(self) -> None:
        names = {n for n, _ in self.model.named_modules()}
        for name, rec in self.manifest["modules"].items():
            if name not in names:
                raise ArtifactError(f"{self.path / MANIFEST} names module '{name}', which a "
                                    f"{self.model.config.model_type} model lacks")
            self._structure(name, rec)
            if "shape" in rec:
                self._masked(name, rec)
        quantized = self.manifest.get("quantized", {})
        for key, t in self.tensors.items():
            if key.endswith(_COMPACT_KEYS) or (key.endswith(".scale") and key.removesuffix(".scale") in quantized):
                continue
            if key in quantized:
                self._plain_quantized(key, t, quantized[key])
            elif self.compact and t.dim() == 2 and t.dtype in (torch.float16, torch.bfloat16) and self._packable(key):
                self._pack(key, PackedMatrix(tuple(t.shape), t.flatten()))  # a 16-bit matrix stays 16-bit
            else:
                self.state[key] = t.float() if t.is_floating_point() else t
        for key, target in self.manifest.get("aliases", {}).items():
            if target in self.packed:
                self._pack(key, self.packed[target])  # a tied head shares its embedding's packed table
            else:
                self.state[key] = self.state[target] if target in self.state else self._tensor(target)
        self._fill()

    def _structure(self, name: str, rec: dict) -> None:
        """Modules whose shape or kind differs from the config's: folded (IRC) and resized ones."""
        if rec["kind"] in FOLDED_KINDS:
            cls, positions, folded_axis, q_axis = FOLDED_KINDS[rec["kind"]]
            folded = torch.zeros(rec[folded_axis], dtype=torch.bool)
            folded[self._indices(f"{name}.{positions}", rec[folded_axis])] = True
            q = self._vector(f"{name}.q", rec[q_axis])
            bias = self.tensors.get(f"{name}.bias")
            self.adapter.replace(name, cls(torch.zeros(rec["d_in"], rec["d_out"]),
                                           None if bias is None else bias.float(), folded, q))
        elif rec["kind"] == "low_rank":
            with parameters_on_meta():
                self.adapter.replace(name, LowRankHead(rec["d_in"], rec["d_out"], rec["rank"], bool(rec.get("bias"))))
        elif rec["kind"] == "projection":
            self.adapter.replace(name, Projection(torch.empty(rec["d_in"], rec["d_out"], device="meta"),
                                                  torch.empty(rec["d_out"], device="meta") if rec["bias"] else None))

    def _masked(self, name: str, rec: dict) -> None:
        key = f"{name}.weight"
        expected = getattr(self.model.get_submodule(name), "weight", None)
        if expected is not None and tuple(rec["shape"]) != tuple(expected.shape):  # before anything is allocated
            raise ArtifactError(f"{self.path / MANIFEST}: module '{name}' is recorded with shape {rec['shape']}, its "
                                f"model's is {list(expected.shape)}")
        values = self._tensor(f"{key}.values")
        quant = rec.get("quant")
        scale = self._tensor(f"{key}.scale").float() if quant else None
        # A diagonal (one value per column, DWC's V) is smaller as structured inference's own module.
        if self.compact and len(rec["shape"]) == 2 and values.numel() > rec["shape"][1] and self._packable(key):
            self._pack(key, self._packed_matrix(name, rec, values, scale, quant))
            return
        mask = self._mask(name, rec)
        if values.numel() != int(mask.sum()):
            raise ArtifactError(f"tensor '{key}.values' holds {values.numel()} values, its mask {int(mask.sum())}")
        weight = torch.zeros(rec["shape"])
        weight[mask] = values.float()
        self.state[key] = weight if quant is None else dequantize(weight, scale, quant["axis"])
        self.state[f"{name}.mask"] = mask

    def _plain_quantized(self, key: str, q: Tensor, axis: int) -> None:
        scale = self._tensor(f"{key}.scale").float()
        if tuple(scale.shape) != (q.shape[axis],):
            raise ArtifactError(f"tensor '{key}.scale' has shape {tuple(scale.shape)}, expected ({q.shape[axis]},)")
        if self.compact and self._packable(key):
            self._pack(key, PackedMatrix(tuple(q.shape), q.flatten(), scale=scale, quant=Quant(axis)))
        else:
            self.state[key] = dequantize(q, scale, axis)

    def _packed_matrix(self, name: str, rec: dict, values: Tensor, scale: Tensor | None,
                       quant: dict | None) -> PackedMatrix:
        shape = tuple(rec["shape"])
        pieces = {"bits": self._tensor(f"{name}.weight.mask")} if rec.get("encoding", "bitmask") == "bitmask" else \
            {"indptr": self._tensor(f"{name}.weight.indptr"), "indices": self._tensor(f"{name}.weight.indices")}
        if "bits" in pieces and pieces["bits"].numel() != (shape[0] * shape[1] + 7) // 8:
            raise ArtifactError(f"tensor '{name}.weight.mask' does not cover shape {shape}")
        if "indptr" in pieces:
            self._check_csr(name, shape, pieces["indptr"], pieces["indices"])
        if scale is not None and tuple(scale.shape) != (shape[quant["axis"]],):
            raise ArtifactError(f"tensor '{name}.weight.scale' has shape {tuple(scale.shape)}, expected "
                                f"({shape[quant['axis']]},)")
        try:
            return PackedMatrix(shape, values, scale=scale, quant=None if quant is None else Quant(quant["axis"]),
                                **pieces)
        except ValueError as exc:
            raise ArtifactError(f"tensor '{name}.weight.values': {exc}") from None

    def _packable(self, key: str) -> bool:
        """Whether the layer holding the matrix `key` has a packed twin (one of the known layer types)."""
        module = self.model.get_submodule(key.rpartition(".")[0])
        return key.endswith(".weight") and (
            type(module) is Projection or isinstance(module, nn.Embedding | nn.Linear | Conv1D))

    def _pack(self, key: str, packed: PackedMatrix) -> None:
        """Replace the layer holding weight `key` by its packed twin."""
        path = key.rpartition(".")[0]
        module = self.model.get_submodule(path)
        expected = tuple(module.weight.shape)
        if expected != packed.shape:
            raise ArtifactError(f"tensor '{key}' has shape {packed.shape}, expected {expected}")
        bias = getattr(module, "bias", None)
        if isinstance(module, nn.Embedding):
            twin = PackedEmbedding(packed, getattr(module, "embed_scale", None))
        elif isinstance(module, nn.Linear):
            twin = PackedLinear(packed, bias)
        else:  # a Projection or Conv1D: x @ W with W stored d_in x d_out
            twin = PackedProjection(packed, bias)
        self.adapter.replace(path, twin)
        self.packed[key] = packed

    def _fill(self) -> None:
        """Each stored tensor into its place; a parameter shared by several modules (a tied head)
        gets one new parameter at every place; whatever is still on the meta device is missing."""
        # Keyed by id: the originals stay referenced here, so no id is reused while filling.
        owners: dict[int, tuple[nn.Parameter, list[tuple[nn.Module, str]]]] = {}
        for module in self.model.modules():
            for n, p in module._parameters.items():
                if p is not None:
                    owners.setdefault(id(p), (p, []))[1].append((module, n))
        filled: dict[int, nn.Parameter] = {}
        for key, t in self.state.items():
            path, _, attr = key.rpartition(".")
            try:
                module = self.model.get_submodule(path)
            except AttributeError:
                continue
            old = module._parameters.get(attr)
            if old is not None and id(old) in filled:
                continue  # a tied tensor's second name (an alias): its one parameter is in place
            if old is not None:
                if tuple(old.shape) != tuple(t.shape):
                    raise ArtifactError(f"tensor '{key}' has shape {tuple(t.shape)}, expected {tuple(old.shape)}")
                new = nn.Parameter(t, requires_grad=old.requires_grad)
                filled[id(new)] = new
                for owner, name in owners[id(old)][1] if id(old) in owners else [(module, attr)]:
                    owner._parameters[name] = new
            elif attr in module._buffers:
                buf = module._buffers[attr]
                if buf is not None and tuple(buf.shape) != tuple(t.shape):
                    raise ArtifactError(f"tensor '{key}' has shape {tuple(t.shape)}, expected {tuple(buf.shape)}")
                module._buffers[attr] = t
        missing = [n for n, p in self.model.named_parameters(remove_duplicate=False) if p.is_meta]
        if missing:
            raise ArtifactError(f"{self.path / TENSORS} lacks tensor '{missing[0]}'" +
                                (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))

    # ---- reading single tensors, checked ------------------------------------------------------------
    def _tensor(self, key: str) -> Tensor:
        if key not in self.tensors:
            raise ArtifactError(f"{self.path / TENSORS} lacks tensor '{key}' named by {MANIFEST}")
        return self.tensors[key]

    def _indices(self, key: str, size: int) -> Tensor:
        """Stored positions (folded rows or columns), each within [0, size)."""
        idx = self._tensor(key).long()
        if idx.dim() != 1 or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size)):
            raise ArtifactError(f"tensor '{key}' holds positions outside [0, {size})")
        return idx

    def _vector(self, key: str, size: int) -> Tensor:
        v = self._tensor(key)
        if tuple(v.shape) != (size,):
            raise ArtifactError(f"tensor '{key}' has shape {tuple(v.shape)}, expected ({size},)")
        return v.float()

    def _check_csr(self, name: str, shape: tuple[int, ...], indptr: Tensor, indices: Tensor) -> None:
        if indptr.numel() != shape[0] + 1 or int(indptr[-1]) != indices.numel() or (
                indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= shape[1])):
            raise ArtifactError(f"CSR tensors of '{name}' do not match its shape {shape}")

    def _mask(self, name: str, rec: dict) -> Tensor:
        shape = tuple(rec["shape"])
        if rec.get("encoding", "bitmask") == "bitmask":
            packed = self._tensor(f"{name}.weight.mask")
            n = int(np.prod(shape))
            return torch.from_numpy(np.unpackbits(packed.numpy(), count=n).astype(bool)).view(shape)
        indptr, indices = self._tensor(f"{name}.weight.indptr").long(), self._tensor(f"{name}.weight.indices").long()
        self._check_csr(name, shape, indptr, indices)
        rows = torch.repeat_interleave(torch.arange(shape[0]), indptr.diff())
        mask = torch.zeros(shape, dtype=torch.bool)
        mask[rows, indices] = True
        return mask


def _verify(path: Path, manifest: dict) -> None:
    """Compare the weights file with the SHA-256 its manifest records. A manifest without a valid one is
    refused too: a checksum that can be left out protects nothing (``verify=False`` reads it anyway)."""
    recorded = manifest.get("sha256")
    expected = recorded.get(TENSORS) if isinstance(recorded, dict) else None
    if not (isinstance(expected, str) and len(expected) == 64 and all(c in "0123456789abcdef" for c in expected)):
        raise ArtifactError(f"{path / MANIFEST} records no valid SHA-256 for {TENSORS}, so its weights cannot be "
                            "checked (load with verify=False, or --no-verify, to read it anyway)")
    if sha256(path / TENSORS) != expected:
        raise ArtifactError(f"{path / TENSORS} does not match the checksum in {MANIFEST}: the file was changed "
                            "or damaged after it was written (load with verify=False, or --no-verify, to read it "
                            "anyway)")
