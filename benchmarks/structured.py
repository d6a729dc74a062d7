"""Structured compression of SmolLM2-135M measured as a user would ship it: each result exported as a
smaller standard Hugging Face folder and timed in vanilla transformers, beside dense and SparseGPT.

Models: depth only, feed-forward width only (uniform) and the allocated mix (``overall`` over depth,
heads and width) at each --rates share of all parameters removed; SparseGPT at 50% of the block
linears (heads alone cannot reach the rates: a third of SmolLM2's query heads is ~5% of its
parameters). Each is compressed, scored (WikiText-2), retrained with the
same CPU budget (distillation from the dense model: ``--recover-steps`` of 4 x 128 tokens, the demo's
``--quick`` budget by default), scored again (WikiText-2 and PTB), and its exported folder benched in
one process against the dense model (fp32: greedy decoding tokens/s, batch 1, 128 new tokens; 512-token
prefill; batch-8 throughput; peak RSS of load + forward). A criteria section compares activation and
magnitude scores at 40% of the feed-forward neurons (one shot, no recovery).

    python benchmarks/structured.py --out runs/structured

Every step writes into --out and is skipped when its output exists (re-running resumes). Results:
``structured.json``, ``structured.md`` and ``structured.png`` in --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import yaml
from common import MODEL, QUICK_END_TO_END, cached, ppl  # beside this file: the benchmarks' shared helpers

from smartprune.evaluation import perplexity
from smartprune.files import read_json, write_results
from smartprune.recipes.schema import RecoverConfig
from smartprune.runs.bench import BenchSettings, bench
from smartprune.runs.compress import compress_model
from smartprune.runs.recover import recover_model
from smartprune.storage.sources import converted_builtin

GGUF_LIMIT = 8  # perplexity windows of the GGUF read-back check
# recovery steps (of the quick demo's 4 x 128 tokens): the budget the committed docs were measured with, the
# quick demo's until 2026-11-30 (now 8); benchmarks/frontier.py reuses these rows, so it shares the number
RECOVER_STEPS = 16


KINDS = ("depth", "width", "mix", "heads")


def recipes(rates: list[float], with_sparsegpt: bool = True, kinds: tuple[str, ...] = KINDS) -> dict[str, dict]:
    """The models in the order they are made (the 40% rate first when asked: the goal's rate)."""
    out: dict[str, dict] = {}
    for r in sorted(rates, key=lambda r: abs(r - 0.4)):
        pct = round(100 * r)
        depth = {"iterative": False}  # blocks ranked once by their skip loss (30 held-out evaluations, not ~350)
        out[f"depth-{pct}"] = {"overall": {"target": r}, "depth": depth}
        out[f"width-{pct}"] = {"overall": {"target": r}, "ff_neurons": {}}
        out[f"mix-{pct}"] = {"overall": {"target": r}, "depth": depth, "attn_heads": {}, "ff_neurons": {}}
        if len(out) == 3:  # after the first rate: the two rows of fixed size
            # heads alone cannot reach the rates: all attention is ~20% of SmolLM2's parameters; its largest
            # standard step keeping the key/value heads is 2 of the 3 query heads of every group (~10%)
            out["heads-10"] = {"attn_heads": {"rate": 0.67}}
            if with_sparsegpt:
                out["sparsegpt-50"] = {"sparsegpt": {"sparsity": 0.5}}
    return {name: r for name, r in out.items() if name.split("-")[0] in (*kinds, "sparsegpt")}


def _order(row: dict) -> tuple:
    kind, pct = row["name"].rsplit("-", 1)
    return (*KINDS, "sparsegpt").index(kind), int(pct)


CRITERIA = {"width-40-activation": {"ff_neurons": {"rate": 0.4, "criterion": "activation"}},
            "width-40-magnitude": {"ff_neurons": {"rate": 0.4, "criterion": "magnitude"}},
            "heads-33-activation": {"attn_heads": {"rate": 0.34, "criterion": "activation"}},
            "heads-33-magnitude": {"attn_heads": {"rate": 0.34, "criterion": "magnitude"}},
            # the paper's FPP schedule on whole neurons (per-block widths, weight norms, sign-balanced):
            # the held-out check measured WikiText-2 557,444 on 8 windows for it
            "fpp-ff-neuron-40": {"fpp_ff": {"target_sparsity": 0.4, "structure": "neuron"}}}


def tiny_criteria(seeds: int = 5) -> list[dict]:
    """Activation against magnitude scores on tiny random Llamas (GQA 6/2, 4 blocks): the KL divergence
    of the pruned model's next-token distribution from the dense one's on held-out random tokens (a
    random model has no text to be scored on; KL to its dense self is the damage), mean over seeds."""
    import torch
    import torch.nn.functional as F

    from smartprune.compression.engine import compress
    from smartprune.data import Calibration
    from smartprune.recipes.schema import build_recipe
    from smartprune.testing import family_model

    rows = []
    for stage, rate in (("ff_neurons", 0.4), ("attn_heads", 0.34)):
        for criterion in ("activation", "magnitude"):
            kls = []
            for seed in range(seeds):
                g = torch.Generator().manual_seed(seed)
                calib = Calibration(torch.randint(0, 100, (16, 32), generator=g),
                                    torch.randint(0, 100, (8, 32), generator=g), "random")
                model = family_model("llama", vocab=100, layers=4, seed=seed)
                held = torch.randint(0, 100, (8, 32), generator=g)
                with torch.no_grad():
                    want = F.log_softmax(model(held).logits, -1)
                recipe = build_recipe({stage: {"rate": rate, "criterion": criterion}}, "tiny", "benchmark")
                compress(model, None, recipe, calib=calib, seed=seed, progress=False)
                with torch.no_grad():
                    got = F.log_softmax(model(held).logits, -1)
                kls.append(F.kl_div(got, want, log_target=True, reduction="batchmean").item() / held.shape[1])
            rows.append({"stage": stage, "rate": rate, "criterion": criterion, "kl_per_token": sum(kls) / len(kls),
                         "seeds": seeds})
    return rows


def run_model(name: str, recipe: dict, out: Path, limit: int, steps: int) -> dict:
    print(f"== {name}", flush=True)
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    if not (folder / "hf").is_dir():
        compress_model(MODEL, folder / "recipe.yaml", out=folder / "compressed", dense_out=folder / "hf",
                       overwrite=True, progress=False)
    report = read_json(folder / "compressed" / "report.json", "report")
    before = cached(folder / "before.json", lambda: {"wikitext2": ppl(folder / "hf", "wikitext2", limit)})
    if steps and not (folder / "recovered-hf").is_dir():
        cfg = RecoverConfig(**{**QUICK_END_TO_END, "steps": steps})
        recover_model(str(folder / "compressed"), teacher=MODEL, out=folder / "recovered", cfg=cfg,
                      dense_out=folder / "recovered-hf", overwrite=True, progress=False)
    final = folder / ("recovered-hf" if steps else "hf")
    after = cached(folder / "after.json", lambda: {t: ppl(final, t, limit) for t in ("wikitext2", "ptb")})
    config = json.loads((final / "config.json").read_text())
    plan = report.get("structure", {}).get("plan", {})
    return {"name": name, "recipe": recipe, "compression": report["overall"]["compression"],
            "params_after": report["overall"]["params_after"], "structure": plan.get("chosen"),
            "config": {k: config.get(k) for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                                   "intermediate_size")},
            "before": before, "after": after, "folder": str(final)}


