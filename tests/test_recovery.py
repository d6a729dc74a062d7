"""Recovery: the loss falls, the structure survives, resume is bit for bit, two gloo processes
equal one, and the command line refuses bad input in one line."""

import copy
import dataclasses
import json

import pytest
import torch

from smartprune.cli.main import main
from smartprune.modules.masked import FoldedProjection, Maskable
from smartprune.recipes.schema import RECOVERY_BUDGETS, RecoverConfig
from smartprune.storage.load import load
from smartprune.storage.save import save
from smartprune.training.recover import recover, structure_report
from smartprune.training.schedule import lr_at

from .conftest import VOCAB, tiny_model

SMALL = {"seqlen": 32, "batch_size": 4, "eval_every": 5, "eval_windows": 2, "lr": 3e-3}


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_recovery_lowers_the_loss_and_keeps_the_structure(compressed, gpt2_tokenizer, use_data, device):
    model, teacher = compressed
    folded_before = {n: m.q.detach().clone() for n, m in model.named_modules() if isinstance(m, FoldedProjection)}
    masks = {n: m.mask.clone() for n, m in model.named_modules() if isinstance(m, Maskable) and m.mask is not None}
    r = recover(model, gpt2_tokenizer, RecoverConfig(steps=20, **SMALL), teacher=teacher, device=device,
                progress=False)
    assert r["device"].startswith(device)
    model.cpu()
    assert len(r["loss"]) == r["steps"] == 20 and r["tokens"] == 20 * 4 * 32
    assert sum(r["loss"][-5:]) < sum(r["loss"][:5])
    assert r["perplexity_after"] < r["perplexity_before"]
    assert [h["step"] for h in r["held_out"]] == [0, 5, 10, 15, 20]
    assert r["structure"] == {"pruned_entries_nonzero": 0, "masked_modules": len(masks),
                              "folded_projections": len(folded_before), "kept": True}
    for name, m in model.named_modules():
        if name in masks:
            assert torch.equal(m.mask, masks[name]) and not m.weight[~m.mask].any()
        if name in folded_before:  # still one shared vector (trained), no free rows
            assert isinstance(m, FoldedProjection) and m.free_rows.numel() == 0
            assert not torch.equal(m.q, folded_before[name])


def test_plain_fine_tuning_without_teacher(compressed, gpt2_tokenizer, use_data):
    model, _ = compressed
    r = recover(model, gpt2_tokenizer, RecoverConfig(steps=10, teacher="none", **SMALL), progress=False)
    assert r["loss"][-1] < r["loss"][0] and r["structure"]["kept"]


@pytest.mark.parametrize("kind", ["llama"])
def test_resume_after_interrupt_continues_bit_for_bit(compressed, gpt2_tokenizer, use_data, tmp_path):
    model, teacher = compressed
    start = copy.deepcopy(model)
    cfg = RecoverConfig(steps=6, checkpoint_minutes=0.0, **SMALL)
    whole = copy.deepcopy(start)
    straight = recover(whole, gpt2_tokenizer, cfg, teacher=teacher, progress=False)

    def interrupt(state):
        if state.step == 3:
            raise KeyboardInterrupt

    first = copy.deepcopy(start)
    with pytest.raises(KeyboardInterrupt):
        recover(first, gpt2_tokenizer, cfg, teacher=teacher, checkpoint_dir=tmp_path, on_step=interrupt,
                progress=False)
    resumed = copy.deepcopy(start)  # a fresh process would load the compressed folder again
    r = recover(resumed, gpt2_tokenizer, cfg, teacher=teacher, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert r["loss"] == straight["loss"]
    a, b = _weights(whole), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_minutes_budget_sizes_the_run_from_the_first_steps(compressed, gpt2_tokenizer, use_data, monkeypatch):
    import smartprune.training.recover as rec

    clock = iter(float(t) for t in range(1000))  # every perf_counter call advances one "second"
    monkeypatch.setattr(rec.time, "perf_counter", lambda: next(clock))
    model, teacher = compressed
    r = recover(model, gpt2_tokenizer, RecoverConfig(minutes=0.5, **SMALL), teacher=teacher, progress=False)
    # two steps took 2 "seconds" (one perf_counter call per step after the start): 30 s allows 30 steps
    assert r["steps"] == 30


@pytest.mark.parametrize("kind", ["llama"])
def test_blockwise_fits_each_block_to_the_dense_one_and_keeps_the_structure(compressed, gpt2_tokenizer, use_data):
    """Every block's output error against the dense block's falls (measured on its own inputs, so the
    fit corrects what earlier blocks got wrong); whether that buys perplexity is measured on SmolLM2
    (docs/frontier.md), not on random tiny weights."""
    model, teacher = compressed
    masks = {n: m.mask.clone() for n, m in model.named_modules() if isinstance(m, Maskable) and m.mask is not None}
    cfg = RecoverConfig(steps=0, objective="blockwise", block_steps=12, cache_windows=6, **SMALL)
    r = recover(model, gpt2_tokenizer, cfg, teacher=teacher, progress=False)
    fits = r["blockwise"]
    assert fits["blocks"] == teacher.config.num_hidden_layers and r["steps"] == 0 and r["loss"] == []
    assert all(a < b for a, b in zip(fits["relative_error_after"], fits["relative_error_before"], strict=True))
    assert [h.get("after") for h in r["held_out"]] == [None, "blockwise"] and r["structure"]["kept"]
    assert all(torch.equal(m.mask, masks[n]) for n, m in model.named_modules() if n in masks)


def test_the_block_losses_by_hand():
    """mse averages every squared entry; token weighs each token's squared error by its target's squared norm,
    so the second token (a target 5x larger, an error 10x larger) no longer makes nearly all of the loss."""
    from smartprune.training.blockwise import _block_loss

    out, target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]), torch.tensor([[[2.0, 0.0], [0.0, 10.0]]])
    assert _block_loss(out, target, "mse").item() == pytest.approx((1 + 0 + 0 + 100) / 4)
    assert _block_loss(out, target, "token").item() == pytest.approx((1 / 4 + 100 / 100) / 2)


