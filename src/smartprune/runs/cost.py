"""What running a compressed model costs, beside its quality: the ``--measure`` part of ``compare``.

Each row's final model (after recovery, when there is one) is written as a compressed folder, and the
folders are then measured in one ``bench`` run against the dense model, so every ratio comes from one
process on one machine state:

- ``speed``: greedy decoding tokens/s (batch 1, 128 new tokens), 512-token prefill (batch 1) and
  batch-8 throughput at 512 tokens, interleaved rounds (``bench``);
- ``memory``: the bytes the weights take once loaded, the weight files' size, and the peak RSS of a
  fresh process that loads the model and runs one 512-token forward.

A compressed folder is measured in both residencies a user can load it in (``dense``: plain matrices
with zeros, what any runtime gets; ``compact``: the packed form), labelled; the dense model in its
own. Precision: float32 (weights and compute), ratios to the dense model in float32.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch

from smartprune.errors import DataError, did_you_mean

MEASURES = ("speed", "memory")
LENGTH, NEW_TOKENS = 512, 128  # prefill / throughput length; greedy decoding length


def columns(length: int) -> tuple[tuple[str, str, float, int], ...]:
    """(label, metric, unit scale, digits) of the running-cost table."""
    return (("decode tok/s", "generate_tokens_per_s", 1, 2),
            (f"{length}-token prefill s", f"latency_b1_{length}", 1, 3),
            ("batch-8 seq/s", "throughput_seq_per_s", 1, 2),
            ("held in memory MB", "resident_bytes", 1e-6, 0),
            ("peak RSS MB", "peak_rss_bytes", 1e-6, 0),
            ("weight files MB", "size_bytes", 1e-6, 0))


def longest(length: int = LENGTH, new_tokens: int = NEW_TOKENS) -> int:
    """The most positions the measurement needs (a 16-token prompt, then the new tokens)."""
    return max(length, 16 + new_tokens)


def parse_measures(text: str | None) -> tuple[str, ...]:
    """``"speed,memory"`` -> ("speed", "memory"); one line on an unknown word."""
    if not text:
        return ()
    return check_measures(w.strip() for w in text.split(",") if w.strip())


def check_measures(words: Iterable[str]) -> tuple[str, ...]:
    """The known measures among `words`, in MEASURES' order; one line on an unknown word."""
    words = tuple(words)
    for w in words:
        if w not in MEASURES:
            raise DataError(f"--measure: unknown '{w}'{did_you_mean(w, MEASURES)}; known: {', '.join(MEASURES)}")
    return tuple(m for m in MEASURES if m in words)


def folder_name(index: int, method: str, sparsity: str) -> str:
    """A file-system-safe, unique folder name for one row."""
    return f"{index:02d}-" + re.sub(r"[^A-Za-z0-9._-]+", "_", f"{method}-{sparsity}")[:80]


def keep(model: torch.nn.Module, tokenizer, folder: Path) -> str:
    """Write `model` (compressed, maybe retrained) as a compressed folder; its path as a bench spec."""
    from smartprune.storage.save import save

    save(model, folder, tokenizer=tokenizer)
    return str(folder)


def _memory_only(spec: str, resident: str, length: int) -> dict[str, float]:
    from smartprune.modules.packed import resident_bytes
    from smartprune.runs.bench import fresh_process, size_on_disk
    from smartprune.storage.sources import load_model

    loaded = load_model(spec, resident=resident)
    return {"resident_bytes": resident_bytes(loaded.model), "size_bytes": size_on_disk(loaded.source),
            **fresh_process(spec, resident, torch.get_num_threads(), length)}


def measure(specs: list[str], measures: tuple[str, ...], *, repeats: int = 3, length: int = LENGTH,
            new_tokens: int = NEW_TOKENS, device: str | torch.device = "cpu",
            residencies: tuple[str, ...] = ("dense", "compact"), progress: bool = True
            ) -> tuple[list[list[dict]], dict]:
    """Per spec (the dense model first): its entries, one per residency of `residencies` (a plain
    model: dense only), each ``{resident, metrics, ratios}``; and the machine. Ratios are to the first
    spec."""
    from smartprune.runs.bench import BenchSettings, bench, machine
    from smartprune.storage.sources import is_compressed

    held = {s: residencies if is_compressed(s) else ("dense",) for s in specs}
    if "speed" in measures:
        result = bench(specs, BenchSettings(repeats=repeats, lengths=(length,), batches=(8,), device=device,
                                            new_tokens=new_tokens, train=False,  # no fine-tuning column
                                            residencies=residencies, compute_dtypes=("float32",),
                                            rss="memory" in measures), progress=progress)
        entries = iter(result.models)
        out = [[_entry(next(entries)) for _ in held[s]] for s in specs]
        return out, result.machine
    out = [[{"resident": r, "metrics": _memory_only(s, r, length)} for r in held[s]] for s in specs]
    base = out[0][0]["metrics"]
    for entry in (e for per in out for e in per):
        entry["ratios"] = {k: v / base[k] for k, v in entry["metrics"].items() if base.get(k)}
    return out, machine()


def _entry(model: dict) -> dict:
    return {"resident": model["resident"], "metrics": {**model["metrics"], "size_bytes": model["size_bytes"]},
            "ratios": model["ratios"]}


def cost_table(rows: list[dict], length: int = LENGTH) -> str:
    """Markdown: one line per row and residency, each metric with its ratio to dense."""
    measured = [r for r in rows if "running" in r]
    if not measured:
        return ""
    keys = {k for r in measured for e in r["running"] for k in e["metrics"]}
    cols = [c for c in columns(length) if c[1] in keys]
    lines = ["| method | sparsity | held as | " + " | ".join(c[0] for c in cols) + " |",
             "|---|---|---|" + "---:|" * len(cols)]
    for r in measured:
        for e in r["running"]:
            cells = []
            for _, key, scale, digits in cols:
                v = e["metrics"].get(key)
                ratio = e.get("ratios", {}).get(key)
                cells.append("-" if v is None else f"{v * scale:,.{digits}f}" +
                             ("" if r["method"] == "dense" or ratio is None else f" (x{ratio:.2f})"))
            lines.append(f"| {r['method']} | {r['sparsity']} | {e['resident']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["MEASURES", "check_measures", "cost_table", "folder_name", "keep", "longest", "measure", "parse_measures"]
