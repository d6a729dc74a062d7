"""The GPU checks in one prepared run: CUDA tests, compression, recovery, and Table 8 with energy per token.

    python benchmarks/gpu.py --out DIR              # on a machine with a CUDA GPU (docs/gpu.md: the steps)
    python benchmarks/gpu.py --out DIR --dry-run    # the same steps on this CPU with a tiny model (< 3 minutes)

Steps, each timed and written to ``DIR/gpu.json`` (and ``gpu.md``) as soon as it ends, so a run cut
short still reports what it did:

a. the device-generic tests of the default suite (``pytest -m device -k cuda``; dry run: collected only);
b. ``compress`` of the model with SparseGPT 50%, ``smart-50`` and ``paper`` on the device: seconds, and
   WikiText-2 test perplexity (all windows; dry run: 2);
c. recovery of ``smart``, SparseGPT at ``smart``'s size (``match:smart``) and the dense model,
   ``--recover-minutes`` each in bfloat16: WikiText-2 and PTB perplexity before and after;
d. Table 8 in bf16: dense, SparseGPT 50%, ``paper-structured`` and a 2:4 model (semi-structured kernels
   on the GPU), batch 1 / 8 / 32 at 512 and 1024 tokens: latency, throughput, 32-token generation, peak GPU
   memory and joules per token (NVML, idle draw subtracted; "not measurable" where no counter exists);
e. the same in fp32;
o. ``benchmarks/owl.sh``'s 50% step (docs/smart-results.md: ``smart`` against OWL-SparseGPT, OWL-Wanda and
   uniform SparseGPT at 50% of the block linears, 32 windows, before and after equal retraining) on the
   device in float32, so its rows compare with the CPU's 70% step; rows are kept in
   ``DIR/.owl50.json.partial`` as they finish (dry run: the tiny model, 1 window);
s. the allocation over the block linears alone with a bounded spread (``smart-bl50-blocks-spread``,
   ``smart-bl70-blocks-spread``) and measured jointly (``smart-bl{50,70}-blocks-joint``) beside uniform
   SparseGPT at each size, float32, 32 windows, no retraining;
g. recovery on the GPU of what the CPU cannot retrain long: the structured ``slim-40``, the frontier recipe
   ``smart-40`` and ``paper``, each compressed on the device and retrained ``--recover-minutes`` in bfloat16:
   WikiText-2 and PTB (32 windows) before and after, and the minutes and tokens it took;
l. Table 8 where the GPU is not launch-bound: Llama-3.2-1B- and 3B-shaped models with random weights
   (speed and memory do not depend on the values), dense, the structured 40% shape (``slim-40``'s share of
   blocks and feed-forward width on SmolLM2: 23 of 30 blocks, 806 of 1,536 neurons) and, for 1B, 2:4
   magnitude pruning on the semi-structured kernels; bf16 and fp32, batch-32 prefill of 512 tokens, greedy
   decoding, peak GPU memory, joules per token; then dense and structured bf16 decoding eager against
   compiled (a static KV cache under torch.compile: CUDA graphs, ``bench --decode compiled``).

``--steps`` picks and orders them (default ``abdce``: recovery after the bf16 table, the paper's claim).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the baseline recipes the steps compress, written as files beside the models (steps b and d share one)
RECIPE_FILES = {"sparsegpt-50": "sparsegpt: {sparsity: 0.5}\n", "two-four": "sparsegpt: {pattern: '2:4'}\n"}


def recipe_file(out: Path, name: str) -> Path:
    path = out / f"{name}.yaml"
    path.write_text(RECIPE_FILES[name])
    return path


class Steps:
    """Runs named steps, records each one's seconds and result (or its error), rewrites the report."""

    def __init__(self, out: Path, settings: dict) -> None:
        self.out, self.data = out, {"settings": settings, "steps": {}}

    def run(self, name: str, fn) -> object:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        try:
            result, status = fn(), "ok"
        except Exception as exc:  # a step that fails is reported; the next steps still run
            result, status = {"error": f"{type(exc).__name__}: {exc}"}, "failed"
        self.data["steps"][name] = {"status": status, "seconds": time.perf_counter() - start, "result": result}
        self.write()
        return result

    def write(self) -> None:
        from smartprune.files import write_results

        lines = ["# GPU run", "", f"settings: {self.data['settings']}", "", "| step | status | seconds |",
                 "|---|---|---:|"]
        lines += [f"| {k} | {v['status']} | {v['seconds']:.1f} |" for k, v in self.data["steps"].items()]
        for k, v in self.data["steps"].items():
            lines += ["", f"## {k}", "", "```", str(v["result"])[:4000], "```"]
        write_results(self.out, "gpu", self.data, "\n".join(lines) + "\n")