@pytest.mark.parametrize("kind", ["llama"])
def test_a_block_fit_rezeroes_its_own_block_only(compressed):
    """`subset` keeps the masks of the given weights: a block step re-zeroes one block, not the model."""
    from smartprune.adapters import get_adapter
    from smartprune.training.sharding import StructureMasks

    model, _ = compressed
    masks = StructureMasks(model)
    block = list(get_adapter(model).blocks()[0].parameters())
    sub = masks.subset(block)
    assert 0 < len(sub.pairs) < len(masks.pairs)
    assert {id(w) for w, _ in sub.pairs} == {id(w) for w, _ in masks.pairs} & {id(p) for p in block}
    with torch.no_grad():
        for w, _ in masks.pairs:
            w.fill_(1.0)
    sub.rezero()
    for w, mask in masks.pairs:
        expected = mask.float() if any(w is v for v, _ in sub.pairs) else torch.ones_like(w)
        assert torch.equal(w.detach(), expected)


def test_blockwise_pairs_block_i_with_the_dense_block_i(gpt2_tokenizer, use_data):
    """An uncompressed copy reproduces every dense block output exactly: the pairing and the inputs
    (its own hidden states) are right, so the error before any fit is 0."""
    teacher = tiny_model("llama", VOCAB)
    model = copy.deepcopy(teacher)
    cfg = RecoverConfig(steps=0, objective="blockwise", block_steps=0, cache_windows=4, **SMALL)
    r = recover(model, gpt2_tokenizer, cfg, teacher=teacher, progress=False)
    assert max(r["blockwise"]["relative_error_before"]) < 1e-6


@pytest.mark.parametrize("kind", ["llama"])
def test_blockwise_then_end_to_end_resumes_without_fitting_again(compressed, gpt2_tokenizer, use_data, tmp_path):
    model, teacher = compressed
    start = copy.deepcopy(model)
    cfg = RecoverConfig(steps=4, objective="blockwise", block_steps=3, cache_windows=4, checkpoint_minutes=0.0,
                        **SMALL)
    straight = recover(copy.deepcopy(start), gpt2_tokenizer, cfg, teacher=teacher, progress=False)

    def interrupt(state):
        if state.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        recover(copy.deepcopy(start), gpt2_tokenizer, cfg, teacher=teacher, checkpoint_dir=tmp_path,
                on_step=interrupt, progress=False)
    r = recover(copy.deepcopy(start), gpt2_tokenizer, cfg, teacher=teacher, checkpoint_dir=tmp_path, resume=True,
                progress=False)
    assert r["loss"] == straight["loss"] and r["blockwise"]["relative_error_after"] == \
        straight["blockwise"]["relative_error_after"]


