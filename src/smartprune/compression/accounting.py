"""Parameter accounting in the form of the paper's Tables 3-4.

Groups: ``irc`` (W_Q and W_K weights), ``dwc`` (W_V weights), ``attn_out`` (W_O weights, which the
paper leaves alone but the baselines prune), ``fpp_emb`` (embedding tables), ``fpp_ff`` (feed-forward
weights and biases, as Table 4 counts them). A removed (masked) weight
counts as gone; a folded matrix counts as its vector plus any rows left unfolded.
"""

from __future__ import annotations

from torch import nn

from smartprune.adapters import Adapter

GROUPS = {"irc": "IRC (W_Q, W_K)", "dwc": "DWC (W_V)", "attn_out": "W_O", "fpp_emb": "FPP-emb", "fpp_ff": "FPP-FF",
          "linear": "block linears"}  # the last: a model without a table entry, whose roles are unknown


def group_counts(adapter: Adapter) -> dict[str, int]:
    """Stored parameters of each group in the model as it is now."""
    counts = dict.fromkeys(GROUPS, 0)
    counts["fpp_emb"] = sum(e.alive() for e in adapter.embeddings().values())
    model = adapter.model
    for i in range(len(adapter.blocks())):
        for group, paths in adapter.accounting_groups(i).items():
            for p in map(model.get_submodule, paths):
                # Table 4 counts the feed-forward biases with their weights
                counts[group] += p.alive() + (p.bias.numel() if group == "fpp_ff" and p.bias is not None else 0)
    return counts


def block_linear_weights(adapter: Adapter) -> int:
    """Weights of every linear layer of every block (the peers' pruning target)."""
    return sum(adapter.model.get_submodule(p).weight.numel() for i in range(len(adapter.blocks()))
               for p in adapter.linear_paths(i).values())


def unique_parameters(model: nn.Module) -> int:
    """Parameter count with tied tensors counted once."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        seen[p.data_ptr()] = p.numel()
    return sum(seen.values())


def accounting(before: dict[str, int], after: dict[str, int], total: int, added: int = 0, other: int = 0) -> dict:
    """Before/after per group, C%UB (share of the group removed), T% (share of the model removed by
    the group) and the overall compression (fraction of the model's parameters removed, net of the
    `added` ones: an untied or low-rank output head, `smartprune.modules.head`; plus `other` removed
    outside the groups: the norms of blocks that depth pruning removed)."""
    groups = {}
    for g in GROUPS:
        if g == "linear" and not before[g]:  # only models without a table entry have this group
            continue
        removed = before[g] - after[g]
        groups[g] = {"before": before[g], "after": after[g],
                     "c_ub": removed / before[g] if before[g] else 0.0,
                     "t": removed / total if total else 0.0}
    removed = sum(before[g] - after[g] for g in groups) - added + other
    overall = {"params_before": total, "params_after": total - removed,
               "compression": removed / total if total else 0.0}
    return {"groups": groups, "overall": {**overall, "head_params_added": added} if added else overall}


# the matrices of each group, named by what they are: the paper's method names (GROUPS) only where that
# method ran, so a structured or SparseGPT recipe's table does not read as if IRC or FPP had pruned it
MATRICES = {"irc": "W_Q, W_K", "dwc": "W_V", "attn_out": "W_O", "fpp_emb": "embedding", "fpp_ff": "feed-forward",
            "linear": "block linears"}


def group_label(group: str, stages: dict) -> str:
    return GROUPS[group] if group in stages else MATRICES[group]


def format_table(acc: dict, seconds: dict[str, float] | None = None, total: float | None = None) -> str:
    """A Markdown table like the paper's Table 4, plus wall time per stage when given (`total`: the
    whole compression's, which also counts stages without a group of their own and the allocation)."""
    head = "| group | before | after | C%UB | T% |" + (" seconds |" if seconds is not None else "")
    rule = "|---|---:|---:|---:|---:|" + ("---:|" if seconds is not None else "")
    rows = [head, rule]
    stages = acc.get("stages", {})
    for g in GROUPS:
        if g not in acc["groups"]:
            continue
        label = group_label(g, stages)
        r = acc["groups"][g]
        row = f"| {label} | {r['before']:,} | {r['after']:,} | {100 * r['c_ub']:.2f}% | {100 * r['t']:.2f}% |"
        if seconds is not None:
            row += f" {seconds.get(g, 0.0):.1f} |" if g in seconds else " - |"
        rows.append(row)
    o = acc["overall"]
    tail = f"| **overall** | {o['params_before']:,} | {o['params_after']:,} | | {100 * o['compression']:.2f}% |"
    if seconds is not None:
        tail += f" {sum(seconds.values()) if total is None else total:.1f} |"
    rows.append(tail)
    return "\n".join(rows)
