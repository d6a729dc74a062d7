"""Figures: titles, axes, lines and files, inspected on the matplotlib objects."""

import torch

from smartprune.compression.engine import compress
from smartprune.recipes import load_recipe
from smartprune.reporting.figures import curve_figure, layer_weights, save, weight_figure

from .conftest import tiny_model

SWEEP = {"settings": {"method": "irc", "tasks": ["wikitext2"]}, "points": [
    {"variant": "", "rate": 0.0, "results": {"wikitext2": {"perplexity": 30.0}}},
    *({"variant": v, "rate": r, "results": {"wikitext2": {"perplexity": 30.0 + 10 * r + i}}}
      for i, v in enumerate(("q", "k", "qk")) for r in (0.5, 1.0)),
]}


def test_curve_figure_has_one_line_per_variant_and_a_dense_line(tmp_path):
    fig = curve_figure(SWEEP, "wikitext2")
    ax = fig.axes[0]
    assert ax.get_title() == "irc: wikitext2 perplexity vs compression rate"
    assert ax.get_xlabel() == "irc compression rate (%)" and ax.get_ylabel() == "wikitext2 perplexity"
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["k", "q", "qk", "dense"]
    assert list(ax.get_lines()[0].get_xdata()) == [50.0, 100.0]
    assert ax.get_yscale() == "log"
    save(fig, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_weight_figure_shows_before_and_after_with_shape_and_sparsity(calib, tmp_path):
    import copy

    model = tiny_model("llama")
    before = layer_weights(copy.deepcopy(model), 0, embedding_rows=16)
    compress(model, None, load_recipe("paper"), calib=calib, progress=False)
    after = layer_weights(model, 0, embedding_rows=16)
    assert set(before) == set(after) and torch.equal(after["Q"][0], after["Q"][5])  # identical rows
    fig = weight_figure(before, after, "block 0")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert "Q before: 32x32, 0.0% zeros" in titles
    assert any(t.startswith("V after: 32x16, ") for t in titles)
    assert all(ax.get_xlabel() == "output feature (column)" for ax in fig.axes if ax.get_title())
    first = [ax for ax in fig.axes if ax.get_title().startswith("Q ")]
    assert first[0].images[0].get_clim() == first[1].images[0].get_clim()  # one colour scale per matrix
    save(fig, tmp_path / "w.png")
    assert (tmp_path / "w.png").stat().st_size > 1000