def test_blockwise_refuses_what_it_cannot_pair(gpt2_tokenizer, use_data):
    from smartprune.errors import DataError, RecipeError
    from smartprune.recipes.schema import build_recipe, build_section

    teacher = tiny_model("llama", VOCAB)
    student = copy.deepcopy(teacher)
    del student.model.layers[1]  # what the depth stage leaves
    student.config.num_hidden_layers -= 1
    cfg = RecoverConfig(steps=0, objective="blockwise", **SMALL)
    with pytest.raises(DataError, match="stage depth"):
        recover(student, gpt2_tokenizer, cfg, teacher=teacher, progress=False)
    with pytest.raises(RecipeError, match="teacher: dense"):
        build_section(RecoverConfig, {"objective": "blockwise", "teacher": "none"}, "recover")
    with pytest.raises(RecipeError, match=r"recover\.steps"):
        build_section(RecoverConfig, {"steps": 0}, "recover")
    with pytest.raises(DataError, match="stage depth"):  # a removed block it is not told of
        recover(student, gpt2_tokenizer, cfg, teacher=teacher, progress=False, removed_blocks=[0, 1])
    assert build_recipe({"depth": {"rate": 0.25}, "recover": {"objective": "blockwise"}}, "x", "test").recover


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_objective_auto_fits_blocks_only_where_the_shapes_changed(compressed, gpt2_tokenizer, use_data):
    """`paper` (folded and pruned matrices of their full size) keeps the dense shapes: end-to-end; a
    feed-forward width or a block removed changes them: blockwise, unless the fits cannot run (several
    processes, no teacher, a removed block not named)."""
    from smartprune.adapters import get_adapter
    from smartprune.training.blockwise import resolve_objective, shapes_changed

    model, teacher = compressed
    auto = RecoverConfig(objective="auto", **SMALL)
    assert not shapes_changed(model, teacher) and not shapes_changed(teacher, teacher)
    assert resolve_objective(auto, model, teacher, 1).objective == "end_to_end"
    from smartprune.compression.engine import compress
    from smartprune.data import Calibration
    from smartprune.recipes.schema import build_recipe

    narrow = copy.deepcopy(teacher)  # half the feed-forward neurons removed (the structured stage)
    ids = torch.randint(0, VOCAB, (12, 16), generator=torch.Generator().manual_seed(0))
    compress(narrow, None, build_recipe({"ff_neurons": {"rate": 0.5}}, "narrow", "test"),
             calib=Calibration(ids, ids[:3], "synthetic"), progress=False)
    assert shapes_changed(narrow, teacher)
    assert resolve_objective(auto, narrow, teacher, 1).objective == "blockwise"
    r = recover(narrow, gpt2_tokenizer, dataclasses.replace(auto, steps=1, block_steps=1, cache_windows=4,
                                                            lr_after_fits=1e-4), teacher=teacher, progress=False)
    assert r["objective"] == "blockwise" and r["blockwise"]["block_steps"] == 1 and r["config"]["objective"] == \
        "blockwise"
    full = RecoverConfig(**RECOVERY_BUDGETS["full"])  # the demo's: fits, then their own peak; quick fits too
    assert lr_at(39, 40, resolve_objective(full, narrow, teacher, 1)) < lr_at(39, 40, full)
    quick = resolve_objective(RecoverConfig(**RECOVERY_BUDGETS["quick"]), narrow, teacher, 1)
    assert quick.objective == "blockwise" and quick.block_steps < full.block_steps
    shallow = copy.deepcopy(teacher)
    get_adapter(shallow).keep_blocks([0])
    assert shapes_changed(shallow, teacher)
    assert resolve_objective(auto, shallow, teacher, 1, removed=[1]).objective == "blockwise"
    assert resolve_objective(auto, shallow, teacher, 1).objective == "end_to_end"  # which block went: unknown
    assert resolve_objective(auto, shallow, teacher, 2, removed=[1]).objective == "end_to_end"  # two processes
    assert resolve_objective(auto, shallow, None, 1, removed=[1]).objective == "end_to_end"
    fixed = RecoverConfig(objective="end_to_end", **SMALL)
    assert resolve_objective(fixed, shallow, teacher, 1, removed=[1]) is fixed


def test_block_spans_give_each_kept_block_the_removed_blocks_after_it():
    from smartprune.training.blockwise import block_spans, removed_in

    assert block_spans(3, []) == [range(0, 1), range(1, 2), range(2, 3)]
    assert block_spans(6, [1, 2, 5]) == [range(0, 3), range(3, 4), range(4, 6)]
    assert block_spans(4, [0, 1]) == [range(0, 3), range(3, 4)]  # removed before the first kept: its span
    assert removed_in({"structure": {"depth": {"removed": [3, 7]}}}) == [3, 7] and removed_in({}) == []


