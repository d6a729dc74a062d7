"""`smartprune bench`: size and speed of several models measured in one process, side by side.

Every metric is measured for all models in one round before the next round starts (interleaved), so
a change in machine load hits every model alike; the first round of each shape is a warm-up and is
not counted. Reported per metric: the median over ``repeats`` rounds and the spread (min, max).
``ratios`` are each model's median divided by the first model's (the dense baseline): below 1 is
faster for a time, above 1 is faster for a rate.
"""

from __future__ import annotations

import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from smartprune.loading import LoadedModel, load_model
from smartprune.nn import mask_gradients

log = logging.getLogger(__name__)
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.gguf")


def metric_units(lengths: tuple[int, ...]) -> dict[str, str]:
    """Metric name -> unit. Batch 1 at every length; batch 8, throughput and fine-tuning at the first."""
    first = lengths[0]
    return {**{f"latency_b1_{n}": "s" for n in lengths}, f"latency_b8_{first}": "s",
            "generate_tokens_per_s": "tokens/s", "throughput_seq_per_s": "sequences/s",
            "finetune_seq_per_s": "sequences/s"}


@dataclass
class BenchSettings:
    repeats: int = 5
    lengths: tuple[int, ...] = (128, 512, 1024)  # batch-1 forward lengths; the first also for batch 8 / training
    threads: int = 0  # 0: all cores
    new_tokens: int = 128  # generation length
    rss: bool = True  # peak RSS of each model in its own subprocess
    seed: int = 0

    def __post_init__(self) -> None:
        from smartprune.errors import DataError

        if self.repeats < 1 or self.new_tokens < 1 or self.threads < 0 or not self.lengths or min(self.lengths) < 2:
            raise DataError("repeats, new tokens and lengths must be positive, threads 0 (all cores) or positive")


@dataclass
class BenchResult:
    machine: dict
    models: list[dict] = field(default_factory=list)

    units: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"machine": self.machine, "units": self.units, "models": self.models}

    def summary(self) -> str:
        names = [m["name"] for m in self.models]
        lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        rows = [("size on disk (MB)", lambda m: m["size_bytes"] / 1e6, lambda m: m["ratios"]["size_bytes"])]
        rows += [(f"{k} ({u})", (lambda m, k=k: m["metrics"][k]), (lambda m, k=k: m["ratios"][k]))
                 for k, u in self.units.items()]
        if all("peak_rss_bytes" in m["metrics"] for m in self.models):
            rows.append(("peak RSS (MB)", lambda m: m["metrics"]["peak_rss_bytes"] / 1e6,
                         lambda m: m["ratios"]["peak_rss_bytes"]))
        for label, value, ratio in rows:
            cells = [f"{value(m):.4g}" + ("" if i == 0 else f" (x{ratio(m):.2f})") for i, m in enumerate(self.models)]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def machine() -> dict:
    import transformers

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "memory_bytes": mem,
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def size_on_disk(source: str) -> int:
    """Bytes of the weight files of a model folder (or of a single .gguf file)."""
    path = Path(source)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for pattern in WEIGHT_FILES for f in path.glob(pattern))


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _ids(batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


class _Probe:
    """The timed actions on one model."""

    def __init__(self, loaded: LoadedModel, new_tokens: int, seed: int) -> None:
        self.model = loaded.model
        self.vocab = self.model.config.vocab_size
        self.new_tokens, self.seed = new_tokens, seed
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(self.params, lr=0.0)  # a real step that leaves the weights as they are

    @torch.no_grad()
    def forward(self, batch: int, length: int) -> float:
        ids = _ids(batch, length, self.vocab, self.seed)
        return _timed(lambda: self.model(ids))

    @torch.no_grad()
    def generate(self) -> float:
        ids = _ids(1, 16, self.vocab, self.seed)
        seconds = _timed(lambda: self.model.generate(ids, attention_mask=torch.ones_like(ids),
                                                     max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens,
                                                     do_sample=False, pad_token_id=0))
        return self.new_tokens / seconds

    def train_step(self, batch: int = 8, length: int = 128) -> float:
        ids = _ids(batch, length, self.vocab, self.seed)

        def step() -> None:
            self.model.train()
            loss = self.model(ids, labels=ids).loss
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            mask_gradients(self.model)  # pruned entries stay pruned, as in the fit loop
            self.opt.step()
            self.model.eval()

        return batch / _timed(step)


def _measure_round(probe: _Probe, lengths: tuple[int, ...]) -> dict[str, float]:
    out = {f"latency_b1_{n}": probe.forward(1, n) for n in lengths}
    out[f"latency_b8_{lengths[0]}"] = probe.forward(8, lengths[0])
    out["throughput_seq_per_s"] = 8 / out[f"latency_b8_{lengths[0]}"]
    out["generate_tokens_per_s"] = probe.generate()
    out["finetune_seq_per_s"] = probe.train_step(8, lengths[0])
    return out


def _check_lengths(loaded: LoadedModel, s: BenchSettings) -> None:
    from smartprune.errors import DataError

    c = loaded.model.config
    limit = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)
    need = max(max(s.lengths), 16 + s.new_tokens)
    if limit is not None and need > limit:
        raise DataError(f"model {loaded.name} allows {limit} positions; the benchmark needs {need} "
                        "(use --lengths / --new-tokens within it)")


