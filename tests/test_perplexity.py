"""Perplexity protocol: windows and a hand computation on a tiny model."""

import math

import pytest
import torch
import torch.nn.functional as F

from smartprune.data import wikitext_rows
from smartprune.errors import DataError
from smartprune.evaluation.perplexity import perplexity_of_ids, windows

from .conftest import tiny_model


def test_non_overlapping_windows_drop_the_tail():
    assert windows(10, 4) == [(0, 4, 1), (4, 8, 1)]
    assert windows(8, 4) == [(0, 4, 1), (4, 8, 1)]
    assert windows(3, 4) == []


def test_sliding_windows_score_each_token_once():
    spans = windows(10, 4, stride=2)
    assert spans == [(0, 4, 1), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    scored = [t for b, e, f in spans for t in range(b + f, e)]
    assert scored == list(range(1, 10))
    with pytest.raises(DataError):
        windows(10, 4, stride=5)


def test_perplexity_equals_a_hand_computation():
    model = tiny_model("llama")
    ids = torch.randint(0, 100, (20,))
    result = perplexity_of_ids(model, ids, 8, progress=False)
    nll = []
    with torch.no_grad():
        for b in (0, 8):
            w = ids[b:b + 8]
            logp = F.log_softmax(model(w[None]).logits[0], -1)
            nll += [-logp[t - 1, w[t]].item() for t in range(1, 8)]
    assert result.windows == 2 and result.tokens == 14
    assert result.perplexity == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    assert perplexity_of_ids(model, ids, 8, limit=1, progress=False).windows == 1
    with pytest.raises(DataError):
        perplexity_of_ids(model, ids, 8, limit=0, progress=False)
    with pytest.raises(DataError):
        perplexity_of_ids(model, ids[:5], 8, progress=False)


def test_wikitext_rows_match_the_hugging_face_layout(tmp_path):
    f = tmp_path / "t.raw"
    f.write_text(" \n = Title = \n \n Text line .\n")
    assert wikitext_rows(f) == ["", " = Title = \n", "", " Text line .\n"]


def test_missing_text_falls_back_to_the_hub_only_when_reachable(monkeypatch, tmp_path):
    import sys
    import types

    import smartprune.hf
    from smartprune.data import eval_text

    (tmp_path / "d").mkdir()
    monkeypatch.setenv("SMARTPRUNE_DATA", str(tmp_path / "d"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, config, split: calls.append((name, config, split)) or {"text": ["a\n", "", "b\n"]}
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(smartprune.hf, "hub_reachable", lambda: False)
    with pytest.raises(DataError, match=r"wiki\.test\.raw.*SMARTPRUNE_DATA"):
        eval_text("wikitext2")
    monkeypatch.setattr(smartprune.hf, "hub_reachable", lambda: True)
    assert eval_text("wikitext2") == "a\n\n\n\n\nb\n"
    assert calls == [("wikitext", "wikitext-2-raw-v1", "test")]
