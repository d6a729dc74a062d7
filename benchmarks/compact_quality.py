"""What the memory and speed options cost in quality, on SmolLM2-135M: stored value dtypes (8-bit
included) and output-head options, each with WikiText-2 perplexity and the time of one forward.

For each MODEL (the dense model, then compressed folders):

- **stored values**: the model saved with ``smartprune.save(dtype=...)`` in float32, bfloat16 and
  int8, loaded back (compact residency), perplexity and size on disk;
- **output head**: as it is (tied to the input embedding), the dense original head kept beside the
  pruned embedding (``untie``; compressed models only, taken from the dense model, which is what the
  recipe's ``head: {kind: untie}`` gives with local objectives), and low-rank heads of each --ranks
  fitted to the model's final hidden states on calibration windows (``head: {kind: low-rank}``);
  perplexity, the head's own time on 512 hidden states and a 512-token forward (median of --repeats).

    python benchmarks/compact_quality.py smollm2-135m runs/compact/paper --out runs/compact/quality

Writes ``quality.json`` and ``quality.md`` in --out.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from smartprune.adapters import get_adapter
from smartprune.data import calibration
from smartprune.evaluation import perplexity
from smartprune.files import write_results
from smartprune.modules.head import head_gram, low_rank_head, tied
from smartprune.runs.bench import size_on_disk
from smartprune.storage.load import load
from smartprune.storage.save import save
from smartprune.storage.sources import is_compressed, load_model


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def _speed(model, repeats: int) -> dict:
    head = model.get_output_embeddings()
    h = torch.randn(1, 512, head.in_features, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, model.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
    return {"head_512_s": _median_time(lambda: head(h), repeats),
            "forward_512_s": _median_time(lambda: model(ids), repeats)}


def _ppl(model, tokenizer, limit: int) -> float:
    return perplexity(model, tokenizer, "wikitext2", seqlen=1024, limit=limit, progress=False).perplexity


def stored_values(spec: str, tokenizer, limit: int, work: Path) -> list[dict]:
    """Each dtype: save, load back compact, perplexity and file size."""
    source = load(spec, structured=False) if is_compressed(spec) else load_model(spec).model
    get_adapter(source)  # a dense model is saved in smartprune's layout too
    rows = []
    for dtype in ("float32", "bfloat16", "int8"):
        out = work / f"{Path(spec).name}-{dtype}"
        save(source, out, dtype=dtype, overwrite=True)
        model = load(out)
        rows.append({"model": spec, "dtype": dtype, "bytes": size_on_disk(str(out)),
                     "wikitext2_ppl": _ppl(model, tokenizer, limit)})
        print(rows[-1], flush=True)
    return rows


def heads(spec: str, dense_spec: str, tokenizer, ranks: list[int], limit: int, calib_ids, repeats: int) -> list[dict]:
    base = load(spec, resident="dense") if is_compressed(spec) else load_model(spec).model
    variants = {"tied (as is)" if tied(base) else "as is": base}
    if is_compressed(spec) and tied(base):  # the dense original head beside the pruned embedding
        untied = copy.deepcopy(base)
        dense_head = load_model(dense_spec).model.get_output_embeddings().weight.detach().clone()
        untied.set_output_embeddings(torch.nn.Linear(dense_head.shape[1], dense_head.shape[0], bias=False))
        untied.get_output_embeddings().weight.data = dense_head
        variants["untie: dense head"] = untied
    gram = head_gram(base, calib_ids)
    for r in ranks:
        m = copy.deepcopy(base)
        low_rank_head(m, r, gram)
        variants[f"low-rank {r}"] = m
    rows = []
    for name, model in variants.items():
        head = model.get_output_embeddings()
        rows.append({"model": spec, "head": name, "head_params": sum(p.numel() for p in head.parameters()),
                     "wikitext2_ppl": _ppl(model, tokenizer, limit), **_speed(model, repeats)})
        print(rows[-1], flush=True)
    return rows


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"WikiText-2 test perplexity over the first {s['limit']} windows of 1024 tokens; times: "
             f"{s['threads'] or 'all'} thread(s), median of {s['repeats']}.", "", "### Stored values", "",
             "| model | dtype | bytes on disk | WikiText-2 ppl |", "|---|---|---:|---:|"]
    lines += [f"| {r['model']} | {r['dtype']} | {r['bytes']:,} | {r['wikitext2_ppl']:.2f} |" for r in result["dtypes"]]
    lines += ["", "### Output head", "",
              "| model | head | head parameters | WikiText-2 ppl | head, 512 states (s) | forward, 512 tokens (s) |",
              "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['head']} | {r['head_params']:,} | {r['wikitext2_ppl']:.2f} | {r['head_512_s']:.3f} "
              f"| {r['forward_512_s']:.3f} |" for r in result["heads"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="the dense model first, then compressed folders")
    p.add_argument("--ranks", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--limit", type=int, default=8, help="perplexity windows (8)")
    p.add_argument("--calib-samples", type=int, default=32, help="windows the low-rank heads are fitted on (32)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    dense = load_model(args.models[0])
    calib = calibration(dense.tokenizer, "wikitext2", args.calib_samples, 512, 1, seed=0)
    result = {"settings": vars(args) | {"out": str(args.out)}, "dtypes": [], "heads": []}
    with tempfile.TemporaryDirectory(dir=args.out.parent if args.out.parent.exists() else None) as work:
        for spec in args.models:
            result["dtypes"] += stored_values(spec, dense.tokenizer, args.limit, Path(work))
            result["heads"] += heads(spec, args.models[0], dense.tokenizer, args.ranks, args.limit, calib.ids,
                                     args.repeats)
    write_results(args.out, "quality", result, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
