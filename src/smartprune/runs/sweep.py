"""Compression curves: one method at a list of rates (and variants), evaluated at each rate.

Every (variant, rate) point compresses a fresh copy of the dense model: under the sequential
strategy the model is compressed block by block, so no single run ever holds "every block at rate
r" for an intermediate r, and a point cannot be read off another point's run. Points are written to
the JSON file as they finish; re-running the same command skips the points already there (resume).
Rate 0 is the dense model, evaluated once and shared by every variant.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from smartprune.compression.engine import compress
from smartprune.errors import DataError, RecipeError, did_you_mean
from smartprune.files import read_json, write_json
from smartprune.methods import METHODS
from smartprune.recipes import Recipe, load_recipe
from smartprune.recipes.schema import build_recipe

log = logging.getLogger(__name__)

# A sweep name is a registry stage key with '-' for '_', or "irc+dwc" (both at the same rate).
COMBINED = {"irc+dwc": ("irc", "dwc")}
# Variants: named field overrides of every swept stage. Figures 10/11 vary a stage field; the
# Figure 16 ablation varies how the fit runs.
VARIANTS = {
    "q": {"variant": "q"}, "k": {"variant": "k"}, "qk": {"variant": "qk"},
    "lower": {"variant": "lower"}, "upper": {"variant": "upper"}, "both": {"variant": "both"},
    "direct": {"steps": 0}, "optimized": {"cumulative": "off"}, "cumulative": {"cumulative": "window"},
}
BUILTIN_SWEEPS = {"ablation": ("direct", "optimized", "cumulative")}  # Figure 16


def stages_of(method: str) -> tuple[str, ...]:
    if method in COMBINED:
        return COMBINED[method]
    key = method.replace("-", "_")
    if key not in METHODS:
        names = [k.replace("_", "-") for k in METHODS] + list(COMBINED)
        raise RecipeError(f"unknown sweep method '{method}'{did_you_mean(method, names)}; known: {', '.join(names)}")
    return (key,)


def parse_rates(text: str) -> list[float]:
    """'0:1:0.1' (start:stop:step, stop included) or '0,0.5,0.9'; each in [0, 1], sorted, unique."""
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if not (step > 0 and math.isfinite(start) and math.isfinite(stop) and (stop - start) / step < 10_000):
                raise ValueError
            n = round((stop - start) / step)
            rates = [round(start + i * step, 6) for i in range(n + 1)]
        else:
            rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise DataError(f"rates '{text}': expected start:stop:step (e.g. 0:1:0.1: finite, a positive step, at most "
                        "10,000 points) or a comma list") from None
    bad = [r for r in rates if not 0 <= r <= 1]
    if bad or not rates:
        raise DataError(f"rates must lie in [0, 1], got {bad or text}")
    return sorted(set(rates))


@dataclass
class SweepSettings:
    model: str
    method: str
    rates: list[float]
    variants: list[str] = field(default_factory=lambda: [""])  # "" = the stage's defaults
    tasks: list[str] = field(default_factory=lambda: ["wikitext2"])
    base: str = "paper"  # recipe whose stage settings, strategy and calibration the sweep starts from
    limit: int | None = None
    examples: int | None = None
    seqlen: int = 1024
    calib_samples: int | None = None
    calib_seqlen: int | None = None
    seed: int = 0
    recover_tokens: int | None = None  # retrain every point (rate 0 too) with this budget before evaluating
    device: str | torch.device = "auto"  # where points are evaluated and retrained (compression itself runs on the CPU)

    def __post_init__(self) -> None:
        stages_of(self.method)
        names = [v for v in self.variants if v]
        expanded: list[str] = []
        for v in names or [""]:
            if v in BUILTIN_SWEEPS:
                expanded += BUILTIN_SWEEPS[v]
            elif v and v not in VARIANTS:
                raise DataError(f"unknown variant '{v}'{did_you_mean(v, [*VARIANTS, *BUILTIN_SWEEPS])}; known: "
                                f"{', '.join([*VARIANTS, *BUILTIN_SWEEPS])}")
            else:
                expanded.append(v)
        self.variants = expanded

    def key(self) -> dict:
        """What must match for a saved point to be reused."""
        d = dataclasses.asdict(self)
        keys = ["model", "method", "tasks", "base", "limit", "examples", "seqlen", "calib_samples", "calib_seqlen",
                "seed"] + (["recover_tokens"] if self.recover_tokens else [])  # older sweep files stay resumable
        return {k: d[k] for k in keys}


def point_recipe(base: Recipe, method: str, variant: str, rate: float) -> Recipe:
    """The base recipe reduced to the swept stage(s), at `rate`, with the variant's overrides."""
    doc = {k: v for k, v in base.to_dict().items() if k in ("strategy", "calibration")}
    for stage in stages_of(method):
        cfg = base.stages.get(stage)
        fields = dataclasses.asdict(cfg) if cfg is not None else {}
        cls = type(cfg) if cfg is not None else None
        rate_field = (cls or _stage_class(stage)).rate_field
        doc[stage] = {**fields, **VARIANTS.get(variant, {}), rate_field: rate}
    return build_recipe(doc, f"{method}@{rate:g}{'/' + variant if variant else ''}", "sweep")