def _identity_block_removed():
    """A three-block teacher whose block 1 is an identity (its attention and MLP outputs zero: the residual
    passes through), and a copy of it with block 1 removed."""
    from smartprune.adapters import get_adapter

    teacher = tiny_model("llama", VOCAB)
    teacher.config.num_hidden_layers = 3
    teacher.model.layers.append(copy.deepcopy(teacher.model.layers[1]))
    teacher.model.layers[2].self_attn.layer_idx = 2
    with torch.no_grad():
        teacher.model.layers[1].self_attn.o_proj.weight.zero_()
        teacher.model.layers[1].mlp.down_proj.weight.zero_()
    student = copy.deepcopy(teacher)
    get_adapter(student).keep_blocks([0, 2])
    return teacher, student


def test_blockwise_pairs_a_kept_block_with_the_dense_span_it_replaces(gpt2_tokenizer, use_data):
    """Block 1 of three made an identity (its attention and MLP outputs zero: the residual passes through)
    and removed: the two kept blocks reproduce the dense spans [0, 1] and [2] exactly before any fit, so
    the pairing and the span's inputs are right; told nothing, the same student is refused."""
    teacher, student = _identity_block_removed()
    cfg = RecoverConfig(steps=0, objective="blockwise", block_steps=0, cache_windows=4, **SMALL)
    r = recover(student, gpt2_tokenizer, cfg, teacher=teacher, progress=False, removed_blocks=[1])
    assert r["blockwise"]["spans"] == [[0, 1], [2, 2]]
    assert max(r["blockwise"]["relative_error_before"]) < 1e-6


def test_the_block_hidden_state_loss_by_hand():
    """``hidden_layers: blocks`` with the other losses off: the mean over pairs of each pair's squared error
    over its target's mean square, times the weight. Pairs (1, 1) and (2, 3): (2-1)^2 / 2^2 = 0.25 and
    (3-0)^2 / 3^2 = 1, mean 0.625, weight 2 -> 1.25. The models stand in as callables."""
    from types import SimpleNamespace

    from smartprune.training.recover import distillation_loss

    ones = torch.ones(1, 3, 2)
    logits = torch.zeros(1, 3, 5)
    student = lambda ids, output_hidden_states: SimpleNamespace(  # noqa: E731
        logits=logits, hidden_states=(ones, ones, 0 * ones))
    teacher = lambda ids, output_hidden_states: SimpleNamespace(  # noqa: E731
        logits=logits, hidden_states=(ones, 2 * ones, 7 * ones, 3 * ones))
    cfg = RecoverConfig(kl_weight=0.0, ce_weight=0.0, hidden_weight=2.0, hidden_layers="blocks")
    loss = distillation_loss(student, teacher, torch.zeros(1, 3, dtype=torch.long), cfg, [(1, 1), (2, 3)])
    assert loss.item() == pytest.approx(1.25, abs=1e-6)


def test_block_hidden_states_pair_a_kept_block_with_the_end_of_its_dense_span(gpt2_tokenizer, use_data):
    """The identity block of the test above removed: each kept block's output equals the output of the dense
    span it stands for, so the block hidden-state loss is zero with the report's removed blocks; told
    nothing, the pairing is refused; and recovery runs with it."""
    from smartprune.errors import DataError
    from smartprune.training.recover import distillation_loss, hidden_pairs

    teacher, student = _identity_block_removed()
    pairs = hidden_pairs(student, teacher, [1])
    assert pairs == [(1, 2), (2, 3)]
    with pytest.raises(DataError, match="2 of the teacher's 3 blocks"):
        hidden_pairs(student, teacher, [])
    cfg = RecoverConfig(kl_weight=0.0, ce_weight=0.0, hidden_weight=1.0, hidden_layers="blocks", **SMALL)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    assert distillation_loss(student, teacher, ids, cfg, pairs).item() < 1e-10
    with torch.no_grad():
        student.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    assert distillation_loss(student, teacher, ids, cfg, pairs).item() > 1e-4
    cfg = RecoverConfig(steps=2, objective="end_to_end", hidden_weight=1.0, hidden_layers="blocks", **SMALL)
    r = recover(student, gpt2_tokenizer, cfg, teacher=teacher, progress=False, removed_blocks=[1])
    assert r["steps"] == 2 and r["config"]["hidden_layers"] == "blocks"
    with pytest.raises(DataError, match="2 of the teacher's 3 blocks"):
        recover(student, gpt2_tokenizer, cfg, teacher=teacher, progress=False)


