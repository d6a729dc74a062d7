"""Hugging Face helpers shared by every way of loading a model or a text: configs, attention, the hub."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from torch import nn

from smartprune.errors import ModelError
from smartprune.files import read_json


def read_config(path: Path):
    """The Hugging Face config of a model folder, checked: readable JSON, no custom code, a known
    architecture (one line otherwise, before any weights are read)."""
    from transformers import AutoConfig

    raw = read_json(path / "config.json", "model config", ModelError)
    if "auto_map" in raw:
        raise ModelError(f"{path}: its config asks for the model's own code (auto_map); smartprune runs only "
                         "architectures that transformers ships, never code from a model folder")
    if not isinstance(raw.get("model_type"), str):
        raise ModelError(f"{path / 'config.json'} names no model_type")
    check_sizes(raw, path / "config.json")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # transformers' own validators (ValueError, its strict-dataclass errors, ...)
        raise ModelError(f"{path / 'config.json'} cannot be read as a {raw['model_type']} config "
                         f"({first_line(exc)})") from None
    check_architecture(config, str(path))
    check_size(config, str(path))
    return config


# config keys that count something (layers, heads, widths, tokens): positive whole numbers, as the
# families spell them (GPT-2's n_*, Llama's num_*), checked before transformers builds anything from them
SIZE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
             "vocab_size", "head_dim", "max_position_embeddings", "n_embd", "n_head", "n_layer", "n_positions",
             "n_inner", "ffn_dim", "d_model", "num_heads", "num_layers")


def check_sizes(raw: dict, where: Path) -> None:
    """Every size of a raw config a positive whole number (not a string, a float or a bool), the hidden
    width a multiple of the heads and the heads of the key/value heads: one line each, instead of
    transformers' ZeroDivisionError or a model built from a negative width."""
    bad = _non_finite(raw)
    if bad is not None:
        raise ModelError(f"{where}: {bad[0]} is {bad[1]!r}; a config holds finite numbers")
    for key in SIZE_KEYS:
        value = raw.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelError(f"{where}: {key} is {value!r}; it must be a positive whole number")
    hidden, heads = raw.get("hidden_size"), raw.get("num_attention_heads")
    if hidden and heads and hidden % heads:  # transformers' validators refuse it too, in less plain words
        raise ModelError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    kv = raw.get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise ModelError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")


def _non_finite(value, key: str = "") -> tuple[str, float] | None:
    """The first NaN or infinite number in a raw config (JSON as Python reads it takes NaN and Infinity), with
    its key path: a norm's epsilon or a rope base of NaN builds a model that computes only NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return key, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        found = _non_finite(v, f"{key}.{k}" if key else str(k))
        if found is not None:
            return found
    return None


def physical_memory() -> int:
    """Bytes of memory this machine has (0 where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def config_parameters(config) -> int:
    """A lower bound on the parameters a config asks for: embedding and, per layer, the attention and
    feed-forward matrices (enough to refuse a config that could never be held, before it is built)."""
    text = getattr(config, "get_text_config", lambda: config)()

    def get(*names: str) -> int:
        return next((int(v) for n in names if isinstance(v := getattr(text, n, None), int)), 0)

    hidden, layers = get("hidden_size", "n_embd", "d_model"), get("num_hidden_layers", "n_layer")
    inter = get("intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
    return get("vocab_size") * hidden + layers * (4 * hidden * hidden + 2 * hidden * inter)


def check_size(config, where: str) -> None:
    """Refuse a config whose weights alone (float32) would not fit in this machine's memory: building it
    would try to allocate them and die, perhaps after minutes, rather than say so."""
    need, have = 4 * config_parameters(config), physical_memory()
    if have and need > have:
        raise ModelError(f"{where}: its config asks for at least {need / 2**30:,.1f} GiB of float32 weights, more "
                         f"than this machine's {have / 2**30:,.1f} GiB of memory (a damaged or mistyped config?)")


def use_sdpa(model: nn.Module) -> None:
    """SDPA attention (causal when no mask is given) where the family has it; others (Bloom) keep
    their eager attention, since their mask code must match the attention they run."""
    if getattr(model, "_supports_sdpa", False):
        model.config._attn_implementation = "sdpa"


def check_architecture(config, where: str) -> None:
    """Any causal LM transformers ships loads (evaluation, generation and the baselines need nothing
    more); the paper's methods check their adapter entry when they start."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ModelError(f"{where}: model type '{config.model_type}' is not a causal language model that "
                         "transformers can run (smartprune compresses decoder-only LMs)")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connection to the hub endpoint succeeds (saves a minute of retries when offline)."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