def _stage_class(stage: str):
    from smartprune.recipes.schema import STAGE_TYPES

    return STAGE_TYPES[stage]


def _load_points(path: Path | None, settings: SweepSettings) -> list[dict]:
    if path is None or not path.is_file():
        return []
    data = read_json(path, "sweep file (--json)", DataError)
    if data.get("settings_key") != settings.key():
        raise DataError(f"{path} holds a sweep with other settings; use another --json file or the same settings")
    return data.get("points", [])


def run_sweep(settings: SweepSettings, json_path: str | Path | None = None, *, progress: bool = True) -> dict:
    """Evaluate the dense model and every (variant, rate) point; returns (and writes) the sweep."""
    from smartprune.data import check_positions
    from smartprune.device import resolve_device
    from smartprune.evaluation.suite import EvalSettings, check_tasks, evaluate
    from smartprune.recipes.schema import RecoverConfig
    from smartprune.runs.preflight import with_calibration
    from smartprune.storage.sources import load_model
    from smartprune.training.recover import recover

    path = Path(json_path) if json_path else None
    check_tasks(settings.tasks)
    eval_settings = EvalSettings(seqlen=settings.seqlen, limit=settings.limit, examples=settings.examples,
                                 seed=settings.seed)
    base = load_recipe(settings.base)
    # the overrides validated as compress validates them (a count or length out of range is one line)
    base = with_calibration(base, settings.calib_samples, settings.calib_seqlen)
    points = _load_points(path, settings)
    done = {(p["variant"], p["rate"]) for p in points}
    todo = [("", 0.0)] if 0.0 in settings.rates and ("", 0.0) not in done else []
    todo += [(v, r) for v in settings.variants for r in settings.rates if r > 0 and (v, r) not in done]
    if done:
        log.info("resuming: %d points already in %s, %d to go", len(done), path, len(todo))
    recipes = {(v, r): point_recipe(base, settings.method, v, r) for v, r in todo if r > 0}
    dev = resolve_device(settings.device)
    recover_cfg = None if settings.recover_tokens is None else \
        RecoverConfig(tokens=settings.recover_tokens, seqlen=min(256, settings.seqlen))
    loaded = load_model(settings.model)
    check_positions(loaded.model, settings.seqlen, "--seqlen")
    check_positions(loaded.model, base.calibration.seqlen, "calibration window length (--calib-seqlen)")
    dense_state = copy.deepcopy(loaded.model)
    out = {"settings": dataclasses.asdict(settings), "settings_key": settings.key(), "points": points}
    for variant, rate in tqdm(todo, desc=f"sweep {settings.method}", disable=not progress):
        loaded.model = copy.deepcopy(dense_state)
        start = time.perf_counter()
        report = None
        if rate > 0:
            report = compress(loaded.model, loaded.tokenizer, recipes[(variant, rate)], seed=settings.seed,
                              device=dev, progress=False).report
        compress_s = time.perf_counter() - start
        loaded.model.to(dev)
        results = evaluate(loaded, settings.tasks, eval_settings, progress=False)
        point = {"variant": variant, "rate": rate, "compression": report["overall"]["compression"] if report else 0.0,
                 "groups": report["groups"] if report else {}, "results": results, "compress_seconds": compress_s}
        if recover_cfg is not None:  # equal retraining for every point; the curves show the retrained model
            rec = recover(loaded.model, loaded.tokenizer, recover_cfg, teacher=dense_state, device=dev,
                          seed=settings.seed, progress=False)
            point["results_before_recovery"] = results
            point["results"] = evaluate(loaded, settings.tasks, eval_settings, progress=False)
            point["recovery"] = {k: rec[k] for k in ("tokens", "steps", "seconds", "perplexity_before",
                                                     "perplexity_after")}
            dense_state.to("cpu")
        loaded.model.to("cpu")
        points.append({**point, "seconds": time.perf_counter() - start})
        if path:
            write_json(path, out)  # after every point: an interrupted sweep resumes from here
    points.sort(key=lambda p: (p["variant"], p["rate"]))
    if path:
        write_json(path, out)
    return out


def headline_metric(result: dict) -> str:
    """The metric a sweep point is read by: perplexity for language modelling, else accuracy."""
    return "perplexity" if "perplexity" in result else "accuracy"


def summary_rows(sweep: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a sweep: variant, rate, compression, then each task's headline metric."""
    tasks = sweep["settings"]["tasks"]
    rows = []
    for p in sweep["points"]:
        cells = []
        for t in tasks:
            r = p["results"][t]
            value = r.get(headline_metric(r))
            cells.append("n/a" if value is None else f"{value:,.4g}")
        label = "dense" if p["rate"] == 0 else p["variant"] or "-"
        rows.append([label, f"{p['rate']:g}", f"{100 * p['compression']:.2f}%", *cells])
    return ["variant", "rate", "compression", *tasks], rows


def summary(sweep: dict) -> str:
    header, rows = summary_rows(sweep)
    lines = ["| " + " | ".join(header) + " |", "|---|---:|---:|" + "---:|" * (len(header) - 3)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])