def tests(dry: bool) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "device", "-k",
           "cpu" if dry else "cuda", *(["--collect-only"] if dry else [])]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]
    if done.returncode != 0:
        raise RuntimeError(f"pytest exit {done.returncode}: {tail}")
    return {"summary": tail}


def compress_all(model: str, out: Path, device: str, limit: int | None, seqlen: int, calib: dict) -> dict:
    from smartprune.evaluation import perplexity
    from smartprune.runs.compress import compress_model
    from smartprune.storage.sources import load_model

    results = {}
    for name, recipe in (("sparsegpt-50", recipe_file(out, "sparsegpt-50")), ("smart-50", "smart-50"),
                         ("paper", "paper")):
        start = time.perf_counter()
        compress_model(model, recipe, out=out / name, device=device, overwrite=True, progress=False, **calib)
        seconds = time.perf_counter() - start
        loaded = load_model(str(out / name))
        loaded.model.to(device)
        ppl = perplexity(loaded.model, loaded.tokenizer, "wikitext2", seqlen=seqlen, limit=limit, progress=False)
        results[name] = {"seconds": seconds, "wikitext2": ppl.perplexity, "windows": ppl.windows}
    return results


def recover_all(model: str, out: Path, device: str, limit: int | None, seqlen: int, budget: dict,
                calib: dict) -> dict:
    import json

    from smartprune.adapters import get_adapter
    from smartprune.compression.accounting import block_linear_weights, unique_parameters
    from smartprune.runs.compress import compress_model
    from smartprune.storage.sources import load_model

    compress_model(model, "smart", out=out / "smart", device=device, overwrite=True, progress=False, **calib)
    removed = json.loads((out / "smart" / "report.json").read_text())["overall"]["compression"]
    dense = load_model(model).model  # SparseGPT on the block linears at smart's size (compare's match:smart)
    sparsity = min(0.99, removed * unique_parameters(dense) / block_linear_weights(get_adapter(dense)))
    (out / "sparsegpt-match.yaml").write_text(f"sparsegpt: {{sparsity: {sparsity:.6f}}}\n")
    compress_model(model, out / "sparsegpt-match.yaml", out=out / "sparsegpt-match", device=device, overwrite=True,
                   progress=False, **calib)
    results = {"smart_compression": removed, "sparsegpt_match_sparsity": sparsity}
    for name, source in (("smart", out / "smart"), ("sparsegpt-match", out / "sparsegpt-match"), ("dense", model)):
        results[name] = _retrained(model, Path(source), out / f"{name}-recovered", device, budget, (limit, seqlen))
    return results


def _retrained(teacher: str, source: Path, out: Path, device: str, budget: dict, windows: tuple) -> dict:
    """`source` retrained for `budget` (bfloat16 on a GPU) into `out`: WikiText-2 and PTB before and after
    (`windows`: limit, seqlen), and the steps, tokens and seconds it took."""
    from smartprune.evaluation import perplexity
    from smartprune.recipes.schema import RecoverConfig
    from smartprune.runs.recover import recover_model
    from smartprune.storage.sources import load_model

    cfg = RecoverConfig(compute_dtype="bfloat16" if device.startswith("cuda") else "float32", **budget)
    run = recover_model(str(source), teacher=teacher, out=out, cfg=cfg, device=device, overwrite=True,
                        progress=False)
    row: dict = {"recovery": {k: run.recovery[k] for k in ("steps", "tokens", "seconds")}}
    for label, folder in (("before", source), ("after", out)):
        loaded = load_model(str(folder))
        loaded.model.to(device)
        row[label] = {t: perplexity(loaded.model, loaded.tokenizer, t, seqlen=windows[1], limit=windows[0],
                                    progress=False).perplexity for t in ("wikitext2", "ptb")}
    return row


