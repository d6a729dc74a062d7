"""Structured stages (depth, attention heads, feed-forward neurons), their allocation, and the export
as a smaller standard model: a Hugging Face folder and a GGUF file that vanilla transformers reads."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import smartprune
from smartprune.adapters import get_adapter
from smartprune.cli.main import main
from smartprune.errors import RecipeError
from smartprune.methods.base import Sublayer
from smartprune.methods.heads import head_importance
from smartprune.methods.neurons import neuron_importance
from smartprune.recipes.schema import build_recipe
from smartprune.testing import family_model, gguf_ready_model

VOCAB = 50257
MIX = "depth: {rate: 0.5}\nattn_heads: {rate: 0.34}\nff_neurons: {rate: 0.5}\n"


def run(capsys, *argv):
    code = main(["-q", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory, gpt2_tokenizer):
    root = tmp_path_factory.mktemp("structured")
    for name in ("llama", "qwen3", "gemma3_text"):
        family_model(name, layers=4).save_pretrained(root / name)
        gpt2_tokenizer.save_pretrained(root / name)
    return root


def _ids(n: int = 2, length: int = 20) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(0))


def test_neuron_importance_is_the_squared_output_contribution_by_hand():
    model = family_model("llama", vocab=100)
    adapter = get_adapter(model)
    x = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(1))
    sub = Sublayer(adapter, "ff", 0, adapter.ff_paths(0), inputs=x)
    gate, up, down = (sub.module(r) for r in ("gate", "up", "down"))
    with torch.no_grad():
        h = F.silu(x @ gate.weight) * (x @ up.weight)  # (3, 5, 64): the down projection's input
        want = h.double().pow(2).sum((0, 1)) * down.weight.double().pow(2).sum(1)
    assert torch.allclose(neuron_importance(sub, "activation"), want, rtol=1e-6)
    norms = (gate.weight.pow(2).sum(0) + up.weight.pow(2).sum(0) + down.weight.pow(2).sum(1)).sqrt()
    assert torch.allclose(neuron_importance(sub, "magnitude").float(), norms, rtol=1e-5)


def test_head_importance_is_each_heads_squared_output_contribution_by_hand():
    model = family_model("llama", vocab=100)
    adapter = get_adapter(model)
    adapter.prepare_calls(5, {3})
    x = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(2))
    sub = Sublayer(adapter, "attention", 0, adapter.attention_paths(0), inputs=x)
    seen = []
    handle = sub.module("o").register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        sub.forward(x)
    handle.remove()
    o_in, w = seen[0].double(), sub.module("o").weight.detach().double()
    want = torch.stack([(o_in[..., h * 8:(h + 1) * 8] @ w[h * 8:(h + 1) * 8]).pow(2).sum() for h in range(6)])
    assert torch.allclose(head_importance(sub, 6, 8, "activation"), want, rtol=1e-6)


def test_a_removed_input_that_kept_ones_combine_is_reconstructed_exactly():
    from smartprune.methods.compensate import compensate_rows

    g = torch.Generator().manual_seed(3)
    h = torch.randn(40, 3, generator=g, dtype=torch.float64)
    h = torch.cat([h, (2 * h[:, 0] - h[:, 1])[:, None]], 1)  # input 3 = 2 x input 0 - input 1
    w = torch.randn(4, 5, generator=g, dtype=torch.float64)  # rows: the 4 inputs
    keep = torch.tensor([True, True, True, False])
    new = w.clone()
    compensate_rows(new, h.T @ h, keep, ~keep, damp=0.0)
    # by hand: row 3's contribution moves to rows 0 and 1 with the coefficients 2 and -1
    want = w.clone()
    want[0] += 2 * w[3]
    want[1] -= w[3]
    assert torch.allclose(new[:3], want[:3], atol=1e-9)
    assert torch.allclose(h[:, :3] @ new[:3], h @ w, atol=1e-9)  # the output without input 3 is the same


def test_the_plan_scores_a_compensated_removal_as_the_refit_would_leave_it():
    """Feeding the removed input its least-squares prediction from the kept ones gives the re-fitted
    projection's output: for an input the kept ones combine, the dense output itself."""
    from smartprune.compression.structured import Scores, _removal
    from smartprune.methods.compensate import compensate_rows, predictor

    g = torch.Generator().manual_seed(3)
    h = torch.randn(40, 3, generator=g, dtype=torch.float64)
    h = torch.cat([h, (2 * h[:, 0] - h[:, 1])[:, None]], 1)  # input 3 = 2 x input 0 - input 1
    keep = torch.tensor([True, True, True, False])
    assert torch.allclose(predictor(h.T @ h, keep, ~keep, damp=0.0).flatten(),
                          torch.tensor([2.0, -1.0, 0.0], dtype=torch.float64), atol=1e-9)  # by hand
    proj = torch.nn.Linear(4, 5, bias=False).double()
    gram = h.T @ h
    refit = proj.weight.detach().T.clone()  # rows = inputs, as the stages hold them
    compensate_rows(refit, gram, keep, ~keep)  # the default damping, in both
    (fed,) = _removal(keep.double(), Scores({}, [], [], {"ff_neurons": [gram]}), "ff_neurons", 0)(proj, (h,))
    assert torch.equal(fed[:, :3], h[:, :3]) and torch.allclose(proj(fed), h[:, :3] @ refit[:3], atol=1e-9)
    assert torch.allclose(proj(fed), proj(h), atol=0.05)  # near the dense output (damped, not exact)
    (zeroed,) = _removal(keep.double(), Scores({}, [], [], None), "ff_neurons", 0)(proj, (h,))
    assert torch.equal(zeroed[:, 3], torch.zeros(40, dtype=torch.float64))  # not compensated: zeroed


