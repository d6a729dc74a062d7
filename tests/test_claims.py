"""The claim checks on hand-made sweeps: verdicts follow the numbers, in both metric directions."""

from smartprune.reporting.claims import check_claims, compare_variants, moderate_compression_helps


def _sweep(method, points, task="wikitext2", metric="perplexity"):
    variants = sorted({v for v, _, _ in points if v})
    return {"settings": {"method": method, "variants": variants, "tasks": [task]},
            "points": [{"variant": v, "rate": r, "results": {task: {metric: x}}, "compression": r / 10}
                       for v, r, x in points]}


def test_compare_variants_counts_rates_where_the_favoured_side_wins():
    s = _sweep("irc", [("", 0, 20.0), ("q", 0.5, 40.0), ("k", 0.5, 30.0), ("q", 1, 90.0), ("k", 1, 95.0)])
    c = compare_variants(s, "k", "q", "K beats Q")
    assert c.verdict == "mixed (1 of 2 rates)"
    assert "rate 0.5: k 30 (5.00% removed) vs q 40 (5.00% removed)" in c.evidence and c.sweep == "irc"
    assert compare_variants(None, "k", "q", "x").verdict == "not measured"


def test_accuracy_is_better_when_higher():
    s = _sweep("dwc", [("upper", 0.5, 0.8), ("lower", 0.5, 0.7)], task="sst2", metric="accuracy")
    assert compare_variants(s, "upper", "lower", "u").verdict == "holds"
    assert compare_variants(s, "lower", "upper", "l").verdict == "does not hold"


def test_moderate_compression_counts_points_beating_dense():
    s = _sweep("fpp-ff", [("", 0, 20.0), ("", 0.25, 19.0), ("", 0.5, 25.0), ("", 1, 10.0)])
    c = moderate_compression_helps([s])
    assert c.verdict == "holds at 1 of 2 points"  # rate 1 is not moderate
    assert "@ 0.25: 19 (dense 20)" in c.evidence
    worse = _sweep("dwc", [("", 0, 20.0), ("both", 0.5, 21.0)])
    assert moderate_compression_helps([worse]).verdict == "does not hold"
    assert moderate_compression_helps([]).verdict == "not measured"


def test_check_claims_finds_the_sweeps_it_needs():
    irc = _sweep("irc", [("", 0, 20.0), ("q", 0.5, 25.0), ("q", 1, 50.0), ("k", 1, 30.0)])
    ablation = _sweep("irc+dwc", [("direct", 1, 90.0), ("optimized", 1, 60.0), ("cumulative", 1, 70.0)])
    verdicts = [c.verdict for c in check_claims([irc, ablation])]
    assert verdicts == ["does not hold", "holds", "not measured", "holds", "does not hold"]
