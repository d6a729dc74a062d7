"""The paper's qualitative claims, checked against measured sweeps.

Each check reads sweep JSON data (``smartprune sweep --json``) and compares the variants the claim is
about at every rate both were measured at, on the sweep's first task: perplexity is better when
lower, accuracy when higher. A claim "holds" when the favoured side is better at every shared rate,
"mixed" when at some, "does not hold" when at none, and "not measured" when the sweep it needs is
missing. The evidence cell lists the numbers so a reader can judge the margin, not just the verdict.
"""

from __future__ import annotations

from dataclasses import dataclass

from smartprune.runs.sweep import headline_metric


@dataclass
class Claim:
    claim: str
    verdict: str
    evidence: str
    sweep: str  # the sweep (method) whose figure shows it


def _task(sweep: dict) -> str:
    return sweep["settings"]["tasks"][0]


def _value(point: dict, task: str) -> float | None:
    r = point["results"].get(task, {})
    return r.get(headline_metric(r))


def _lower_better(sweep: dict) -> bool:
    task = _task(sweep)
    return next((headline_metric(p["results"][task]) == "perplexity" for p in sweep["points"]
                 if p["results"].get(task)), True)


def _series(sweep: dict, variant: str) -> dict[float, tuple[float, float | None]]:
    """rate -> (metric, share of the model's parameters removed) of one variant."""
    task = _task(sweep)
    values = ((p, _value(p, task)) for p in sweep["points"] if p["variant"] == variant and p["rate"] > 0)
    return {p["rate"]: (v, p.get("compression")) for p, v in values if v is not None}


def _cell(value: float, compression: float | None) -> str:
    # Equal rates can remove different amounts (GQA: K is smaller than Q), so show both.
    return f"{value:,.4g}" + ("" if compression is None else f" ({100 * compression:.2f}% removed)")


def _verdict(wins: int, total: int) -> str:
    if total == 0:
        return "not measured"
    return "holds" if wins == total else "does not hold" if wins == 0 else f"mixed ({wins} of {total} rates)"


def compare_variants(sweep: dict | None, better: str, worse: str, claim: str) -> Claim:
    """`better` should beat `worse` at every rate both were measured at."""
    if sweep is None:
        return Claim(claim, "not measured", "no sweep with these variants", "-")
    a, b = _series(sweep, better), _series(sweep, worse)
    rates = sorted(set(a) & set(b))
    low = _lower_better(sweep)
    wins = sum((a[r][0] < b[r][0]) if low else (a[r][0] > b[r][0]) for r in rates)
    evidence = "; ".join(f"rate {r:g}: {better} {_cell(*a[r])} vs {worse} {_cell(*b[r])}" for r in rates)
    return Claim(claim, _verdict(wins, len(rates)), evidence or "no shared rates", sweep["settings"]["method"])


def moderate_compression_helps(sweeps: list[dict], moderate: float = 0.5) -> Claim:
    """Some point at a rate in (0, moderate] is better than the dense model of its sweep (the paper
    reports accuracy rising at moderate rates, not at every one)."""
    claim = f"quality improves with moderate compression (rate <= {moderate:g})"
    found, wins, total = [], 0, 0
    for sweep in sweeps:
        task, low = _task(sweep), _lower_better(sweep)
        dense = next((_value(p, task) for p in sweep["points"] if p["rate"] == 0), None)
        if dense is None:
            continue
        for p in sweep["points"]:
            value = _value(p, task)
            if not 0 < p["rate"] <= moderate or value is None:
                continue
            total += 1
            if value < dense if low else value > dense:
                wins += 1
                found.append(f"{sweep['settings']['method']} {p['variant']} @ {p['rate']:g}: {value:,.4g} "
                             f"(dense {dense:,.4g})")
    evidence = f"{wins} of {total} moderate points beat their dense model"
    if found:
        evidence += ": " + "; ".join(found)
    methods = ", ".join(s["settings"]["method"] for s in sweeps) or "-"
    verdict = "not measured" if not total else f"holds at {wins} of {total} points" if wins else "does not hold"
    return Claim(claim, verdict, evidence, methods)


def _find(sweeps: list[dict], method: str, *variants: str) -> dict | None:
    return next((s for s in sweeps if s["settings"]["method"] == method
                 and set(variants) <= set(s["settings"]["variants"])), None)


def check_claims(sweeps: list[dict]) -> list[Claim]:
    """Every qualitative claim of the paper that a sweep can test."""
    irc, dwc = _find(sweeps, "irc", "q", "k"), _find(sweeps, "dwc", "lower", "upper")
    ablation = _find(sweeps, "irc+dwc", "direct", "optimized", "cumulative") or \
        next((s for s in sweeps if {"optimized", "cumulative"} <= set(s["settings"]["variants"])), None)
    return [
        moderate_compression_helps(sweeps),
        compare_variants(irc, "k", "q", "Key is more compressible than Query (Fig. 10)"),
        compare_variants(dwc, "upper", "lower", "upper-triangular DWC beats lower-triangular (Fig. 11)"),
        compare_variants(ablation, "optimized", "direct", "forward-propagation optimization beats direct "
                                                          "compression (Fig. 16)"),
        compare_variants(ablation, "cumulative", "optimized", "cumulative loss beats optimization alone (Fig. 16)"),
    ]
