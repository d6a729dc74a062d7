"""`smartprune bench`: size and speed of several models measured in one process, side by side.

Every metric is measured for all models in one round before the next round starts (interleaved), so
a change in machine load hits every model alike; the first round of each shape is a warm-up and is
not counted. Reported per metric: the median over ``repeats`` rounds and the spread (min, max).
``ratios`` are each model's median divided by the first model's in the same compute dtype (the dense
baseline): below 1 is faster for a time, above 1 is faster for a rate.

On a GPU every timed action is bracketed by ``torch.cuda.synchronize`` (kernels run asynchronously),
and ``peak_gpu_bytes`` is the model's own weights plus the highest memory its measured actions
allocated above what was allocated before them (``torch.cuda.max_memory_allocated``), so models
resident side by side do not count each other. Each ``--compute-dtype`` runs forward passes and
training under autocast in that dtype (weights stay float32), one entry per model and dtype.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from smartprune.data import check_positions
from smartprune.device import autocast, resolve_compute_dtype, resolve_device
from smartprune.modules.masked import mask_gradients
from smartprune.modules.packed import PACKED_MODULES, resident_bytes
from smartprune.storage.sources import LoadedModel, check_gguf_file, is_compressed, load_model

log = logging.getLogger(__name__)
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.gguf")
GGUF_RUNTIMES = ("llama.cpp", "transformers")
# how transformers decodes: eager (a dynamic cache, each step's Python and dispatch), or a static cache
# whose step torch.compile (inductor) compiles once, in the warm-up round (benchmarks/decode_compile.py)
DECODES = ("eager", "compiled")


def metric_units(lengths: tuple[int, ...], batches: tuple[int, ...] = (8,)) -> dict[str, str]:
    """Metric name -> unit. Batch 1 at every length; each larger batch, its throughput and fine-tuning
    (batch 8) at the first length. ``throughput_seq_per_s`` is the first batch's throughput."""
    first = lengths[0]
    return {**{f"latency_b1_{n}": "s" for n in lengths}, **{f"latency_b{b}_{first}": "s" for b in batches},
            "generate_tokens_per_s": "tokens/s", "throughput_seq_per_s": "sequences/s",
            **{f"throughput_b{b}_seq_per_s": "sequences/s" for b in batches[1:]},
            "finetune_seq_per_s": "sequences/s"}


@dataclass
class BenchSettings:
    repeats: int = 5
    lengths: tuple[int, ...] = (128, 512, 1024)  # batch-1 forward lengths; the first also for batch 8 / training
    threads: int = 0  # 0: all cores
    new_tokens: int = 128  # generation length
    rss: bool = True  # peak RSS of each model in its own subprocess
    seed: int = 0
    batches: tuple[int, ...] = (8,)  # throughput batch sizes at the first length (the paper's Table 8: 8 and 32)
    device: str | torch.device = "auto"
    compute_dtypes: tuple[str, ...] = ("auto",)  # one entry per model and dtype (e.g. float32 and bfloat16)
    # how a compressed folder is held in memory, one entry per residency (`smartprune.storage.load`)
    residencies: tuple[str, ...] = ("compact", "dense")
    # run every 2:4 projection of a compressed folder on the GPU's semi-structured sparse kernels
    semi_structured: bool = False
    # joules per token of the largest batch's forward, from NVML (GPU) or RAPL (CPU) where they exist
    energy: bool = False
    train: bool = True  # also time one fine-tuning step (batch 8) of each trainable model
    # where a .gguf MODEL is timed: in llama.cpp (llama-bench: prefill and decoding, file and tensor bytes,
    # peak RSS; built once from source) or converted and timed in transformers like any folder
    gguf: str = "llama.cpp"
    decode: str = "eager"  # `DECODES`: how transformers models decode (llama.cpp files are llama.cpp's own)

    def __post_init__(self) -> None:
        from smartprune.errors import DataError

        if self.repeats < 1 or self.new_tokens < 1 or self.threads < 0 or not self.lengths or min(self.lengths) < 2 \
                or not self.batches or min(self.batches) < 1 or not self.compute_dtypes:
            raise DataError("repeats, new tokens, lengths and batches must be positive, threads 0 (all cores) or "
                            "positive")
        from smartprune.storage.load import RESIDENT

        if self.gguf not in GGUF_RUNTIMES:
            raise DataError(f"unknown GGUF runtime {self.gguf!r}; expected {' or '.join(GGUF_RUNTIMES)}")
        if self.decode not in DECODES:
            raise DataError(f"unknown decoding {self.decode!r}; expected {' or '.join(DECODES)}")
        bad = [r for r in self.residencies if r not in RESIDENT]
        if bad or not self.residencies:
            raise DataError(f"unknown residency {bad[0] if bad else '(none)'!r}; expected {' or '.join(RESIDENT)}")