def run_criteria(out: Path) -> list[dict]:
    rows = []
    for name, recipe in CRITERIA.items():
        folder = out / "criteria" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        if not (folder / "hf").is_dir():
            compress_model(MODEL, folder / "recipe.yaml", out=folder / "compressed", dense_out=folder / "hf",
                           overwrite=True, progress=False)
        rows.append({"name": name, **cached(folder / "before.json",
                                             lambda f=folder: {"wikitext2": ppl(f / "hf", "wikitext2", 8)})})
    return rows


def run_gguf(out: Path, row: dict, limit: int) -> dict:
    """Write `row`'s exported folder as GGUF (each type), read it back with transformers' GGUF loader and
    compare: logits on 256 WikiText-2 test tokens and perplexity, against the folder itself."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smartprune.data import eval_text
    from smartprune.storage.gguf_writer import write_gguf

    folder = Path(row["folder"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(eval_text("wikitext2")[:4000], return_tensors="pt").input_ids[:, :256]
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        want = reference(ids).logits
    rows = [{"type": "safetensors folder", "bytes": (folder / "model.safetensors").stat().st_size,
             "wikitext2": ppl(folder, "wikitext2", limit)}]
    for kind in ("f32", "f16", "q8_0"):
        path = out / "gguf" / f"{row['name']}-{kind}.gguf"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_gguf(reference, path, tokenizer=tokenizer, gguf_type=kind)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        with torch.no_grad():
            got = model(ids).logits
        r = perplexity(model, tokenizer, "wikitext2", limit=limit, progress=False)
        rows.append({"type": kind, "bytes": path.stat().st_size, "max_abs_logit_diff": (got - want).abs().max().item(),
                     "relative": ((got - want).abs().max() / want.abs().max()).item(),
                     "same_argmax": (got.argmax(-1) == want.argmax(-1)).float().mean().item(),
                     "wikitext2": {"perplexity": r.perplexity, "windows": r.windows}})
    return {"model": row["name"], "rows": rows}


def markdown(data: dict) -> str:
    dense = data["dense"]
    speed = {m["name"]: m for m in data["bench"]["models"]}
    lines = ["# Structured compression of SmolLM2-135M, exported and run in vanilla transformers", "",
             f"WikiText-2 / PTB test perplexity on the first {data['limit']} windows of 1024 tokens; recovery: "
             f"{data['steps']} steps of 4 x 128 tokens (distillation from the dense model); speed of the exported "
             "folder in vanilla transformers, fp32, (xN): N times dense from the same run (for the prefill time: N "
             "times faster).", "",
             "| model | removed | layers / heads / kv / ffn | WT2 before | WT2 after | PTB after | decode tok/s | "
             "512 prefill s | batch-8 seq/s | peak RSS MB |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in [dense, *data["models"]]:
        m = speed.get(row["folder"], {"metrics": {}, "ratios": {}})

        def cell(key: str, scale: float = 1, digits: int = 2, m=m, base=row is dense) -> str:
            if key not in m["metrics"]:
                return "-"
            ratio = m["ratios"][key] if not key.startswith("latency") else 1 / m["ratios"][key]  # xN: N times faster
            return f"{m['metrics'][key] * scale:,.{digits}f}" + ("" if base else f" (x{ratio:.2f})")

        c = row["config"]
        shape = f"{c['num_hidden_layers']} / {c['num_attention_heads']} / {c['num_key_value_heads']} / " \
                f"{c['intermediate_size']}"
        lines.append(f"| {row['name']} | {100 * row['compression']:.1f}% | {shape} | "
                     f"{row['before']['wikitext2']['perplexity']:,.2f} | "
                     f"{row['after']['wikitext2']['perplexity']:,.2f} | "
                     f"{row['after']['ptb']['perplexity']:,.2f} | {cell('generate_tokens_per_s')} | "
                     f"{cell('latency_b1_512', 1, 3)} | {cell('throughput_seq_per_s')} | "
                     f"{cell('peak_rss_bytes', 1e-6, 0)} |")
    lines += ["", "Allocation (mix rows): blocks removed, query heads removed per group, feed-forward neurons removed "
              "per block, chosen by held-out loss among the candidates that meet the target:", ""]
    for row in data["models"]:
        if row["structure"]:
            s = row["structure"]
            lines.append(f"- {row['name']}: {s['blocks_removed']} blocks, {s['heads_removed_per_group']} heads per "
                         f"group, {s['neurons_removed_per_block']} neurons per block (held-out loss "
                         f"{s['held_out_loss']:.3f}, {100 * s['compression']:.2f}%)")
    lines += ["", "Importance criteria, one shot, no recovery (WikiText-2, first 8 windows): 40% of the feed-forward "
              "neurons, a third of the query heads, and FPP's neuron schedule at 40%:", "",
              "| stage | WikiText-2 |", "|---|---:|"]
    lines += [f"| {r['name']} | {r['wikitext2']['perplexity']:,.2f} |" for r in data["criteria"]]
    if data.get("tiny_criteria"):
        lines += ["", "The same criteria on tiny random Llamas (GQA 6/2, 4 blocks; KL divergence of the pruned model's "
                  "next-token distribution from the dense one's on held-out random tokens, per token, mean of "
                  f"{data['tiny_criteria'][0]['seeds']} seeds; lower is better):", "",
                  "| stage | rate | criterion | KL per token |", "|---|---:|---|---:|"]
        lines += [f"| {r['stage']} | {r['rate']} | {r['criterion']} | {r['kl_per_token']:.4f} |"
                  for r in data["tiny_criteria"]]
    if data.get("gguf"):
        g = data["gguf"]
        lines += ["", f"GGUF export of {g['model']} read back with transformers' GGUF loader (logits on 256 WikiText-2 "
                  f"test tokens against the exported folder; perplexity on the first {data['gguf_limit']} windows):",
                  "", "| file | MB | max abs logit diff | relative | same greedy token | WikiText-2 |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in g["rows"]:
            diff = [f"{r[k]:.2e}" if k in r else "-" for k in ("max_abs_logit_diff", "relative")]
            same = f"{100 * r['same_argmax']:.1f}%" if "same_argmax" in r else "-"
            lines.append(f"| {r['type']} | {r['bytes'] / 1e6:,.1f} | {diff[0]} | {diff[1]} | {same} | "
                         f"{r['wikitext2']['perplexity']:,.2f} |")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = {m["name"]: m for m in data["bench"]["models"]}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in [data["dense"], *data["models"]]:
        m = speed.get(row["folder"])
        if m is None:
            continue
        x, y = m["metrics"]["generate_tokens_per_s"], row["after"]["wikitext2"]["perplexity"]
        ax.scatter(x, y, marker="*" if row is data["dense"] else "o", s=120 if row is data["dense"] else 40)
        ax.annotate(row["name"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("greedy decoding tokens/s (vanilla transformers, fp32, this CPU)")
    ax.set_ylabel(f"WikiText-2 perplexity after recovery ({data['limit']} windows)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.4, 0.5])
    p.add_argument("--limit", type=int, default=32, help="evaluation windows per task (32)")
    p.add_argument("--recover-steps", type=int, default=RECOVER_STEPS)
    p.add_argument("--repeats", type=int, default=2, help="bench rounds (2)")
    p.add_argument("--gguf-model", default="depth-40", help="the model written as GGUF and read back (depth-40)")
    p.add_argument("--no-sparsegpt", action="store_true", help="leave out the SparseGPT 50%% row")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="structured kinds (all)")
    p.add_argument("--no-bench", action="store_true", help="make and score the models only (e.g. for frontier.py)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dense_folder = str(converted_builtin(MODEL))
    dense = {"name": "dense", "compression": 0.0, "structure": None, "folder": dense_folder,
             "config": {k: v for k, v in json.loads((Path(dense_folder) / "config.json").read_text()).items()
                        if k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                 "intermediate_size")},
             **{k: v for k, v in cached(args.out / "dense.json", lambda: {
                 "before": {"wikitext2": ppl(Path(dense_folder), "wikitext2", args.limit)},
                 "after": {t: ppl(Path(dense_folder), t, args.limit) for t in ("wikitext2", "ptb")}}).items()}}
    models, gguf = [], None
    for name, recipe in recipes(args.rates, not args.no_sparsegpt, tuple(args.kinds)).items():
        models.append(run_model(name, recipe, args.out, args.limit, args.recover_steps))
        if name == args.gguf_model:  # early: the check is short and its model made
            print("== gguf", flush=True)
            gguf = cached(args.out / "gguf" / "gguf.json", lambda row=models[-1]: run_gguf(args.out, row, GGUF_LIMIT))
    models.sort(key=_order)
    if args.no_bench:
        return
    print("== bench", flush=True)
    names = "-".join(m["name"] for m in models)
    timed = cached(args.out / f"bench-{hashlib.sha256(names.encode()).hexdigest()[:8]}.json", lambda: bench(
        [dense_folder, *[m["folder"] for m in models]],
        BenchSettings(repeats=args.repeats, lengths=(512,), batches=(8,), residencies=("dense",), device="cpu",
                      compute_dtypes=("float32",), train=False), progress=False).to_dict())
    data = {"model": MODEL, "limit": args.limit, "steps": args.recover_steps, "dense": dense, "models": models,
            "criteria": [], "bench": timed, "gguf": gguf, "gguf_limit": GGUF_LIMIT}
    write_results(args.out, "structured", data, markdown(data))  # the speed table first, then the criteria
    plot(data, args.out / "structured.png")
    print("== criteria", flush=True)
    data["criteria"] = run_criteria(args.out)
    data["tiny_criteria"] = cached(args.out / "criteria" / "tiny.json", lambda: {"rows": tiny_criteria()})["rows"]
    write_results(args.out, "structured", data, markdown(data))


if __name__ == "__main__":
    main()