def test_a_compensated_plan_scores_its_candidates_compensated():
    from smartprune.data import Calibration

    calib = Calibration(torch.randint(0, 100, (8, 32)), torch.randint(0, 100, (4, 32)), "test")
    plans = {}
    for how in ("zeroed", "compensated"):
        recipe = build_recipe({"overall": {"target": 0.3, "structure": how}, "attn_heads": {},
                               "ff_neurons": {}}, "t", "test")
        plans[how] = smartprune.compress(family_model("llama", vocab=100, layers=2), None, recipe, calib=calib,
                                         progress=False).report["structure"]["plan"]
    assert plans["zeroed"]["compensated"] == [] and plans["compensated"]["compensated"] == ["attn_heads", "ff_neurons"]
    losses = {how: {(c["heads_removed_per_group"], c["neurons_removed_per_block"]): c["held_out_loss"]
                    for c in p["candidates"]} for how, p in plans.items()}
    assert losses["zeroed"].keys() == losses["compensated"].keys()
    assert all(losses["compensated"][k] != losses["zeroed"][k] for k in losses["zeroed"])


@pytest.mark.parametrize("stage", ["ff_neurons", "attn_heads"])
def test_compensation_at_removal_lowers_each_blocks_output_error(stage):
    from smartprune.data import Calibration

    calib = Calibration(torch.randint(0, 100, (8, 32), generator=torch.Generator().manual_seed(4)),
                        torch.randint(0, 100, (4, 32), generator=torch.Generator().manual_seed(5)), "test")
    errors = {}
    for on in (False, True):
        recipe = build_recipe({stage: {"rate": 0.5, "compensate": on}}, "t", "test")
        report = smartprune.compress(family_model("llama", vocab=100, layers=2), None, recipe, calib=calib,
                                     progress=False).report
        errors[on] = report["stages"][stage]["mean_relative_error"]
    assert errors[True] < 0.9 * errors[False], errors


def test_skipping_a_block_is_the_model_whose_block_adds_nothing():
    model, ids = family_model("llama", vocab=100, layers=4), torch.randint(0, 100, (2, 12))
    adapter = get_adapter(model)
    with torch.no_grad(), adapter.without_blocks({2}):
        skipped = model(ids, use_cache=False).logits
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4  # restored
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()  # block 2 adds nothing to the residual stream
        model.model.layers[2].mlp.down_proj.weight.zero_()
        assert torch.allclose(model(ids, use_cache=False).logits, skipped, atol=1e-5)