def table8(model: str, out: Path, device: str, dry: bool, dtype: str) -> dict:
    from smartprune.runs.bench import BenchSettings, bench
    from smartprune.runs.compress import compress_model

    calib = {"calib_samples": 8, "calib_seqlen": 32} if dry else {}
    # step b's SparseGPT model too, when b did not run
    for name, recipe in (("sparsegpt-50", recipe_file(out, "sparsegpt-50")), ("paper-structured", "paper-structured"),
                         ("two-four", recipe_file(out, "two-four"))):
        if not (out / name).is_dir():
            compress_model(model, recipe, out=out / name, device=device, overwrite=True, progress=False, **calib)
    specs = [model, str(out / "sparsegpt-50"), str(out / "paper-structured"), str(out / "two-four")]
    # One dtype per step, so a run cut short keeps the first. No fine-tuning step (not in Table 8), and 32
    # generated tokens: on the first H200 run four rounds of four models with 128 tokens and the training
    # step took 35 s each, over the time left (docs/gpu-results.md).
    settings = BenchSettings(repeats=1 if dry else 3, lengths=(32,) if dry else (512, 1024),
                             batches=(2,) if dry else (8, 32), rss=False, device=device, residencies=("dense",),
                             compute_dtypes=(dtype,), semi_structured=not dry, energy=True,
                             new_tokens=4 if dry else 32, train=False)
    return bench(specs, settings, progress=False).to_dict()


