"""Figures drawn from smartprune's own measurements (matplotlib, no display needed).

- `curve_figure`: a sweep's metric against the compression rate, one line per variant, the dense
  model as a dashed line (the paper's Figures 10, 11, 13-16).
- `weight_figure`: a block's Q, K, V, feed-forward and embedding weights before and after
  compression as heatmaps, before and after sharing one colour scale per matrix (Figures 5-9).
- `frontier_figure`: quality against running cost, one point per model and residency (``compare
  --measure``): perplexity against decoding speed and against the bytes held in memory.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; set before pyplot is imported

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from torch import Tensor, nn

from smartprune.adapters import get_adapter
from smartprune.runs.sweep import headline_metric


def _value(result: dict, metric: str) -> float | None:
    v = result.get(metric)
    return float(v) if isinstance(v, (int, float)) else None


def curve_figure(sweep: dict, task: str, metric: str | None = None) -> Figure:
    """`metric` of `task` against the rate (in %), one line per variant; the dense model dashed."""
    points = sweep["points"]
    dense = next((p for p in points if p["rate"] == 0), None)
    metric = metric or headline_metric(points[0]["results"][task])
    method = sweep["settings"]["method"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for variant in sorted({p["variant"] for p in points if p["rate"] > 0}):
        series = sorted((p for p in points if p["variant"] == variant and p["rate"] > 0), key=lambda p: p["rate"])
        xs = [100 * p["rate"] for p in series]
        ys = [_value(p["results"][task], metric) for p in series]
        ax.plot(xs, ys, marker="o", label=variant or method)
    if dense is not None and _value(dense["results"][task], metric) is not None:
        ax.axhline(_value(dense["results"][task], metric), color="grey", linestyle="--", label="dense")
    if metric in ("perplexity",):
        ax.set_yscale("log")
    ax.set_xlabel(f"{method} compression rate (%)")
    ax.set_ylabel(f"{task} {metric}")
    ax.set_title(f"{method}: {task} {metric} vs compression rate")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def layer_weights(model: nn.Module, block: int, embedding_rows: int = 256) -> dict[str, Tensor]:
    """Block `block`'s Q, K, V, first feed-forward matrix and the first rows of the token embedding,
    in the paper's d_in x d_out orientation (the model is converted in place if it is not yet)."""
    adapter = get_adapter(model)
    paths = adapter.linear_paths(block)
    if "q" not in paths:  # no table entry, roles unknown: the block's first four linear layers by name
        return {role: model.get_submodule(path).dense_weight() for role, path in list(paths.items())[:4]}
    ff_name, ff_path = next(iter(adapter.ff_paths(block).items()))
    out = {name: model.get_submodule(paths[role]).dense_weight() for name, role in (("Q", "q"), ("K", "k"), ("V", "v"))}
    out[f"FF ({ff_name})"] = model.get_submodule(ff_path).dense_weight()
    emb_path = adapter.embedding_paths()[0]
    out[f"embedding (first {embedding_rows} rows)"] = model.get_submodule(emb_path).weight.detach()[:embedding_rows]
    return out


def weight_figure(before: dict[str, Tensor], after: dict[str, Tensor], title: str) -> Figure:
    """Heatmaps: one row per matrix, before | after, one colour scale per row (99th percentile of |W|)."""
    names = list(before)
    fig, axes = plt.subplots(len(names), 2, figsize=(10, 3.6 * len(names)), squeeze=False, layout="constrained")
    for row, name in enumerate(names):
        scale = float(before[name].abs().flatten().float().quantile(0.99)) if before[name].numel() < 2**24 else \
            float(before[name].abs().max())
        scale = scale or 1.0
        for col, (label, w) in enumerate((("before", before[name]), ("after", after[name]))):
            ax = axes[row][col]
            image = ax.imshow(w.float().numpy(), cmap="RdBu_r", vmin=-scale, vmax=scale, aspect="auto",
                              interpolation="nearest")
            sparsity = float((w == 0).float().mean())
            rows, cols = w.shape
            ax.set_title(f"{name} {label}: {rows}x{cols}, {100 * sparsity:.1f}% zeros",
                         fontsize=9)
            ax.set_xlabel("output feature (column)")
            ax.set_ylabel("input feature (row)")
        fig.colorbar(image, ax=list(axes[row]), shrink=0.8, label="weight")
    fig.suptitle(title)
    return fig


def save(fig: Figure, path) -> None:
    """Write `fig` as a 256-colour PNG through a temporary file, then close it.

    Weight heatmaps are noise to a PNG compressor: in full RGB one picture is about 2 MB; a
    256-colour palette (the colour maps have 256 entries anyway) keeps it well under 1 MB."""
    import io
    import os
    import tempfile
    from pathlib import Path

    from PIL import Image

    from smartprune.files import umask

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        Image.open(buf).convert("RGB").quantize(256).save(tmp, format="PNG", optimize=True)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it private; the user's umask decides
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def recovery_figure(runs: dict[str, list[dict]], title: str) -> Figure:
    """Held-out perplexity against training tokens seen, one line per recovery run (log scale):
    `runs` maps a label to a recovery report's ``held_out`` list of {tokens, perplexity}."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    for label, points in runs.items():
        ax.plot([p["tokens"] for p in points], [p["perplexity"] for p in points], marker="o", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return fig


def frontier_figure(compare: dict) -> Figure:
    """Perplexity (recovered where retrained) of the first task against greedy decoding tokens/s and
    against the weight bytes held in memory, one point per measured row and residency; dense a star."""
    task = compare["settings"]["tasks"][0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    panels = (("generate_tokens_per_s", "greedy decoding tokens/s (batch 1)"),
              ("resident_bytes", "weights held in memory (MB)"))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for row in (r for r in compare["rows"] if "running" in r):
            ppl = row.get("recovered", row)["perplexity"][task]
            dense = row["method"] == "dense"
            for entry in row["running"]:
                value = entry["metrics"].get(key)
                if value is None:
                    continue
                x = value / 1e6 if key == "resident_bytes" else value
                ax.scatter(x, ppl, marker="*" if dense else ("o" if entry["resident"] == "dense" else "s"),
                           s=160 if dense else 40, color="black" if dense else None)
                ax.annotate(f"{row['method']} {row['sparsity']}" + ("" if dense else f" [{entry['resident']}]"),
                            (x, ppl), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel(f"{task} perplexity" + (" (after recovery)" if any("recovered" in r for r in compare["rows"])
                                              else ""))
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title("quality against speed (right is faster)")
    axes[1].set_title("quality against memory (left is smaller)")
    return fig