def test_a_teacher_with_another_vocabulary_is_refused(compressed, gpt2_tokenizer, use_data):
    from smartprune.errors import DataError

    model, _ = compressed
    with pytest.raises(DataError, match="vocabulary"):
        recover(model, gpt2_tokenizer, RecoverConfig(steps=1, **SMALL), teacher=tiny_model("llama"), progress=False)


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    cfg = RecoverConfig(steps=100, lr=1.0, warmup=0.1)
    assert lr_at(0, 100, cfg) == pytest.approx(0.1)
    assert lr_at(9, 100, cfg) == pytest.approx(1.0)
    assert lr_at(100, 100, cfg) == pytest.approx(0.1)
    assert lr_at(55, 100, cfg) == pytest.approx(0.55)  # halfway through the cosine: (1 + 0.1) / 2
    after = dataclasses.replace(cfg, lr_after_fits=0.3)  # its peak only where block fits came first
    assert lr_at(9, 100, after) == pytest.approx(1.0)
    fitted = dataclasses.replace(after, objective="blockwise")
    assert lr_at(9, 100, fitted) == pytest.approx(0.3) and lr_at(100, 100, fitted) == pytest.approx(0.03)


def test_structure_report_finds_a_revived_entry(compressed):
    model, _ = compressed
    m = next(m for m in model.modules() if isinstance(m, Maskable) and m.mask is not None)
    with torch.no_grad():
        m.weight[~m.mask] = 1.0
    report = structure_report(model)
    assert not report["kept"] and report["pruned_entries_nonzero"] == int((~m.mask).sum())


@pytest.mark.parametrize("kind", ["llama"])
@pytest.mark.parametrize("sharding", ["none", "fsdp"])
def test_two_gloo_processes_equal_one_with_the_same_global_batch(sharding, compressed, model_dirs, use_data, tmp_path,
                                                                  gpt2_tokenizer):
    """Plain data parallel and FSDP (each process holding half of every parameter) both follow the
    single-process loss curve and keep the structure."""
    from smartprune.runs.recover import recover_model

    model, _ = compressed
    save(model, tmp_path / "c", tokenizer=gpt2_tokenizer)
    runs = {}
    for n in (1, 2):
        cfg = RecoverConfig(steps=4, sharding=sharding if n == 2 else "none", **SMALL)
        run = recover_model(str(tmp_path / "c"), teacher=str(model_dirs["llama"]), out=tmp_path / f"out{n}", cfg=cfg,
                            device="cpu", nproc=n, progress=False)
        runs[n] = run.recovery
        assert run.recovery["world_size"] == n and run.recovery["structure"]["kept"]
    assert runs[1]["loss"] == pytest.approx(runs[2]["loss"], rel=1e-4)
    one, two = load(tmp_path / "out1", structured=False), load(tmp_path / "out2", structured=False)
    a, b = one.state_dict(), two.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


