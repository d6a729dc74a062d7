"""Identical Row Compression on hand-sized matrices."""

import torch

from smartprune.adapters import get_adapter
from smartprune.methods.base import InputStats, Sublayer
from smartprune.methods.config import StrategyConfig
from smartprune.methods.irc import IRCConfig, IRCStage, least_squares_row
from smartprune.modules.masked import FoldedProjection

from .conftest import tiny_model

W = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0], [-1.0, 0.0, 1.0]])


def test_full_fold_makes_every_row_the_shared_vector_and_uses_feature_sums():
    q = torch.tensor([4.0, 5.0, 6.0])
    proj = FoldedProjection(W, torch.tensor([0.5, 0.0, -0.5]), torch.ones(4, dtype=torch.bool), q)
    dense = proj.dense_weight()
    assert torch.equal(dense, q.expand(4, 3))
    x = torch.tensor([[1.0, 2.0, 0.0, -1.0]])  # feature sum s = 2
    assert torch.allclose(proj(x), torch.tensor([[8.5, 10.0, 11.5]]))
    assert proj.alive() == 3  # only the vector is stored
    assert proj.weight.numel() == 0


def test_partial_fold_keeps_free_rows_and_matches_dense_product():
    folded = torch.tensor([True, False, True, False])
    q = torch.tensor([1.0, 1.0, 1.0])
    proj = FoldedProjection(W, None, folded, q)
    expected_w = torch.stack([q, W[1], q, W[3]])
    assert torch.equal(proj.dense_weight(), expected_w)
    x = torch.randn(5, 4)
    assert torch.allclose(proj(x), x @ expected_w, atol=1e-6)
    assert proj.alive() == 2 * 3 + 3


def test_fit_init_is_the_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=g, dtype=torch.float64)
    stats = InputStats(4)
    stats.add_batch(x)
    for folded in (torch.ones(4, dtype=torch.bool), torch.tensor([True, True, False, True])):
        q = least_squares_row(stats.gram, W.double(), folded)
        s = x[:, folded].sum(1, keepdim=True)
        expected = torch.linalg.lstsq(s, x[:, folded] @ W.double()[folded]).solution[0]
        assert torch.allclose(q, expected, atol=1e-10)
        # and it is the formula of METHOD.md: q = (s^T X_m W_m) / (s^T s)
        assert torch.allclose(q, (s.T @ x[:, folded] @ W.double()[folded])[0] / (s.T @ s)[0, 0], atol=1e-10)


def _attention_sublayer(kind="llama"):
    model = tiny_model(kind)
    adapter = get_adapter(model)
    x = torch.randn(4, 8, 32)
    stats = InputStats(32)
    stats.add_batch(x)
    with torch.no_grad():
        target = adapter.attention(0, x)
    return Sublayer(adapter, "attention", 0, adapter.attention_paths(0), x, target, stats)


def test_stage_folds_the_rate_share_of_rows_and_grows_monotonically():
    sub = _attention_sublayer()
    stage = IRCStage(IRCConfig(variant="k", rate=1.0), sub, torch.Generator().manual_seed(0))
    assert stage.schedule(StrategyConfig(recursive=True, step=0.25)) == [0.25, 0.5, 0.75, 1.0]
    stage.compress_to(0.25)
    first = set(sub.module("k").folded_rows.tolist())
    assert len(first) == 8 and not isinstance(sub.module("q"), FoldedProjection)  # variant k leaves Q alone
    stage.compress_to(0.5)
    second = set(sub.module("k").folded_rows.tolist())
    assert len(second) == 16 and first < second


def test_random_row_and_mean_row_inits():
    sub = _attention_sublayer()
    original = sub.module("q").dense_weight().clone()
    stage = IRCStage(IRCConfig(variant="q", init="random-row"), sub, torch.Generator().manual_seed(3))
    stage.compress_to(1.0)
    q = sub.module("q").q.detach()
    assert any(torch.equal(q, row) for row in original)  # one of the original rows, replicated

    sub = _attention_sublayer()
    original = sub.module("q").dense_weight().clone()
    IRCStage(IRCConfig(variant="q", init="mean-row"), sub, torch.Generator()).compress_to(1.0)
    assert torch.allclose(sub.module("q").q.detach(), original.mean(0), atol=1e-6)


def test_fit_init_reduces_output_error_below_random_row():
    errors = {}
    for init in ("random-row", "fit"):
        sub = _attention_sublayer()
        IRCStage(IRCConfig(variant="qk", init=init), sub, torch.Generator().manual_seed(0)).compress_to(1.0)
        with torch.no_grad():
            errors[init] = (sub.forward(sub.inputs) - sub.target).pow(2).mean().item()
    assert errors["fit"] < errors["random-row"]


def test_column_fold_makes_every_output_the_same_combination():
    from smartprune.modules.masked import ColumnFoldedProjection

    q = torch.tensor([1.0, 0.0, -1.0, 2.0])  # a shared column of length d_in
    proj = ColumnFoldedProjection(W, torch.tensor([0.5, 0.0, -0.5]), torch.ones(3, dtype=torch.bool), q)
    assert torch.equal(proj.dense_weight(), q[:, None].expand(4, 3))
    x = torch.tensor([[1.0, 2.0, 0.0, -1.0]])  # x . q = 1 - 2 = -1
    assert torch.allclose(proj(x), torch.tensor([[-0.5, -1.0, -1.5]]))
    assert proj.alive() == 4 and proj.fully_folded()
    partial = ColumnFoldedProjection(W, None, torch.tensor([False, True, False]), q)
    expected = torch.stack([W[:, 0], q, W[:, 2]], 1)
    assert torch.equal(partial.dense_weight(), expected)
    xs = torch.randn(2, 5, 4)
    assert torch.allclose(partial(xs), xs @ expected, atol=1e-6)
    assert partial.alive() == 2 * 4 + 4 and not partial.fully_folded()


def test_output_orientation_folds_columns_of_q_and_k(calib):
    from smartprune.compression.engine import compress
    from smartprune.modules.masked import ColumnFoldedProjection
    from smartprune.recipes.schema import build_recipe

    model = tiny_model("llama")
    recipe = build_recipe({"irc": {"rate": 0.5, "orientation": "output", "steps": 1}}, "t", "test")
    compress(model, None, recipe, calib=calib, progress=False)
    att = get_adapter(model).attention_projections(0)
    for p, d_out in ((att.q, 32), (att.k, 16)):
        assert isinstance(p, ColumnFoldedProjection) and p.n_folded == round(0.5 * d_out)
        w = p.dense_weight()
        assert all(torch.equal(w[:, j], p.q.detach()) for j in p.folded_cols.tolist())