@dataclass
class BenchResult:
    machine: dict
    models: list[dict] = field(default_factory=list)

    units: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"machine": self.machine, "units": self.units, "models": self.models}

    def summary(self) -> str:
        several = len({m.get("compute_dtype") for m in self.models}) > 1
        names = [f"{m['name']} [{m['compute_dtype']}]" if several else m["name"] for m in self.models]
        lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        rows = [("size on disk (MB)", "size_bytes", 1e-6), ("held in memory (MB)", "resident_bytes", 1e-6)]
        rows += [(f"{k} ({u})", k, 1) for k, u in self.units.items()]
        rows += [("weights read at decode (GB/s: bytes held x tokens/s)", "decode_weight_gb_per_s", 1)]
        rows += [("peak RSS, load + one forward (MB)", "peak_rss_bytes", 1e-6), ("loading time (s)", "load_seconds", 1),
                 ("peak GPU memory (MB)", "peak_gpu_bytes", 1e-6), ("energy per token (mJ)", "joules_per_token", 1e3)]
        for label, key, unit in rows:
            values = [m["metrics"].get(key, m.get(key)) for m in self.models]  # size_bytes: beside the metrics
            if all(v is None for v in values):
                continue
            cells = [("n/a" if v is None else f"{v * unit:.4g}" +
                      ("" if m["baseline"] or key not in m["ratios"] else f" (x{m['ratios'][key]:.2f})"))
                     for m, v in zip(self.models, values, strict=True)]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        energy = self.machine.get("energy")
        if energy and not energy["measurable"]:
            lines.append("| energy per token | " + " | ".join(["not measurable here"] * len(self.models)) + " |")
            lines.append(f"\nEnergy: {energy['reason']}.")
        elif energy:
            lines.append(f"\nEnergy: {energy['source']} counter, idle draw {energy['idle_watts']:.1f} W subtracted.")
        return "\n".join(lines)


def machine() -> dict:
    import transformers

    cpu = machine_cpu()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "memory_bytes": mem,
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def memory_bandwidth(threads: int) -> float:
    """This machine's copy bandwidth in GB/s (bytes read plus bytes written per second, the best of 5
    copies of 256 MB on `threads` threads), measured once per CPU and thread count and cached: the
    ceiling a decoding step that reads every weight once can approach."""
    import json

    from smartprune.files import write_json
    from smartprune.paths import cache_dir

    path = cache_dir() / "bandwidth.json"
    key = f"{machine_cpu()} / {threads} threads"
    known = json.loads(path.read_text()) if path.is_file() else {}
    if key not in known:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        a = torch.ones(64 * 2**20)
        b = torch.empty_like(a)
        best = min(_timed(lambda: b.copy_(a), torch.device("cpu")) for _ in range(5))
        torch.set_num_threads(before)
        known[key] = 2 * a.numel() * a.element_size() / best / 1e9
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, known)
    return known[key]


def machine_cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def size_on_disk(source: str) -> int:
    """Bytes of the weight files of a model folder (or of a single .gguf file)."""
    path = Path(source)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for pattern in WEIGHT_FILES for f in path.glob(pattern))


def what_you_got(report: dict, out: Path, dense: str, gguf: Path | None = None) -> list[str]:
    """The last lines of compress and recover: the model's size against the dense one, and the one
    command that measures its speed against it."""
    o = report["overall"]
    before, after = o["params_before"], o["params_after"]
    disk = size_on_disk(str(out))
    lines = ["", f"size: {after:,} of {before:,} parameters ({after / before:.2f}x dense); weight files "
             f"{disk / 1e6:,.1f} MB ({disk / (4 * before):.2f}x the dense model in float32)"]
    if gguf:
        g = Path(gguf).stat().st_size
        lines.append(f"GGUF file {g / 1e6:,.1f} MB ({g / (4 * before):.2f}x)")
    models = " ".join(shlex.quote(str(m)) for m in (dense, out, gguf) if m)
    lines.append(f"speed against dense: smartprune bench {models}")
    return lines


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds `fn` takes; on a GPU, until its kernels have finished."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda _device: None)
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def _ids(batch: int, length: int, vocab: int, seed: int, device: torch.device) -> torch.Tensor:
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    return ids.to(device)