def _cli(capsys, *argv):
    code = main(["-q", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("kind", ["gpt2"])
def test_recover_command_writes_a_loadable_model_and_report(compressed, model_dirs, use_data, tmp_path, capsys,
                                                            gpt2_tokenizer):
    model, _ = compressed
    overall = {"params_before": 1000, "params_after": 600, "compression": 0.4}
    save(model, tmp_path / "c", tokenizer=gpt2_tokenizer, report={"recipe": "paper", "overall": overall})
    code, out, err = _cli(capsys, "recover", tmp_path / "c", "--teacher", model_dirs["gpt2"], "--out", tmp_path / "r",
                          "--steps", 3, "--train-seqlen", 32, "--batch-size", 2, "--eval-windows", 1,
                          "--json", tmp_path / "r.json")
    assert code == 0, err
    assert "structure kept: yes" in out
    assert "600 of 1,000 parameters (0.60x dense)" in out  # what the user got, and how to time it
    last = out.rstrip().splitlines()[-1]
    assert last == f"speed against dense: smartprune bench {model_dirs['gpt2']} {tmp_path / 'r'}"
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["recipe"] == "paper"  # the compression report is kept, recovery added
    rec = report["recovery"]
    assert rec["steps"] == 3 and len(rec["loss"]) == 3 and rec["world_size"] == 1
    assert {"tokens", "seconds", "perplexity_before", "perplexity_after", "text", "budget"} <= set(rec)
    assert load(tmp_path / "r") is not None
    assert not (tmp_path / ".r.recover-checkpoint").exists()  # removed once the model is written
    code, _, err = _cli(capsys, "report", tmp_path / "r", "--out", tmp_path / "rep")
    assert code == 0, err
    page = (tmp_path / "rep" / "report.md").read_text()
    assert "Retraining after compression (recover)" in page and "docs/recovery-results.md" in page


@pytest.mark.parametrize("argv, message", [
    (["--device", "cuda"], "no GPU"),
    (["--device", "tpu"], "unknown device"),
    (["--lr", "nan"], "finite"),
    (["--steps", "3", "--resume"], "nothing to resume"),
    (["--text", "no/such/file.txt"], "neither"),
    (["--objective", "end_to_end", "--lr-after-fits", "1e-4"], "--lr-after-fits acts on block-wise fits"),
    (["--objective", "end_to_end", "--block-loss", "token"], "--block-loss acts on block-wise fits"),
    (["--temperature", "2"], "--temperature acts on distillation from a teacher"),
    (["--sharding", "fsdp"], "this run has one"),
    (["--hidden-layers", "blocks"], "--hidden-layers acts on distillation from a teacher"),
])
def test_recover_command_bad_input_is_one_line(argv, message, model_dirs, use_data, tmp_path, capsys):
    if argv[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, _, err = _cli(capsys, "recover", model_dirs["llama"], "--teacher", "none", "--out", tmp_path / "r",
                          "--train-seqlen", 16, "--batch-size", 2, "--steps", 1, *argv)
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_recipe_recover_section_is_validated():
    from smartprune.errors import RecipeError
    from smartprune.recipes.schema import build_recipe

    r = build_recipe({"irc": {"rate": 1.0}, "recover": {"steps": 5, "teacher": "none"}}, "x", "test")
    assert r.recover.steps == 5 and r.to_dict()["recover"]["teacher"] == "none"
    assert build_recipe({"irc": {}}, "x", "test").recover is None
    with pytest.raises(RecipeError, match=r"recover\.lr: expected a finite number"):
        build_recipe({"irc": {}, "recover": {"lr": float("nan")}}, "x", "test")
    with pytest.raises(RecipeError, match="ce_weight"):
        build_recipe({"irc": {}, "recover": {"teacher": "none", "ce_weight": 0}}, "x", "test")
    with pytest.raises(RecipeError, match="hidden_layers: blocks chooses what hidden_weight matches"):
        build_recipe({"irc": {}, "recover": {"hidden_layers": "blocks"}}, "x", "test")


def test_demo_prints_dense_compressed_and_recovered(model_dirs, use_data, tmp_path):
    from smartprune.runs.demo import run_demo

    run = run_demo(str(model_dirs["llama"]), "paper", quick=True, seqlen=64, recover_steps=4, progress=False,
                   json_path=tmp_path / "demo.json")
    data = json.loads((tmp_path / "demo.json").read_text())
    assert {"dense", "compressed", "recovered"} <= set(data)
    assert data["recovered"]["windows"] == data["dense"]["windows"] == 4
    assert data["report"]["recovery"]["steps"] == 4 and data["report"]["recovery"]["structure"]["kept"]
    assert "| compressed + recovered |" in run.summary()
    # what it buys: the recovered model measured against the dense one in one run; --quick holds a model with
    # pruned entries packed only (how it would be deployed), on the coarser schedule it says it used
    cost = data["cost"]
    assert cost["dense"]["resident"] == "dense" and [e["resident"] for e in cost["compressed"]] == ["compact"]
    assert "quick schedule: recursive rate steps of 0.25 (recipe: 0.05)" in run.summary()
    assert data["report"]["recipe_config"]["fpp_ff"]["p_pos"] == pytest.approx(0.175)
    compact = cost["compressed"][0]
    assert compact["metrics"]["resident_bytes"] < cost["dense"]["metrics"]["resident_bytes"]
    assert compact["ratios"]["resident_bytes"] == pytest.approx(
        compact["metrics"]["resident_bytes"] / cost["dense"]["metrics"]["resident_bytes"])
    assert compact["metrics"]["generate_tokens_per_s"] > 0 and compact["metrics"]["peak_rss_bytes"] > 0
    assert "finetune_seq_per_s" not in cost["dense"]["metrics"]  # no fine-tuning step timed that nothing reports
    assert "What it buys" in run.summary() and "| compressed + recovered | " in run.summary().split("What it buys")[1]


def test_demo_runs_two_recipes_side_by_side_with_one_dense_score_and_one_bench_run(model_dirs, use_data, tmp_path):
    from smartprune.runs.demo import run_demos

    demo = run_demos(str(model_dirs["llama"]), ("paper", "smart-40"), quick=True, seqlen=64, recover_steps=2,
                     progress=False, json_path=tmp_path / "demo.json")
    data = json.loads((tmp_path / "demo.json").read_text())
    paper, smart = data["runs"]
    assert (paper["recipe"], smart["recipe"]) == ("paper", "smart-40")
    assert paper["dense"] == smart["dense"]  # scored once, on the same windows
    assert paper["report"]["recovery"]["steps"] == smart["report"]["recovery"]["steps"] == 2  # the same budget
    # one bench run: the dense entry is the same measurement for both, each final model its own entry
    assert paper["cost"]["dense"] == smart["cost"]["dense"]
    assert paper["cost"]["compressed"] != smart["cost"]["compressed"]
    table = demo.side_by_side()
    assert table.count("\n| paper |") == 1 and table.count("\n| smart-40 |") == 1
    assert "time: the one bench run of all 2 final models" in demo.summary()
    assert smart["report"]["allocation"]["sensitivity"] == "joint (sparsegpt)"
    # --quick measures a joint allocation at the mean and one move each side (smart-40 asks for two)
    assert "joint measurement at the mean +- the spread only (recipe: 2 points each side)" in smart["schedule"]
    assert len(smart["report"]["allocation"]["grid"]) == 3


def test_demo_checks_every_recipe_before_the_first_one_runs(model_dirs, tmp_path, monkeypatch):
    from smartprune.errors import RecipeError
    from smartprune.runs import demo

    ran = []
    monkeypatch.setattr(demo, "execute", lambda spec: ran.append(spec))
    with pytest.raises(RecipeError, match="recipe file not found"):
        demo.run_demos(str(model_dirs["llama"]), ("paper", str(tmp_path / "missing.yaml")), quick=True,
                       progress=False)
    assert ran == []


def test_demo_recovers_block_wise_when_asked_depth_recipes_included(model_dirs, use_data, tmp_path):
    from smartprune.runs.demo import run_demo

    recipe = tmp_path / "r.yaml"  # a small recovery of its own, so the objective flag is what changes
    recipe.write_text("fpp_ff: {target_sparsity: 0.5, steps: 0}\n"
                      "recover: {steps: 2, seqlen: 16, batch_size: 2, eval_windows: 1, block_steps: 2, "
                      "cache_windows: 4}\n")
    run = run_demo(str(model_dirs["llama"]), str(recipe), quick=True, seqlen=64, measure=False,
                   recover_objective="blockwise", progress=False)
    rec = run.report["recovery"]
    assert rec["config"]["objective"] == "blockwise" and rec["steps"] == 2 and rec["structure"]["kept"]
    assert run.recovered["perplexity"] > 0
    depth = tmp_path / "depth.yaml"  # one of the two blocks removed: the kept one stands for both
    depth.write_text("depth: {rate: 0.5}\nrecover: {steps: 1, seqlen: 16, batch_size: 2, eval_windows: 1, "
                     "block_steps: 2, cache_windows: 4}\n")
    run = run_demo(str(model_dirs["llama"]), str(depth), quick=True, seqlen=64, measure=False,
                   recover_objective="blockwise", progress=False)
    fits = run.report["recovery"]["blockwise"]
    assert fits["blocks"] == 1 and fits["spans"] == [[0, 1]]


def test_compress_with_a_recover_section_retrains(model_dirs, use_data, tmp_path):
    code = main(["-q", "compress", str(model_dirs["gpt2"]), "--recipe", str(_recipe_file(tmp_path)), "--out",
                 str(tmp_path / "c"), "--calib-samples", "4", "--calib-seqlen", "16"])
    assert code == 0
    rec = json.loads((tmp_path / "c" / "report.json").read_text())["recovery"]
    assert rec["steps"] == 3 and rec["structure"]["kept"] and rec["perplexity_after"] > 0
    assert load(tmp_path / "c") is not None


def _recipe_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("fpp_ff: {target_sparsity: 0.5, steps: 0}\n"
                    "recover: {steps: 3, seqlen: 32, batch_size: 2, eval_windows: 1}\n")
    return path


@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_during_recovery_leaves_a_usable_checkpoint(sig, code, model_dirs, use_data, tmp_path):
    """What a user sees when a long run is stopped: the exit code, no temporary folders, and a
    checkpoint that --resume continues from."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "r"
    argv = [sys.executable, "-m", "smartprune", "-q", "recover", str(model_dirs["llama"]), "--teacher", "none",
            "--out", str(out), "--steps", "100000", "--train-seqlen", "16", "--batch-size", "2", "--eval-windows", "1",
            "--checkpoint-minutes", "0"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    ckpt = tmp_path / ".r.recover-checkpoint" / "recover-checkpoint.pt"
    deadline = time.monotonic() + 120
    while not ckpt.is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert ckpt.is_file(), proc.stderr.read() if proc.poll() is not None else "no checkpoint in time"
    proc.send_signal(getattr(signal, sig))
    assert proc.wait(timeout=60) == code
    assert "resume" in proc.stderr.read()
    import torch

    state = torch.load(ckpt, weights_only=True)["state"]
    assert state["step"] >= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".r.recover-checkpoint"]  # nothing half-written


def _fsdp_run(rank: int, port: int, folder, teacher_dir, cfg, ckpt_dir, interrupt_at, resume, result_file,
              by_signal: bool = False) -> None:
    """One of two gloo processes of a sharded recovery (spawned by the test below)."""
    import os
    import signal

    import torch.distributed as dist

    from smartprune.storage.sources import load_model

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        student, dense = load(folder, structured=False), load_model(teacher_dir)

        def stop(state):
            if state.step == interrupt_at:
                if not by_signal:
                    raise KeyboardInterrupt
                if rank == 1:  # one process is signalled; both must stop at this step, and checkpoint it
                    os.kill(os.getpid(), signal.SIGTERM)

        try:
            r = recover(student, dense.tokenizer, cfg, teacher=dense.model, device="cpu", checkpoint_dir=ckpt_dir,
                        resume=resume, on_step=stop if interrupt_at else None, progress=False)
        except KeyboardInterrupt:
            return
        if rank == 0:
            torch.save({"loss": r["loss"], "weights": student.state_dict(), "held": r["parameters_held"]},
                       result_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["llama"])
@pytest.mark.parametrize("by_signal", [pytest.param(False, marks=pytest.mark.slow), True])
def test_a_sharded_run_resumes_bit_for_bit(by_signal, compressed, model_dirs, use_data, tmp_path, gpt2_tokenizer):
    import torch.multiprocessing as mp

    from smartprune.runs.recover import _free_port

    model, _ = compressed
    save(model, tmp_path / "c", tokenizer=gpt2_tokenizer)
    cfg = RecoverConfig(steps=5, checkpoint_minutes=0.0, sharding="fsdp", **SMALL)

    def spawn(ckpt, interrupt_at, resume, result):
        mp.spawn(_fsdp_run, nprocs=2, args=(_free_port(), tmp_path / "c", model_dirs["llama"], cfg, tmp_path / ckpt,
                                            interrupt_at, resume, tmp_path / result, by_signal))

    spawn("straight", 0, False, "straight.pt")
    spawn("cut", 3, False, "unused.pt")
    assert (tmp_path / "cut" / "recover-checkpoint.pt").is_file() and not (tmp_path / "unused.pt").exists()
    # an exception in `on_step` keeps the last periodic checkpoint (step 2); a signal is agreed and saved at 3
    assert torch.load(tmp_path / "cut" / "recover-checkpoint.pt")["state"]["step"] == (3 if by_signal else 2)
    spawn("cut", 0, True, "resumed.pt")
    straight, resumed = torch.load(tmp_path / "straight.pt"), torch.load(tmp_path / "resumed.pt")
    assert resumed["loss"] == straight["loss"]
    assert all(torch.equal(straight["weights"][k], resumed["weights"][k]) for k in straight["weights"])
    whole = sum(p.numel() for p in model.parameters() if p.numel())
    assert straight["held"] < 0.6 * whole  # each process held about half of every parameter


def test_the_quick_demo_recovers_end_to_end_on_its_quick_budget(model_dirs, use_data, tmp_path):
    """A model that keeps the dense shapes (here FPP's zeroed neurons) takes no block fits under the quick
    budget's `auto`: the quick demo's `paper` and `smart-40` recover end-to-end as before."""
    from smartprune.recipes.schema import RECOVERY_BUDGETS
    from smartprune.runs.demo import run_demo

    recipe = tmp_path / "r.yaml"
    recipe.write_text("fpp_ff: {target_sparsity: 0.5, steps: 0}\n")
    run = run_demo(str(model_dirs["llama"]), str(recipe), quick=True, seqlen=64, measure=False, progress=False)
    rec = run.report["recovery"]
    assert rec["config"]["objective"] == "end_to_end" and rec["structure"]["kept"]
    assert rec["steps"] == RECOVERY_BUDGETS["quick"]["steps"] == 8 and "blockwise" not in rec
