"""Classification: task files, zero-shot label scoring, fine-tuning with frozen masks."""

import pytest
import torch
from torch import nn

from smartprune.evaluation import classify
from smartprune.evaluation.tasks import TASKS, Example, NotAvailable, load_split, stratified_split

from .conftest import SHARED_DATA


class Rigged(nn.Module):
    """A "language model" whose next-token log-probabilities are a fixed table per previous token."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table
        self.config = type("C", (), {"max_position_embeddings": 64})()

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.table[input_ids]})()


class CharTokenizer:
    """Token = character code (mod 16); enough to rig which continuation is likelier."""

    def __call__(self, text, add_special_tokens=True, verbose=False):
        return type("Enc", (), {"input_ids": [ord(c) % 16 for c in text]})()


def test_zero_shot_picks_the_label_with_the_higher_likelihood():
    table = torch.zeros(16, 16)
    table[:, ord("y") % 16] = 5.0  # after any token, 'y' is far likelier than 'n'
    model, tok = Rigged(table), CharTokenizer()
    scores = classify.label_scores(model, tok, ["ab", "abc"], ("n", "y"))
    logp = torch.log_softmax(table, -1)
    assert scores[0, 1] == pytest.approx(logp[ord("b") % 16, ord("y") % 16].item())
    assert scores[1, 0] == pytest.approx(logp[ord("c") % 16, ord("n") % 16].item())
    task = TASKS["sms"]
    res = classify.zero_shot(model, tok, task, [Example("x", None, 1), Example("x", None, 0)])
    assert res["accuracy"] == 0.5 and res["recall"] == 0.5  # always "yes" = spam = label 1


def test_label_scores_sum_multi_token_continuations_on_a_real_model(model_dirs):
    import smartprune

    loaded = smartprune.load_model(model_dirs["gpt2"])
    tok = loaded.tokenizer
    scores = classify.label_scores(loaded.model, tok, ["Review: fine\nSentiment:"], (" negative", " positive"))
    ctx = tok("Review: fine\nSentiment:").input_ids
    cont = tok(" positive", add_special_tokens=False).input_ids
    with torch.no_grad():
        logp = torch.log_softmax(loaded.model(torch.tensor([ctx + cont])).logits[0], -1)
    expected = sum(logp[len(ctx) - 1 + i, c].item() for i, c in enumerate(cont))
    assert scores[0, 1].item() == pytest.approx(expected, abs=1e-4)


def test_finetuning_learns_and_keeps_pruned_weights_at_zero(model_dirs, use_data):
    import smartprune
    from smartprune.adapters import get_adapter

    loaded = smartprune.load_model(model_dirs["llama"])
    adapter = get_adapter(loaded.model)
    adapter.prepare()
    up = next(iter(adapter.ff_projections(0).values()))
    up.set_mask(torch.rand(up.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5)
    task = TASKS["sst2"]
    train = load_split(task, "train")
    clf = classify.SequenceClassifier(loaded.model, 2)
    cfg = classify.FinetuneConfig(max_train=24, epochs=3, seqlen=16, batch_size=8, lr=1e-3)
    log = classify.finetune(clf, loaded.tokenizer, task, train, cfg)
    assert log["steps"] == 9 and log["loss_last"] < log["loss_first"]
    assert (up.weight[~up.mask] == 0).all()
    res = classify.evaluate_classifier(clf, loaded.tokenizer, task, load_split(task, "dev"), seqlen=16)
    assert res["examples"] == 8 and res["mode"] == "finetune"


def test_splits_and_availability(use_data):
    assert len(load_split(TASKS["sst2"], "dev")) == 8
    rte = load_split(TASKS["rte"], "dev")
    assert rte[1].b == "A cat sat." and rte[1].a == 'A dog ran "fast".' and rte[1].label == 1
    with pytest.raises(NotAvailable, match="no train split"):
        load_split(TASKS["rte"], "train")
    with pytest.raises(NotAvailable, match="QQP"):
        load_split(TASKS["qqp"], "dev")
    train, dev = load_split(TASKS["sms"], "train"), load_split(TASKS["sms"], "dev")
    assert len(dev) == 10 and sum(e.label for e in dev) == 2  # 20% of each class: 8 ham, 2 spam
    assert len(train) == 40


def test_stratified_split_is_seeded():
    ex = [Example(str(i), None, i % 3 == 0) for i in range(30)]
    a, b = stratified_split(ex, 0.2, 1), stratified_split(ex, 0.2, 1)
    assert a == b and stratified_split(ex, 0.2, 2) != a
    assert sum(e.label for e in a[1]) == 2 and len(a[1]) == 6


@pytest.mark.skipif(not (SHARED_DATA / "glue").is_dir(), reason="shared GLUE data not present")
def test_real_glue_files_parse_with_their_documented_sizes(monkeypatch):
    monkeypatch.setenv("SMARTPRUNE_DATA", str(SHARED_DATA))
    sizes = {"cola": 1043, "sst2": 872, "mrpc": 408, "rte": 277, "qnli": 5463, "mnli": 9815}
    for name, n in sizes.items():
        dev = load_split(TASKS[name], "dev")
        assert len(dev) == n, name
        assert {e.label for e in dev} == set(range(len(TASKS[name].labels))), name
    assert len(load_split(TASKS["mrpc"], "train")) == 3668
    assert len(load_split(TASKS["sms"], "dev")) == round(4827 * 0.2) + round(747 * 0.2)