def _compare(model: str, out: Path, name: str, device: str, methods: str, sparsity: str, size: list[str]) -> dict:
    """`smartprune compare` on the device in float32 into ``out/name.json`` (rows kept in its .partial as they
    finish); the rows' perplexities, by method."""
    import json

    cmd = [sys.executable, "-m", "smartprune", "compare", model, "--device", device, "--compute-dtype", "float32",
           *size, "--methods", methods, "--sparsity", sparsity, "--json", str(out / f"{name}.json"), "--overwrite"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    (out / f"{name}-log.txt").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"compare exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    rows = json.loads((out / f"{name}.json").read_text())["rows"]
    return {f"{r['method']} {r['sparsity']}": {
        "compression": r["compression"], **r["perplexity"], "seconds": r["seconds"],
        **{f"{t} recovered": v for t, v in r.get("recovered", {}).get("perplexity", {}).items()}} for r in rows}


def _recipes(out: Path, names: list[str], dry: bool) -> list[str]:
    """Paths of benchmarks/recipes/NAME.yaml; for the dry run, copies at a size the tiny model can reach
    (its block linears are a sliver of it)."""
    import re

    recipes = ROOT / "benchmarks" / "recipes"
    if not dry:
        return [str(recipes / f"{n}.yaml") for n in names]
    for n in names:
        (out / f"{n}.yaml").write_text(re.sub(r"target: [0-9.]+", "target: 0.005", (recipes / f"{n}.yaml").read_text()))
    return [str(out / f"{n}.yaml") for n in names]


def owl50(model: str, out: Path, device: str, dry: bool) -> dict:
    smart, blocks, stage = _recipes(out, ["smart-bl50", "smart-bl50-blocks", "smart-bl50-blocks-stage"], dry)
    size = ["--limit", "1", "--seqlen", "32", "--calib-samples", "8", "--calib-seqlen", "32", "--recover-tokens",
            "128"] if dry else ["--limit", "32", "--recover-tokens", "10240"]
    return _compare(model, out, "owl50", device, f"dense,{smart},{blocks},{stage},owl-sparsegpt,owl-wanda,sparsegpt",
                    f"match:{smart}", size)


def spread(model: str, out: Path, device: str, dry: bool) -> dict:
    """The allocation over the block linears alone with a bounded spread, and measured jointly, at 50% and
    70%, beside uniform SparseGPT at each size (no retraining: the OWL issue's item 4)."""
    s50, s70, j50, j70 = _recipes(out, ["smart-bl50-blocks-spread", "smart-bl70-blocks-spread",
                                        "smart-bl50-blocks-joint", "smart-bl70-blocks-joint"], dry)
    size = ["--limit", "1", "--seqlen", "32", "--calib-samples", "8", "--calib-seqlen", "32"] if dry else \
        ["--limit", "32"]
    return _compare(model, out, "spread", device, f"{s50},{j50},{s70},{j70},sparsegpt", f"match:{s50},match:{s70}",
                    size)


def recover_structured(model: str, out: Path, device: str, dry: bool, budget: dict, calib: dict) -> dict:
    """Step g: slim-40, smart-40 and paper compressed on the device, retrained for the same budget in
    bfloat16, WikiText-2 and PTB before and after."""
    from smartprune.runs.compress import compress_model

    limit, seqlen = (1, 32) if dry else (32, 1024)
    # the dry run's tiny model cannot lose 40% to whole blocks and neurons at its size: its own fixed rates
    recipes = {"slim-40": _tiny_slim(out) if dry else "slim-40", "smart-40": "smart-40", "paper": "paper"}
    if dry:
        recipes["smart-40"] = _recipes(out, ["smart-bl50-joint"], dry)[0]
    results = {}
    for name, recipe in recipes.items():
        start = time.perf_counter()
        compress_model(model, recipe, out=out / f"g-{name}", device=device, overwrite=True, progress=False, **calib)
        row: dict = {"compress_seconds": time.perf_counter() - start}
        row.update(_retrained(model, out / f"g-{name}", out / f"g-{name}-recovered", device, budget, (limit, seqlen)))
        results[name] = row
    return results


def _tiny_slim(out: Path) -> Path:
    path = out / "tiny-slim.yaml"
    path.write_text("export: standard\ndepth: {rate: 0.5, iterative: false}\nff_neurons: {rate: 0.5}\n")
    return path


# Llama 3.2's published shapes (meta-llama/Llama-3.2-1B and -3B config.json), and the dry run's tiny one
SCALE = {"llama-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                      "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256},
         "llama-3b": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                      "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 128256}}
TINY_SCALE = {"llama-tiny": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4,
                             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 50257}}
KEPT_BLOCKS, KEPT_WIDTH = 23 / 30, 806 / 1536  # slim-40 on SmolLM2-135M (docs/structured-results.md)