def test_depth_removes_the_blocks_whose_skipping_costs_least(gpt2_tokenizer):
    from smartprune.data import Calibration
    from smartprune.methods.depth import skip_losses

    model = family_model("llama", layers=4)
    calib = Calibration(torch.randint(0, VOCAB, (4, 16)), torch.randint(0, VOCAB, (2, 16)), "test")
    losses = skip_losses(get_adapter(model), calib.eval_ids, set(), [0, 1, 2, 3])
    cheapest = min(losses, key=losses.get)
    marker = model.model.layers[3 if cheapest != 3 else 2]
    recipe = build_recipe({"depth": {"rate": 0.25, "iterative": False}}, "t", "test")
    result = smartprune.compress(model, gpt2_tokenizer, recipe, calib=calib, progress=False)
    assert result.report["structure"]["depth"]["removed"] == [cheapest]
    assert model.config.num_hidden_layers == 3 and marker in list(model.model.layers)
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]  # the KV cache's index
    assert result.report["overall"]["params_after"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3_text"])
def test_structured_export_is_a_smaller_standard_model_vanilla_transformers_loads(name, base_dirs, use_data,
                                                                                   tmp_path, capsys):
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(MIX)
    out, dense = tmp_path / "out", tmp_path / "dense"
    code, _, err = run(capsys, "compress", base_dirs / name, "--recipe", recipe, "--out", out,
                       "--dense-out", dense, "--calib-samples", "8", "--calib-seqlen", "32")
    assert code == 0, err
    vanilla = AutoModelForCausalLM.from_pretrained(dense).eval()
    c = vanilla.config
    heads_before = 6 if name == "llama" else 4
    assert (c.num_hidden_layers, c.intermediate_size) == (2, 32)
    assert c.num_attention_heads < heads_before and c.num_key_value_heads == 2
    assert sum(p.numel() for p in vanilla.parameters()) < sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(base_dirs / name).parameters())
    compressed = smartprune.load(out)
    with torch.no_grad():
        assert torch.allclose(compressed(_ids()).logits, vanilla(_ids()).logits, atol=1e-4, rtol=1e-4)
    greedy = dict(max_new_tokens=8, do_sample=False)  # the KV cache with fewer layers and heads
    assert torch.equal(compressed.generate(_ids(1, 4), **greedy), vanilla.generate(_ids(1, 4), **greedy))
    again = smartprune.load(out, structured=False)  # the compressed folder's config says the same sizes
    assert again.config.num_hidden_layers == 2 and again.config.num_attention_heads == c.num_attention_heads


def test_gguf_export_reads_back_in_transformers(base_dirs, use_data, tmp_path, capsys):
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(MIX)
    dense = tmp_path / "dense"
    for kind in ("f32", "q8_0"):
        code, _, err = run(capsys, "compress", base_dirs / "llama", "--recipe", recipe, "--out", tmp_path / kind,
                           "--gguf-out", tmp_path / f"m-{kind}.gguf", "--gguf-type", kind, "--calib-samples", "8",
                           "--calib-seqlen", "32", *(("--dense-out", dense) if kind == "f32" else ()))
        assert code == 0, err
    vanilla = AutoModelForCausalLM.from_pretrained(dense).eval()
    with torch.no_grad():
        want = vanilla(_ids()).logits
        f32 = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m-f32.gguf").eval()
        assert f32.config.num_hidden_layers == 2 and f32.config.num_attention_heads == 4
        assert torch.allclose(f32(_ids()).logits, want, atol=1e-4, rtol=1e-4)
        q8 = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m-q8_0.gguf").eval()
        err = (q8(_ids()).logits - want).abs().max() / want.abs().max()
    assert 0 < err < 0.1  # 8-bit blocks: close, not equal


