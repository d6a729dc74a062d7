"""Accounting against the paper's Table 4 (GPT-2 small) and by hand on a tiny model."""

import torch
from transformers import AutoModelForCausalLM, GPT2Config

from smartprune.adapters import get_adapter
from smartprune.compression.accounting import accounting, group_counts, unique_parameters
from smartprune.modules.masked import FoldedProjection


def test_gpt2_small_groups_match_table_4():
    model = AutoModelForCausalLM.from_config(GPT2Config())  # GPT-2 small shapes, random weights
    adapter = get_adapter(model)
    before = group_counts(adapter)
    assert before["irc"] == 14_155_776 and before["dwc"] == 7_077_888 and before["fpp_ff"] == 56_669_184
    for i in range(12):
        att = adapter.attention_projections(i)
        for role in ("q", "k"):
            p = getattr(att, role)
            adapter.replace(adapter.attention_paths(i)[role],
                            FoldedProjection(p.dense_weight(), p.bias.detach(), torch.ones(768, dtype=torch.bool),
                                             p.weight[0].detach()))
        att.v.set_mask(torch.eye(768, dtype=torch.bool))
    after = group_counts(adapter)
    assert after["irc"] == 18_432 and after["dwc"] == 9_216  # Table 4's "after" column
    acc = accounting(before, after, unique_parameters(model))
    assert abs(acc["groups"]["irc"]["c_ub"] - 0.99870) < 1e-4
    assert acc["overall"]["compression"] == (before["irc"] - 18_432 + before["dwc"] - 9_216) / unique_parameters(model)


def test_tied_parameters_count_once():
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10, n_positions=4))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert unique_parameters(model) == sum(p.numel() for p in model.parameters())  # parameters() dedups too
    assert unique_parameters(model) < sum(t.numel() for t in model.state_dict().values())


def test_the_table_names_a_method_only_where_it_ran_and_counts_all_the_time():
    from smartprune.compression.accounting import format_table

    group = {"before": 10, "after": 5, "c_ub": 0.5, "t": 0.1}
    acc = {"groups": {"irc": group, "fpp_ff": group}, "overall": {"params_before": 20, "params_after": 10,
                                                                  "compression": 0.5},
           "stages": {"ff_neurons": {"seconds": 2.0}}}
    table = format_table(acc, {"ff_neurons": 2.0}, total=7.5)
    assert "| W_Q, W_K |" in table and "| feed-forward |" in table and "IRC" not in table and "FPP" not in table
    assert table.splitlines()[-1].endswith(" 7.5 |")  # the whole compression's time, allocation included
    acc["stages"] = {"irc": {"seconds": 1.0}}
    assert "| IRC (W_Q, W_K) |" in format_table(acc, {"irc": 1.0})
