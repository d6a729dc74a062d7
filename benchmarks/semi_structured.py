"""Speed of 2:4 feed-forward products on a GPU: dense vs torch's semi-structured sparse tensors.

For each feed-forward shape of MODEL (a folder compressed with a 2:4 pattern, e.g. with
``benchmarks/recipes/ff-2of4.yaml``; without MODEL, SmolLM2-135M's shapes with random 2:4 weights),
times ``F.linear`` on the dense matrix and on its semi-structured twin at several token counts, in
bfloat16, CUDA-synchronized, median of --repeats after a warm-up. With MODEL it also times one whole
forward (batch x 512 tokens) before and after `use_semi_structured` and reports the largest logit
difference between the two.

    python benchmarks/semi_structured.py runs/ff24 --out runs/semi

Writes ``semi.json`` and ``semi.md`` in --out. Needs a CUDA GPU (on a CPU: one line, exit 2).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from smartprune.files import write_results
from smartprune.modules.semistructured import _to_semi_structured, use_semi_structured

SMOLLM2_FF = [(576, 1536), (1536, 576)]  # (d_in, d_out): gate/up, down


def _time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def random_two_four(d_in: int, d_out: int, seed: int) -> torch.Tensor:
    """A d_in x d_out matrix keeping the 2 largest of every 4 consecutive inputs of each output."""
    w = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed))
    groups = w.view(d_out, d_in // 4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.abs().topk(2, dim=2).indices, True)
    return (groups * keep).view(d_out, d_in).T.contiguous()


def products(weights: dict[str, torch.Tensor], tokens: list[int], repeats: int, dtype: torch.dtype) -> list[dict]:
    rows = []
    for name, w in weights.items():
        w_t = w.T.contiguous().to("cuda", dtype)
        sparse = _to_semi_structured(w_t)
        for n in tokens:
            x = torch.randn(n, w.shape[0], device="cuda", dtype=dtype)
            dense_s = _time(lambda x=x, w_t=w_t: F.linear(x, w_t), repeats)
            sparse_s = _time(lambda x=x, sparse=sparse: F.linear(x, sparse), repeats)
            err = (F.linear(x, sparse) - F.linear(x, w_t)).abs().max().item()
            rows.append({"matrix": name, "d_in": w.shape[0], "d_out": w.shape[1], "tokens": n,
                         "dense_s": dense_s, "semi_s": sparse_s, "speedup": dense_s / sparse_s, "max_abs_diff": err})
            print(rows[-1], flush=True)
    return rows


def whole_model(spec: str, batch: int, repeats: int, dtype: torch.dtype) -> dict:
    from smartprune.storage.sources import load_model

    dense = load_model(spec, resident="dense").model.to("cuda", dtype)
    sparse = copy.deepcopy(dense)
    swapped = use_semi_structured(sparse, dtype)
    ids = torch.randint(0, dense.config.vocab_size, (batch, 512), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        diff = (sparse(ids).logits.float() - dense(ids).logits.float()).abs().max().item()
        dense_s = _time(lambda: dense(ids), repeats)
        sparse_s = _time(lambda: sparse(ids), repeats)
    return {"model": spec, "batch": batch, "tokens": 512, "swapped": len(swapped), "dense_s": dense_s,
            "semi_s": sparse_s, "speedup": dense_s / sparse_s, "max_logit_diff": diff}


def markdown(result: dict) -> str:
    lines = [f"{result['gpu']}, torch {result['torch']}, {result['dtype']}; median of {result['repeats']} after a "
             "warm-up; speed-up = dense time / semi-structured time.", "",
             "| matrix | d_in x d_out | tokens | dense (ms) | 2:4 semi-structured (ms) | speed-up | max abs diff |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['matrix']} | {r['d_in']}x{r['d_out']} | {r['tokens']} | {r['dense_s'] * 1e3:.4f} | "
              f"{r['semi_s'] * 1e3:.4f} | {r['speedup']:.2f}x | {r['max_abs_diff']:.2g} |" for r in result["products"]]
    if result.get("model"):
        m = result["model"]
        lines += ["", f"Whole model {m['model']} ({m['swapped']} projections swapped), batch {m['batch']} x 512: "
                  f"dense {m['dense_s'] * 1e3:.2f} ms, semi-structured {m['semi_s'] * 1e3:.2f} ms "
                  f"({m['speedup']:.2f}x); largest logit difference {m['max_logit_diff']:.3g}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", help="a folder compressed with a 2:4 pattern (default: random 2:4 matrices)")
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192, 32768])
    p.add_argument("--batch", type=int, default=8, help="whole-model forward: sequences of 512 tokens (8)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("semi_structured.py: semi-structured (2:4) sparse kernels need a CUDA GPU; none is visible",
              file=sys.stderr)
        sys.exit(2)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    if args.model:
        from smartprune.storage.sources import load_model

        model = load_model(args.model, resident="dense").model
        block = model.get_decoder().layers[0].mlp
        weights = {n: m.weight.detach() for n, m in block.named_children() if hasattr(m, "weight")}
        weights = {n: w for n, w in weights.items() if w.dim() == 2}
    else:
        weights = {f"random {i}": random_two_four(*shape, seed=i) for i, shape in enumerate(SMOLLM2_FF)}
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": args.dtype,
              "repeats": args.repeats, "products": products(weights, args.tokens, args.repeats, dtype)}
    if args.model:
        result["model"] = whole_model(args.model, args.batch, args.repeats, dtype)
    write_results(args.out, "semi", result, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