class _Probe:
    """The timed actions on one model, on one device, in one compute dtype."""

    def __init__(self, loaded: LoadedModel, new_tokens: int, seed: int, device: torch.device,
                 dtype: torch.dtype, decode: str = "eager") -> None:
        self.model = loaded.model
        self.decoding = _decoding(decode)
        self.vocab = self.model.config.vocab_size
        self.new_tokens, self.seed, self.device, self.dtype = new_tokens, seed, device, dtype
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(self.params, lr=0.0)  # a real step that leaves the weights as they are
        # A compact-resident model is for inference: its packed matrices have nothing to train; nor have
        # semi-structured sparse weights (frozen, and torch has no backward through them for the input).
        from smartprune.modules.semistructured import SemiStructuredProjection

        self.trainable = not any(isinstance(m, (*PACKED_MODULES, SemiStructuredProjection))
                                 for m in self.model.modules())

    def _timed(self, fn: Callable[[], None]) -> float:
        with autocast(self.device, self.dtype):
            return _timed(fn, self.device)

    @torch.no_grad()
    def forward(self, batch: int, length: int) -> float:
        ids = _ids(batch, length, self.vocab, self.seed, self.device)
        return self._timed(lambda: self.model(ids))

    @torch.no_grad()
    def generate(self) -> float:
        ids = _ids(1, 16, self.vocab, self.seed, self.device)
        seconds = self._timed(lambda: self.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.new_tokens,
            min_new_tokens=self.new_tokens, do_sample=False, pad_token_id=0, **self.decoding))
        return self.new_tokens / seconds

    def train_step(self, batch: int = 8, length: int = 128) -> float:
        ids = _ids(batch, length, self.vocab, self.seed, self.device)

        def step() -> None:
            self.model.train()
            loss = self.model(ids, labels=ids).loss
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            mask_gradients(self.model)  # pruned entries stay pruned, as in the fit loop
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)  # no model keeps a copy of its weights' size between rounds
            self.model.eval()

        return batch / self._timed(step)


def _decoding(decode: str) -> dict:
    """`generate`'s keywords for a decoding of `DECODES`."""
    if decode == "eager":
        return {}
    from transformers.generation.configuration_utils import CompileConfig

    compiled = CompileConfig(fullgraph=False, dynamic=False)
    compiled._compile_all_devices = True  # transformers compiles on GPUs only unless told
    return {"cache_implementation": "static", "compile_config": compiled}


def _measure_round(probe: _Probe, lengths: tuple[int, ...], batches: tuple[int, ...], train: bool = True
                   ) -> dict[str, float]:
    first = lengths[0]
    out = {f"latency_b1_{n}": probe.forward(1, n) for n in lengths}
    for b in batches:
        out[f"latency_b{b}_{first}"] = probe.forward(b, first)
        out[f"throughput_b{b}_seq_per_s"] = b / out[f"latency_b{b}_{first}"]
    out["throughput_seq_per_s"] = out.pop(f"throughput_b{batches[0]}_seq_per_s")
    out["generate_tokens_per_s"] = probe.generate()
    if train and probe.trainable:
        out["finetune_seq_per_s"] = probe.train_step(8, first)
    return out


