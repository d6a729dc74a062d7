"""Magnitude, Wanda and SparseGPT: ordering on a correlated layer, exact sparsity, N:M, singular Hessians."""

import pytest
import torch

from smartprune.compression.engine import compress
from smartprune.methods.base import InputStats
from smartprune.methods.criteria import wanda_score
from smartprune.methods.pruning import lowest_in_matrix, lowest_n_of_m, lowest_per_row, spread
from smartprune.methods.sparsegpt import sparsegpt, sparsegpt_at_rates
from smartprune.recipes.schema import build_recipe

from .conftest import tiny_model


def _correlated_layer(d_in=64, d_out=48, n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    mix = torch.eye(d_in, dtype=torch.float64) + 0.6 * torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    # features of very different size, in no particular order (SparseGPT gives each block of columns
    # the same sparsity, as the reference does, so scales sorted by column would be a pathological case)
    scales = torch.logspace(-1, 1, d_in, dtype=torch.float64)[torch.randperm(d_in, generator=g)]
    x = (z @ mix) * scales
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    stats = InputStats(d_in)
    stats.add_batch(x)
    return x, w, stats


def test_reconstruction_error_orders_sparsegpt_below_wanda_below_magnitude():
    x, w, stats = _correlated_layer(d_in=384, d_out=64, n=4096)  # three 128-column blocks

    def error(pruned):
        return (x @ w.T - x @ pruned.T).pow(2).sum().item()

    mag = w.masked_fill(lowest_in_matrix(w.abs(), w.numel() // 2), 0)
    wanda = w.masked_fill(lowest_per_row(wanda_score(w, stats.feature_norms, inputs=1), 0.5), 0)
    sgpt, prune = sparsegpt(w, stats.gram, 0.5)
    assert int(prune.sum()) == w.numel() // 2 and torch.equal(sgpt[prune], torch.zeros(int(prune.sum()),
                                                                                           dtype=sgpt.dtype))
    assert error(sgpt) < error(wanda) < error(mag)


def test_counts_are_exact_and_n_m_groups_hold_exactly_n_zeros():
    assert spread(10, 4).tolist() == [3, 3, 2, 2]
    score = torch.rand(7, 12)
    assert int(lowest_per_row(score, 0.7).sum()) == round(0.7 * 84)
    nm = lowest_n_of_m(score, 2, 4)
    assert (nm.view(7, 3, 4).sum(-1) == 2).all()
    _, w, stats = _correlated_layer(d_in=32, d_out=8)
    _, prune = sparsegpt(w, stats.gram, 0.0, nm=(4, 8), blocksize=16)
    assert (prune.view(8, 4, 8).sum(-1) == 4).all()


def test_singular_hessian_with_dead_inputs_gives_no_nans():
    x, w, _ = _correlated_layer(d_in=32, d_out=8)
    x[:, [3, 7, 20]] = 0.0  # inputs that never fire
    stats = InputStats(32)
    stats.add_batch(x)
    new, prune = sparsegpt(w, stats.gram, 0.5, blocksize=8)
    assert torch.isfinite(new).all()
    assert (new[:, [3, 7, 20]] == 0).all()
    assert int(prune.sum()) == 128


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_every_method_reaches_its_sparsity_exactly_on_conv1d_and_linear(method, pattern, kind, calib):
    recipe = build_recipe({method: {"sparsity": 0.7, "pattern": pattern}}, "t", "t")
    model = tiny_model(kind)
    result = compress(model, None, recipe, calib=calib, progress=False)
    a = result.adapter
    for i in range(2):
        for proj in [*a.attention_projections(i).as_dict().values(), *a.ff_projections(i).values()]:
            n = proj.weight.numel()
            if pattern == "2:4":
                gone = ~proj.mask.T  # (d_out, d_in)
                assert (gone.reshape(proj.d_out, -1, 4).sum(-1) == 2).all()
            else:
                assert n - proj.alive() == round(0.7 * n)
            assert torch.equal(proj.weight[~proj.mask], torch.zeros(n - proj.alive()))


def test_global_magnitude_is_exact_over_all_block_linears(calib):
    recipe = build_recipe({"magnitude": {"sparsity": 0.6, "scope": "global"}}, "t", "t")
    result = compress(tiny_model("llama"), None, recipe, calib=calib, progress=False)
    a = result.adapter
    projs = [p for i in range(2) for p in [*a.attention_projections(i).as_dict().values(),
                                          *a.ff_projections(i).values()]]
    total = sum(p.weight.numel() for p in projs)
    assert sum(p.weight.numel() - p.alive() for p in projs) == round(0.6 * total)
    per_matrix = {round(1 - p.alive() / p.weight.numel(), 2) for p in projs}
    assert len(per_matrix) > 1  # one threshold, so matrices end at different sparsities


def test_owl_sparsities_by_hand():
    from smartprune.compression.owl import outlier_ratio, owl_sparsities

    # scores 1, 1, 1, 1, 10: mean 2.8, m 1.5 -> the threshold 4.2 leaves one outlier of five
    assert outlier_ratio([torch.tensor([1.0, 1.0]), torch.tensor([[1.0, 1.0, 10.0]])], 1.5) == pytest.approx(0.2)
    # ratios scaled into [0, 2 * 0.08] = 0, 0.08, 0.16; centred on the kept share 0.3: 0.22, 0.30, 0.38 kept
    assert owl_sparsities([0.01, 0.02, 0.03], 0.7, 0.08) == pytest.approx([0.78, 0.70, 0.62])
    assert owl_sparsities([0.05, 0.05], 0.5, 0.08) == pytest.approx([0.5, 0.5])  # no outlier difference: uniform


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_owl_spreads_block_sparsities_around_the_target_and_keeps_the_mean(method, calib):
    from smartprune.testing import family_model

    recipe = build_recipe({method: {"sparsity": 0.6, "owl": {"m": 3, "lambda": 0.1}}}, "t", "t")
    assert recipe.stages[method].owl.lam == 0.1
    result = compress(family_model("llama", vocab=100, layers=4, seed=0), None, recipe, calib=calib, progress=False)
    owl = result.report["owl"]
    assert len(owl["sparsities"]) == 4 and owl["m"] == 3 and owl["lambda"] == 0.1
    assert sum(owl["sparsities"]) / 4 == pytest.approx(0.6)
    # OWL's normalisation: a span of 2 * lambda (not +- lambda around the target: the ratios place the mean)
    assert max(owl["sparsities"]) - min(owl["sparsities"]) == pytest.approx(0.2)
    a = result.adapter
    for i, want in enumerate(owl["sparsities"]):  # each block's matrices hold its sparsity
        for proj in [*a.attention_projections(i).as_dict().values(), *a.ff_projections(i).values()]:
            n = proj.weight.numel()
            assert n - proj.alive() == round(want * n)
    # more outliers, pruned less
    order = sorted(range(4), key=lambda i: owl["outlier_ratios"][i])
    assert [owl["sparsities"][i] for i in order] == sorted(owl["sparsities"], reverse=True)


def test_owl_is_refused_where_it_cannot_apply():
    from smartprune.errors import RecipeError

    for fields, message in (({"sparsegpt": {"pattern": "2:4", "owl": {}}}, "needs unstructured"),
                            ({"sparsegpt": {"owl": {}}, "overall": {"target": 0.4}}, "keep one"),
                            ({"magnitude": {"scope": "global", "owl": {}}}, "one sparsity per block"),
                            ({"wanda": {"owl": {"lamda": 0.1}}}, "did you mean 'lambda'")):
        with pytest.raises(RecipeError, match=message):
            build_recipe(fields, "t", "t")


def test_sparsegpt_at_several_rates_in_one_sweep_equals_one_sweep_per_rate():
    _, w, stats = _correlated_layer(d_in=96, d_out=24)
    rates = [0.1, 0.45, 0.8]
    together = sparsegpt_at_rates(w, stats.gram, rates, blocksize=32)
    for rate, version in zip(rates, together, strict=True):
        alone, prune = sparsegpt(w, stats.gram, rate, blocksize=32)
        assert torch.equal(version, alone) and int((version == 0).sum()) == int(prune.sum()) == round(rate * w.numel())


def _textbook_sparsegpt(w: torch.Tensor, gram: torch.Tensor, sparsity: float, blocksize: int,
                        nm: tuple[int, int] | None = None) -> torch.Tensor:
    """SparseGPT without any lazy update: every pruned column's error applied to all later columns at
    once, the mask of each block chosen from the weights as they are when the block starts."""
    from smartprune.methods.sparsegpt import inverse_hessian_factor

    hinv, _ = inverse_hessian_factor(gram)
    w = w.clone().double()
    rows, cols = w.shape
    total = round(sparsity * rows * cols)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        d = hinv.diagonal()[i1:i2]
        mask = lowest_in_matrix(w[:, i1:i2].pow(2) / d.pow(2), round(total * i2 / cols) - round(total * i1 / cols))
        for i in range(i1, i2):
            if nm is not None and (i - i1) % nm[1] == 0:
                g = slice(i, i + nm[1])
                mask[:, g.start - i1:g.stop - i1] = lowest_n_of_m(w[:, g].pow(2) / hinv.diagonal()[g].pow(2), *nm)
            err = torch.where(mask[:, i - i1], w[:, i], torch.zeros_like(w[:, i])) / hinv[i, i]
            w[:, i:] -= err[:, None] * hinv[i, i:]
            w[mask[:, i - i1], i] = 0.0
    return w


@pytest.mark.parametrize("blocksize,nm", [(40, None), (128, None), (24, (2, 4))])
def test_lazy_sweep_equals_the_textbook_column_by_column_update(blocksize, nm):
    # the sweep updates within a block lazily too (16 columns at a time, the rest by one product):
    # the same sums in another order, so the same weights to float64 rounding and the same masks
    _, w, stats = _correlated_layer(d_in=96, d_out=24)
    w = (w * 4).round() / 4  # few distinct values, as in a quantized file: ties in the first block's scores
    expected = _textbook_sparsegpt(w, stats.gram, 0.5 if nm is None else 0.0, blocksize, nm)
    got, prune = sparsegpt(w, stats.gram, 0.5 if nm is None else 0.0, nm=nm, blocksize=blocksize)
    assert torch.equal(prune, expected == 0)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_lowest_in_matrix_is_top_k_choice_with_ties_at_the_threshold_or_without():
    no_ties = torch.tensor([[0.3, 0.1], [0.4, 0.2]])
    assert lowest_in_matrix(no_ties, 2).tolist() == [[False, True], [False, True]]
    tied = torch.tensor([1.0, 1.0, 1.0, 2.0, 0.0, 1.0] * 50)  # 200 ones tie across the threshold
    expected = torch.zeros(300, dtype=torch.bool)
    expected[torch.topk(tied, 120, largest=False).indices] = True
    got = lowest_in_matrix(tied, 120)
    assert int(got.sum()) == 120 and torch.equal(got, expected)
    assert lowest_in_matrix(tied, 0).sum() == 0 and lowest_in_matrix(tied, 300).all()