def peak_rss(spec: str, threads: int, length: int) -> int:
    """Peak resident memory of a fresh process that loads `spec` and runs one forward of `length` tokens.

    Read from ``VmHWM`` (the high-water mark of the process's own memory), not ``ru_maxrss``: Linux
    carries ``ru_maxrss`` across fork and exec, so a child of a large parent would report the parent's."""
    code = ("import torch, smartprune\n"
            f"torch.set_num_threads({threads})\n"
            f"m = smartprune.load_model({spec!r}).model\n"
            f"with torch.no_grad(): m(torch.zeros(1, {length}, dtype=torch.long))\n"
            "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) * 1024  # kB


def bench(specs: list[str], settings: BenchSettings | None = None, *, progress: bool = True) -> BenchResult:
    s = settings or BenchSettings()
    torch.set_num_threads(s.threads or os.cpu_count() or 1)
    torch.manual_seed(s.seed)
    loaded = [load_model(spec) for spec in specs]
    for m in loaded:
        _check_lengths(m, s)
    units = metric_units(s.lengths)
    probes = [_Probe(m, s.new_tokens, s.seed) for m in loaded]
    result = BenchResult(machine(), units=units)
    samples: list[dict[str, list[float]]] = [{k: [] for k in units} for _ in probes]
    for round_ in tqdm(range(s.repeats + 1), desc="bench rounds", disable=not progress):
        for probe, sink in zip(probes, samples, strict=True):
            values = _measure_round(probe, s.lengths)
            if round_ == 0:
                continue  # warm-up
            for k, v in values.items():
                sink[k].append(v)
    for spec, m, sink in zip(specs, loaded, samples, strict=True):
        metrics = {k: statistics.median(v) for k, v in sink.items()}
        entry = {"name": spec, "source": m.source, "size_bytes": size_on_disk(m.source), "metrics": metrics,
                 "spreads": {k: {"min": min(v), "max": max(v)} for k, v in sink.items()},
                 "parameters_in_memory": sum(t.numel() for t in m.model.state_dict().values())}
        if s.rss:
            metrics["peak_rss_bytes"] = peak_rss(spec, torch.get_num_threads(), max(s.lengths))
        result.models.append(entry)
    base = result.models[0]
    for entry in result.models:
        entry["ratios"] = {k: v / base["metrics"][k] for k, v in entry["metrics"].items()}
        entry["ratios"]["size_bytes"] = entry["size_bytes"] / base["size_bytes"]
    result.machine["process_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result.machine["repeats"] = s.repeats
    return result


def write_outputs(result: BenchResult, path: Path) -> None:
    """JSON to `path` and a Markdown twin beside it (same name, .md)."""
    from smartprune.artifact import write_json, write_text

    write_json(path, result.to_dict())
    m = result.machine
    head = (f"Measured on {m['cpu']} ({m['cores']} cores, {m['threads']} threads), torch {m['torch']}; median of "
            f"{m['repeats']} interleaved rounds after a warm-up; (xR) = ratio to the first model.\n\n")
    write_text(path.with_suffix(".md"), head + result.summary() + "\n")