class _GpuPeak:
    """This model's weights plus the most memory its actions allocated above the level before them."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.device, self.peak = device, 0
        self.weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())

    def __enter__(self) -> _GpuPeak:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize(self.device)
        above = torch.cuda.max_memory_allocated(self.device) - self.start
        self.peak = max(self.peak, self.weights + above)


def _check_lengths(loaded: LoadedModel, s: BenchSettings) -> None:
    from smartprune.errors import DataError

    need = max(max(s.lengths), 16 + s.new_tokens)
    try:
        check_positions(loaded.model, need, "the benchmark's longest sequence (--lengths, 16 + --new-tokens)")
    except DataError as exc:
        raise DataError(f"model {loaded.name}: {exc}") from None


def fresh_process(spec: str, resident: str, threads: int, length: int) -> dict[str, float]:
    """Peak resident memory (bytes) of a fresh process that loads `spec` and runs one forward of
    `length` tokens, and the seconds the load took (imports excluded).

    Read from ``VmHWM`` (the high-water mark of the process's own memory), not ``ru_maxrss``: Linux
    carries ``ru_maxrss`` across fork and exec, so a child of a large parent would report the parent's."""
    code = ("import time, torch, smartprune, transformers\n"
            f"torch.set_num_threads({threads})\n"
            "t = time.perf_counter()\n"
            f"m = smartprune.load_model({spec!r}, resident={resident!r}).model\n"
            "t = time.perf_counter() - t\n"
            f"with torch.no_grad(): m(torch.zeros(1, {length}, dtype=torch.long))\n"
            "print(t, next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds, kb = out.stdout.split()[-2:]
    return {"peak_rss_bytes": int(kb) * 1024, "load_seconds": float(seconds)}


def bench(specs: list[str], settings: BenchSettings | None = None, *, progress: bool = True) -> BenchResult:
    s = settings or BenchSettings()
    device = resolve_device(s.device)
    dtypes = [resolve_compute_dtype(d, device) for d in s.compute_dtypes]  # bad names fail before loading
    if s.semi_structured and device.type != "cuda":
        from smartprune.errors import DeviceError

        raise DeviceError(f"--semi-structured needs a CUDA GPU (semi-structured sparse kernels); device is {device}")
    torch.set_num_threads(s.threads or os.cpu_count() or 1)
    torch.manual_seed(s.seed)
    # each compressed folder once per residency; other models once
    in_llama = [spec for spec in specs if s.gguf == "llama.cpp" and str(spec).endswith(".gguf")]
    for spec in in_llama:  # a missing or foreign file is one line before any work
        check_gguf_file(Path(spec).expanduser())
    held = [(spec, r) for spec in specs if spec not in in_llama
            for r in (s.residencies if is_compressed(spec) else ("dense",))]
    loaded = [load_model(spec, resident=r) for spec, r in held]
    # the semi-structured kernels' dtype: the first 16-bit compute dtype asked for, else bfloat16
    half = next((d for d in dtypes if d in (torch.float16, torch.bfloat16)), torch.bfloat16)
    swapped: dict[int, list[str]] = {}  # id(model) -> its projections on semi-structured kernels
    for (spec, _), m in zip(held, loaded, strict=True):
        _check_lengths(m, s)
        m.model.to(device)
        if s.semi_structured and is_compressed(spec):
            from smartprune.modules.semistructured import use_semi_structured

            swapped[id(m.model)] = use_semi_structured(m.model, half)
    runs = [(spec, r, m, dtype, _Probe(m, s.new_tokens, s.seed, device, dtype, s.decode))
            for dtype in dtypes for (spec, r), m in zip(held, loaded, strict=True)]
    peaks = [_GpuPeak(m.model, device) if device.type == "cuda" else None for _, _, m, _, _ in runs]
    result = BenchResult(machine(), units=metric_units(s.lengths, s.batches))
    samples = _rounds(runs, peaks, s, progress)
    if s.energy:
        result.machine["energy"] = _energy(runs, samples, s, device)
    several = len(held) > len(specs) - len(in_llama)
    for run, peak, sink in zip(runs, peaks, samples, strict=True):
        result.models.append(_entry(run, peak, sink, s, several, specs[0], len(swapped.get(id(run[2].model), [])),
                                    device))
    for spec in in_llama:
        result.models.append(_llama_entry(spec, s, spec == specs[0]))
    for entry in result.models:
        entry["metrics"]["decode_weight_gb_per_s"] = (entry["metrics"]["resident_bytes"] *
                                                      entry["metrics"]["generate_tokens_per_s"] / 1e9)
    first = next(b for b in result.models if b["baseline"])
    for entry in result.models:  # the first MODEL in the same compute dtype, else the first MODEL as measured
        base = next((b for b in result.models if b["baseline"] and b["compute_dtype"] == entry["compute_dtype"]),
                    first)
        entry["ratios"] = {k: v / base["metrics"][k] for k, v in entry["metrics"].items() if k in base["metrics"]}
        entry["ratios"]["size_bytes"] = entry["size_bytes"] / base["size_bytes"]
    if device.type == "cpu":
        result.machine["copy_gb_per_s"] = memory_bandwidth(torch.get_num_threads())
    result.machine.update(process_peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                          repeats=s.repeats, device=str(device), gpu=torch.cuda.get_device_name(device)
                          if device.type == "cuda" else None)
    return result


def _rounds(runs: list, peaks: list, s: BenchSettings, progress: bool) -> list[dict[str, list[float]]]:
    """A warm-up round, then `s.repeats` rounds, each timing every (model, dtype) in turn (interleaved)."""
    samples: list[dict[str, list[float]]] = [{} for _ in runs]
    for round_ in tqdm(range(s.repeats + 1), desc="bench rounds", disable=not progress):
        for (*_, probe), peak, sink in zip(runs, peaks, samples, strict=True):
            with peak or contextlib.nullcontext():
                values = _measure_round(probe, s.lengths, s.batches, s.train)
            if round_ == 0:
                continue  # warm-up
            for k, v in values.items():
                sink.setdefault(k, []).append(v)
    return samples


def _entry(run: tuple, peak, sink: dict[str, list[float]], s: BenchSettings, several: bool, first: str,
           semi_structured: int, device: torch.device) -> dict:
    """One timed model's row: medians, spreads, bytes held and on disk, peak memory."""
    spec, r, m, dtype, _ = run
    metrics = {k: statistics.median(v) for k, v in sink.items()}
    metrics["resident_bytes"] = resident_bytes(m.model)
    entry = {"name": f"{spec} [{r}]" if several and is_compressed(spec) else spec, "source": m.source,
             "resident": r, "size_bytes": size_on_disk(m.source), "metrics": metrics,
             "compute_dtype": str(dtype).removeprefix("torch."), "device": str(device),
             "spreads": {k: {"min": min(v), "max": max(v)} for k, v in sink.items()},
             "parameters_in_memory": sum(t.numel() for t in m.model.state_dict().values()),
             "semi_structured": semi_structured, "baseline": spec == first, "decode": s.decode}
    if peak is not None:
        metrics["peak_gpu_bytes"] = peak.peak
    if s.rss:
        metrics.update(fresh_process(spec, r, torch.get_num_threads(), max(s.lengths)))
    return entry


def _llama_entry(spec: str, s: BenchSettings, baseline: bool) -> dict:
    """One .gguf MODEL timed in llama.cpp (llama-bench), as a row of the same table."""
    from smartprune.runtimes import llamacpp

    threads = s.threads or os.cpu_count() or 1
    got = llamacpp.bench(Path(spec).expanduser(), threads=threads, lengths=s.lengths, new_tokens=s.new_tokens,
                         repeats=s.repeats)
    metrics = {**got["metrics"], "resident_bytes": got["model_bytes"]}
    if s.rss:
        metrics["peak_rss_bytes"] = got["peak_rss_bytes"]
    return {"name": spec, "source": str(Path(spec).expanduser()), "resident": "llama.cpp",
            "size_bytes": size_on_disk(spec), "metrics": metrics, "compute_dtype": f"llama.cpp {got['type']}",
            "device": "cpu", "spreads": got["spreads"], "parameters_in_memory": got["parameters"],
            "semi_structured": 0, "baseline": baseline, "runtime": f"llama.cpp ({threads} threads)"}


def _energy(runs: list, samples: list[dict[str, list[float]]], s: BenchSettings, device: torch.device) -> dict:
    """Joules per token of each model's largest-batch forward at the first length (into its samples),
    above the idle draw measured first; or why it cannot be measured here."""
    from smartprune.energy import energy_meter

    meter = energy_meter(device.type, device.index or 0)
    if not meter.measurable:
        return {"measurable": False, "source": None, "reason": meter.reason}
    idle = meter.idle_watts()
    batch, length = max(s.batches), s.lengths[0]
    for (*_, probe), sink in zip(runs, samples, strict=True):
        probe.forward(batch, length)  # warm
        once = max(probe.forward(batch, length), 1e-3)
        repeats = max(1, round(2.0 / once))  # about two seconds, so the counter's resolution does not matter

        def work(probe=probe, repeats=repeats) -> None:
            for _ in range(repeats):
                probe.forward(batch, length)

        joules, _ = meter.measure(work, idle_watts=idle)
        sink["joules_per_token"] = [joules / (repeats * batch * length)]
    return {"measurable": True, "source": meter.source, "idle_watts": idle, "batch": batch, "length": length}


def write_outputs(result: BenchResult, path: Path) -> None:
    """JSON to `path` and a Markdown twin beside it (same name, .md)."""
    from smartprune.files import write_json, write_text

    write_json(path, result.to_dict())
    m = result.machine
    cpu = f"{m['cpu']} ({m['cores']} cores, {m['threads']} threads)"
    where = f"{m['gpu']} (host: {cpu})" if m.get("gpu") else cpu
    head = (f"Measured on {where}, torch {m['torch']}; median of {m['repeats']} interleaved rounds after a warm-up; "
            "(xR) = ratio to the first model in the same compute dtype (else to the first model)."
            + (f" This machine copies {m['copy_gb_per_s']:.1f} GB/s (read + write, {m['threads']} threads): the "
               "ceiling of 'weights read at decode'." if m.get("copy_gb_per_s") else "") + "\n\n")
    write_text(path.with_suffix(".md"), head + result.summary() + "\n")