def test_recover_writes_the_recovered_model_as_gguf_and_refuses_what_it_cannot(base_dirs, use_data, tmp_path,
                                                                               capsys, monkeypatch):
    """The model a user ships is the recovered one: `recover --gguf-out` writes it (the same logits as its
    --dense-out folder, read back by transformers), checked before any training like compress's."""
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(MIX)
    code, _, err = run(capsys, "compress", base_dirs / "llama", "--recipe", recipe, "--out", tmp_path / "c",
                       "--calib-samples", "8", "--calib-seqlen", "32")
    assert code == 0, err
    train = ("--steps", "2", "--train-seqlen", "32", "--batch-size", "2", "--eval-windows", "1")
    code, out, err = run(capsys, "recover", tmp_path / "c", "--teacher", base_dirs / "llama", "--out", tmp_path / "r",
                         "--dense-out", tmp_path / "rd", "--gguf-out", tmp_path / "r.gguf", "--gguf-type", "f32",
                         *train)
    assert code == 0, err
    assert "GGUF file" in out and "r.gguf" in out
    vanilla = AutoModelForCausalLM.from_pretrained(tmp_path / "rd").eval()
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="r.gguf").eval()
    assert back.config.num_hidden_layers == vanilla.config.num_hidden_layers == 2
    with torch.no_grad():
        assert torch.allclose(back(_ids()).logits, vanilla(_ids()).logits, atol=1e-4, rtol=1e-4)

    import smartprune.runs.recover as recovering

    monkeypatch.setattr(recovering, "recover", lambda *a, **k: pytest.fail("trained before refusing"))
    unstructured = tmp_path / "sparsegpt.yaml"
    unstructured.write_text("sparsegpt: {sparsity: 0.5}\n")
    code, _, err = run(capsys, "compress", base_dirs / "llama", "--recipe", unstructured, "--out", tmp_path / "u",
                       "--calib-samples", "8", "--calib-seqlen", "32")
    assert code == 0, err
    cases = [((tmp_path / "u", "--gguf-out", tmp_path / "u.gguf"), "stage 'sparsegpt' leaves unstructured sparsity"),
             ((tmp_path / "c", "--gguf-type", "q8_0"), "give --gguf-out FILE too"),
             ((tmp_path / "c", "--gguf-out", tmp_path / "q.gguf", "--gguf-type", "q4_k"), "q4_k"),
             ((tmp_path / "c", "--gguf-out", tmp_path / "r.gguf"), "exists")]
    for argv, message in cases:
        code, _, err = run(capsys, "recover", *argv, "--teacher", base_dirs / "llama", "--out", tmp_path / "r2",
                           *train)
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "r2").exists() and not (tmp_path / "u.gguf").exists()


@pytest.mark.slow  # 38 s; the Llama GGUF export stays in the default suite
@pytest.mark.parametrize("name", ["qwen3", "gemma3_text"])
def test_gguf_export_of_qwen3_and_gemma3_reads_back_in_transformers(name, use_data, tmp_path, capsys,
                                                                    gpt2_tokenizer):
    gguf_ready_model(name, VOCAB).save_pretrained(tmp_path / "base")
    gpt2_tokenizer.save_pretrained(tmp_path / "base")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("attn_heads: {rate: 0.5}\nff_neurons: {rate: 0.5}\n")
    code, _, err = run(capsys, "compress", tmp_path / "base", "--recipe", recipe, "--out", tmp_path / "o",
                       "--dense-out", tmp_path / "dense", "--gguf-out", tmp_path / "m.gguf", "--gguf-type", "f32",
                       "--calib-samples", "8", "--calib-seqlen", "32")
    assert code == 0, err
    vanilla = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    assert back.config.num_attention_heads == vanilla.config.num_attention_heads < 4
    assert back.config.intermediate_size == vanilla.config.intermediate_size == 32
    with torch.no_grad():
        assert torch.allclose(back(_ids()).logits, vanilla(_ids()).logits, atol=1e-4, rtol=1e-4)
    if name == "gemma3_text":  # removed blocks break the layer pattern: refused before any work
        code, _, err = run(capsys, "compress", tmp_path / "base", "--recipe", "slim-40", "--out", tmp_path / "o2",
                           "--gguf-out", tmp_path / "m2.gguf")
        assert code == 2 and "stage 'depth'" in err and not (tmp_path / "o2").exists()