def _scale_folders(out: Path, name: str, shape: dict, two_four: bool, device: str) -> list[str]:
    """Random-weight folders of `shape` (bf16 on disk): dense, its structured 40% shape, and 2:4. The GPT-2
    tokenizer of the data folder goes with them (its ids lie within every vocabulary here)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from smartprune.paths import data_dir
    from smartprune.runs.compress import compress_model

    tokenizer = AutoTokenizer.from_pretrained(data_dir() / "gpt2-tokenizer")
    folders = []
    slim = {**shape, "num_hidden_layers": max(1, round(shape["num_hidden_layers"] * KEPT_BLOCKS)),
            "intermediate_size": 32 * max(1, round(shape["intermediate_size"] * KEPT_WIDTH / 32))}
    for kind, cfg in (("dense", shape), ("structured-40", slim)):
        folder = out / f"{name}-{kind}"
        if not (folder / "config.json").is_file():
            torch.manual_seed(0)
            config = LlamaConfig(**cfg, tie_word_embeddings=True, max_position_embeddings=4096)
            AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        folders.append(str(folder))
    if two_four:
        folder = out / f"{name}-two-four"
        if not folder.is_dir():  # magnitude: no calibration text for a tokenizer-less random model
            (out / "magnitude-2-4.yaml").write_text("magnitude: {pattern: '2:4'}\n")
            compress_model(folders[0], out / "magnitude-2-4.yaml", out=folder, device=device, progress=False)
        folders.append(str(folder))
    return folders


def scale_table8(out: Path, device: str, dry: bool) -> dict:
    """Step l: Table 8 on Llama-3.2-shaped random models (see the module docstring)."""
    from smartprune.runs.bench import BenchSettings, bench

    results = {}
    for name, shape in (TINY_SCALE if dry else SCALE).items():
        folders = _scale_folders(out, name, shape, name != "llama-3b", device)
        common = {"repeats": 1 if dry else 3, "lengths": (32,) if dry else (512,), "batches": (2,) if dry else (32,),
                  "rss": False, "device": device, "residencies": ("dense",), "new_tokens": 4 if dry else 64,
                  "train": False, "energy": True}
        for dtype in ("bfloat16", "float32"):
            settings = BenchSettings(**common, compute_dtypes=(dtype,), semi_structured=not dry and dtype != "float32")
            results[f"{name} {dtype}"] = bench(folders, settings, progress=False).to_dict()
        settings = BenchSettings(**{**common, "energy": False}, compute_dtypes=("bfloat16",), decode="compiled")
        results[f"{name} bfloat16 compiled decode"] = bench(folders[:2], settings, progress=False).to_dict()
    return results


def tiny_model(out: Path) -> str:
    """A tiny Llama with the GPT-2 tokenizer of the data folder (the dry run's model)."""
    from transformers import AutoTokenizer

    from smartprune.paths import data_dir
    from smartprune.testing import family_model

    folder = out / "tiny-llama"
    family_model("llama", layers=2).save_pretrained(folder)
    AutoTokenizer.from_pretrained(data_dir() / "gpt2-tokenizer").save_pretrained(folder)
    return str(folder)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with a tiny model")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recover-minutes", type=float, default=2.0)
    p.add_argument("--steps", default="abdce",
                   help="which steps, in this order (default abdce: Table 8 in bfloat16 before recovery)")
    args = p.parse_args(argv)
    if not args.steps or set(args.steps) - set("abcdeosgl") or len(set(args.steps)) != len(args.steps):
        p.error(f"--steps takes each of a, b, c, d, e, o, s, g, l at most once, got {args.steps!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    model = tiny_model(args.out) if dry else args.model
    limit, seqlen = (2, 64) if dry else (None, 1024)
    calib = {"calib_samples": 8, "calib_seqlen": 32} if dry else {}
    budget = {"steps": 2, "seqlen": 32, "batch_size": 2, "eval_windows": 1} if dry else \
        {"minutes": args.recover_minutes, "seqlen": 1024, "batch_size": 8}
    steps = Steps(args.out, {"dry_run": dry, "device": device, "model": model, "recover": budget})
    todo = {"a": ("a_tests", lambda: tests(dry)),
            "b": ("b_compress", lambda: compress_all(model, args.out, device, limit, seqlen, calib)),
            "c": ("c_recover", lambda: recover_all(model, args.out, device, limit, seqlen, budget, calib)),
            "d": ("d_table8_bf16", lambda: table8(model, args.out, device, dry, "bfloat16")),
            "e": ("e_table8_fp32", lambda: table8(model, args.out, device, dry, "float32")),
            "o": ("o_owl50", lambda: owl50(model, args.out, device, dry)),
            "s": ("s_spread", lambda: spread(model, args.out, device, dry)),
            "g": ("g_recover_structured", lambda: recover_structured(model, args.out, device, dry, budget, calib)),
            "l": ("l_table8_scale", lambda: scale_table8(args.out, device, dry))}
    for letter in args.steps:
        steps.run(*todo[letter])
    failed = [k for k, v in steps.data["steps"].items() if v["status"] != "ok"]
    print("== done:", "all steps ok" if not failed else f"failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