def test_gguf_and_standard_export_refuse_what_a_standard_config_cannot_express(base_dirs, use_data, tmp_path,
                                                                               capsys, monkeypatch):
    import smartprune.runs.pipeline as runs

    monkeypatch.setattr(runs, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code, _, err = run(capsys, "compress", base_dirs / "llama", "--recipe", "paper", "--out", tmp_path / "o",
                       "--gguf-out", tmp_path / "m.gguf")
    assert code == 2 and "stage 'fpp_emb'" in err and err.count("\n") == 1
    mix = tmp_path / "mix.yaml"
    mix.write_text(MIX)
    code, _, err = run(capsys, "compress", base_dirs / "llama", "--recipe", mix, "--out", tmp_path / "o",
                       "--gguf-out", tmp_path / "m.gguf", "--gguf-type", "q4_k")
    assert code == 2 and "q4_k" in err
    (tmp_path / "taken.gguf").write_text("mine")
    code, _, err = run(capsys, "compress", base_dirs / "llama", "--recipe", mix, "--out", tmp_path / "o",
                       "--gguf-out", tmp_path / "taken.gguf")
    assert code == 2 and "exists" in err and (tmp_path / "taken.gguf").read_text() == "mine"
    code, _, err = run(capsys, "compress", base_dirs / "gemma3_text", "--recipe", mix, "--out", tmp_path / "o",
                       "--gguf-out", tmp_path / "g.gguf")
    assert code == 2 and "query_pre_attn_scalar" in err  # the reader would take 256
    assert not (tmp_path / "o").exists()
    with pytest.raises(RecipeError, match="stage 'fpp_ff' leaves unstructured sparsity"):
        build_recipe({"export": "standard", "depth": {}, "fpp_ff": {}}, "t", "test")
    with pytest.raises(RecipeError, match="both reshape the same matrices"):
        build_recipe({"ff_neurons": {}, "fpp_ff": {}}, "t", "test")


def test_allocation_meets_the_target_exactly_with_the_least_held_out_loss():
    from smartprune.data import Calibration

    model = family_model("llama", vocab=100, layers=4)
    total = sum(p.numel() for p in model.parameters())
    calib = Calibration(torch.randint(0, 100, (8, 32)), torch.randint(0, 100, (4, 32)), "test")
    recipe = smartprune.load_recipe("slim-40")  # the built-in structured recipe: 40% of all parameters
    assert recipe.export == "standard" and recipe.overall.target == 0.4
    report = smartprune.compress(model, None, recipe, calib=calib, progress=False).report
    plan = report["structure"]["plan"]
    chosen = plan["chosen"]
    assert chosen["held_out_loss"] == min(c["held_out_loss"] for c in plan["candidates"])
    assert len({(c["blocks_removed"], c["heads_removed_per_group"]) for c in plan["candidates"]}) > 1
    per_neuron = 3 * 48  # a neuron's gate and up columns and its down row
    blocks_left = 4 - chosen["blocks_removed"]
    assert abs(report["overall"]["compression"] - 0.4) <= per_neuron * blocks_left / total
    assert model.config.num_hidden_layers == blocks_left


def test_the_depth_stage_ranks_blocks_with_the_allocations_measurement(monkeypatch):
    import smartprune.compression.structured as planner
    import smartprune.methods.depth as depth
    from smartprune.data import Calibration

    calls = []
    for module in (planner, depth):  # who measures the skip losses, and how often
        monkeypatch.setattr(module, "skip_losses", lambda *a, m=module, f=depth.skip_losses: calls.append(m) or f(*a))
    model = family_model("llama", vocab=100, layers=4)
    calib = Calibration(torch.randint(0, 100, (8, 32)), torch.randint(0, 100, (4, 32)), "test")
    recipe = build_recipe({"overall": {"target": 0.5}, "depth": {"iterative": False}}, "t", "test")
    report = smartprune.compress(model, None, recipe, calib=calib, progress=False).report["structure"]
    assert calls == [planner]  # measured once, by the plan
    ranked = sorted(range(4), key=report["plan"]["skip_one_block_loss"].get)
    assert report["depth"]["removed"] == sorted(ranked[:2]) and model.config.num_hidden_layers == 2


def test_recover_keeps_the_smaller_shapes_and_writes_the_standard_folder(base_dirs, use_data, tmp_path, capsys):
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(MIX)
    out = tmp_path / "out"
    code, _, err = run(capsys, "compress", base_dirs / "llama", "--recipe", recipe, "--out", out,
                       "--calib-samples", "8", "--calib-seqlen", "32")
    assert code == 0, err
    code, _, err = run(capsys, "recover", out, "--teacher", base_dirs / "llama", "--out", tmp_path / "rec",
                       "--dense-out", tmp_path / "rec-dense", "--steps", "2", "--seqlen", "32", "--batch-size", "2",
                       "--eval-windows", "1")
    assert code == 0, err
    report = json.loads((tmp_path / "rec" / "report.json").read_text())
    assert report["recovery"]["steps"] == 2
    vanilla = AutoModelForCausalLM.from_pretrained(tmp_path / "rec-dense")
    assert (vanilla.config.num_hidden_layers, vanilla.config.intermediate_size) == (2, 32)
