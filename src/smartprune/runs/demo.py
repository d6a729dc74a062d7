"""`smartprune demo`: compress a model, retrain it, and show dense / compressed / recovered quality."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from smartprune.compression.accounting import format_table
from smartprune.compression.engine import compress
from smartprune.data import TRAIN_TEXTS, eval_text, train_text_path
from smartprune.device import resolve_device
from smartprune.errors import RecipeError
from smartprune.evaluation.perplexity import check_limit, perplexity
from smartprune.files import write_json
from smartprune.recipes import Recipe, load_recipe
from smartprune.recipes.schema import RECOVERY_BUDGETS, RecoverConfig
from smartprune.runs.compress import check_windows, stage_seconds, with_calibration
from smartprune.runs.environment import environment
from smartprune.storage.sources import load_model

# Recovery in the demo when the recipe has none of its own (`RECOVERY_BUDGETS`: quick and full)
DEMO_RECOVERY = RECOVERY_BUDGETS
# --quick runs the recipe's stages on a coarser schedule: the recursive strategy's rate in steps of a
# quarter (the paper's 0.05 is 20 fits per matrix), FPP zeroing at least 35% of a matrix per iteration
# (the paper's 10% is 7 iterations to 70%); on SmolLM2 the `paper` compression is most of the demo's time
QUICK_STEP = 0.25
QUICK_FPP_SHARE = 0.35


def quick_schedule(rec: Recipe) -> tuple[Recipe, str]:
    """`rec` on the --quick schedule, and a line saying what changed ('' when nothing did)."""
    changes: dict = {}
    said = []
    if rec.strategy.recursive and rec.strategy.step < QUICK_STEP:
        changes["strategy"] = dataclasses.replace(rec.strategy, step=QUICK_STEP)
        said.append(f"recursive rate steps of {QUICK_STEP:g} (recipe: {rec.strategy.step:g})")
    for name, cfg in rec.stages.items():
        share = getattr(cfg, "p_pos", 0.0) + getattr(cfg, "p_neg", 0.0)
        if 0 < share < QUICK_FPP_SHARE:
            k = QUICK_FPP_SHARE / share
            changes[name] = dataclasses.replace(cfg, p_pos=cfg.p_pos * k, p_neg=cfg.p_neg * k)
            said.append(f"{name} zeroing {QUICK_FPP_SHARE:.0%} per iteration (recipe: {share:.0%})")
    return (rec.replace(**changes), "quick schedule: " + ", ".join(said)) if changes else (rec, "")


@dataclass
class DemoRun:
    model: str
    recipe: str
    dense: dict
    compressed: dict
    report: dict
    recovered: dict | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    cost: dict | None = None  # running cost of the final model against dense (`_running_cost`)
    schedule: str = ""  # what --quick changed in the recipe's schedule

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        d, c, r = self.dense, self.compressed, self.recovered
        s = self.seconds
        rows = [("dense", d), ("compressed", c)] + ([("compressed + recovered", r)] if r else [])
        lines = [f"{self.model}, recipe '{self.recipe}'" + (f" ({self.schedule})" if self.schedule else ""), "",
                 f"WikiText-2 test perplexity, first {d['windows']} windows of {d['seqlen']} tokens "
                 f"({d['tokens']:,} scored tokens):", "", "| model | perplexity |", "|---|---:|"]
        for name, res in rows:
            ratio = "" if res is d else f" ({res['perplexity'] / d['perplexity']:,.2f}x dense)"
            lines.append(f"| {name} | {res['perplexity']:,.2f}{ratio} |")
        lines += ["", format_table(self.report, stage_seconds(self.report), self.report.get("seconds")), ""]
        if r:
            rec = self.report["recovery"]
            fits = rec.get("blockwise")
            fitted = (f"{fits['block_steps']} block-wise steps per block on {fits['cache_windows']} cached windows, "
                      "then ") if fits else ""
            lines += [f"recovery: {fitted}{rec['steps']} end-to-end steps of {rec['config']['batch_size']} x "
                      f"{rec['config']['seqlen']} tokens ({rec['tokens']:,} tokens of {rec['text']} train, teacher: "
                      f"the dense model), structure kept: {'yes' if rec['structure']['kept'] else 'NO'}", ""]
        if self.cost:
            from smartprune.runs.cost import cost_table

            c = self.cost
            final = "compressed + recovered" if r else "compressed"
            rows = [{"method": "dense", "sparsity": "0%", "running": [c["dense"]]},
                    {"method": final, "sparsity": f"{self.report['overall']['compression']:.1%}",
                     "running": c["compressed"]}]
            lines += [f"What it buys, against the dense model (one bench run on this machine, float32, "
                      f"{c['machine'].get('threads', '?')} threads; greedy decoding of {c['new_tokens']} tokens "
                      f"at batch 1, {c['length']}-token prefill; peak RSS of a fresh process that loads the "
                      "model and runs one forward; held as: plain matrices, or the packed form):", "",
                      cost_table(rows, c["length"]), ""]
        times = ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in s.items())
        return "\n".join([*lines, f"time: {times}"])


def run_demo(model: str = "smollm2-135m", recipe: str | Path = "paper", *, quick: bool = False,
             limit: int | None = None, seed: int = 0, seqlen: int = 1024, recover_steps: int | None = None,
             device: str | torch.device = "auto", json_path: str | Path | None = None,
             measure: bool = True, recover_objective: str | None = None, progress: bool = True) -> DemoRun:
    """The main job: perplexity of MODEL before and after compressing it with `recipe`, and after
    retraining the compressed model (distillation from the dense one; ``recover_steps=0`` skips it).

    Default subset: the first 16 windows of 1024 tokens of the WikiText-2 test text. ``quick``
    uses 4 evaluation windows, 8 calibration windows of 64 tokens and a shorter recovery;
    ``recover_objective`` ("end_to_end" or "blockwise") replaces the recovery's objective. With
    ``measure`` the final model's running cost is then measured against the dense one (decoding speed,
    prefill, peak RSS, bytes held; `_running_cost`).
    """
    from smartprune.runs.recover import snapshot_teacher
    from smartprune.training.recover import recover

    check_limit(limit)
    dev = resolve_device(device)
    t0 = time.perf_counter()
    rec, schedule = load_recipe(recipe), ""
    if quick:
        rec, schedule = quick_schedule(with_calibration(rec, samples=8, seqlen=64))
    recovery_cfg = rec.recover or RecoverConfig(**DEMO_RECOVERY["quick" if quick else "full"])
    # Recovery stays end-to-end by default, quick or not: block fits alone won on a structured model
    # (width-40) but lost on `paper` in both time and quality (docs/frontier.md, "The quick demo").
    if recover_steps is not None:
        recovery_cfg = None if recover_steps == 0 else dataclasses.replace(recovery_cfg, steps=recover_steps,
                                                                           tokens=None, minutes=None)
    if recover_objective is not None and recovery_cfg is not None:
        try:
            recovery_cfg = dataclasses.replace(recovery_cfg, objective=recover_objective)
        except ValueError as exc:
            raise RecipeError(f"--recover-objective: {exc}") from None
        if recover_objective == "blockwise" and "depth" in rec.stages:
            raise RecipeError(f"--recover-objective: blockwise pairs each block with the dense model's, and recipe "
                              f"'{rec.name}' removes blocks (stage 'depth'); use end_to_end")
    limit = limit or (4 if quick else 16)
    train_text_path(rec.calibration.text)
    eval_text("wikitext2")  # the data files are checked before the model loads
    if recovery_cfg is not None and recovery_cfg.text in TRAIN_TEXTS:
        train_text_path(recovery_cfg.text)
    loaded = load_model(model)
    check_windows(loaded.model, rec.calibration.seqlen, recovery_cfg, seqlen)
    seconds = {"load": time.perf_counter() - t0}

    def evaluate(name: str) -> dict:
        t = time.perf_counter()
        loaded.model.to(dev)
        result = perplexity(loaded.model, loaded.tokenizer, "wikitext2", seqlen=seqlen, limit=limit,
                            progress=progress).to_dict()
        seconds[f"{name} eval"] = time.perf_counter() - t
        return result

    dense = evaluate("dense")
    loaded.model.to("cpu")
    teacher = snapshot_teacher(loaded.model, recovery_cfg)
    t = time.perf_counter()
    result = compress(loaded.model, loaded.tokenizer, rec, seed=seed, progress=progress, device=dev)
    seconds["compress"] = time.perf_counter() - t
    after = evaluate("compressed")
    report = {**result.report, "environment": environment()}
    recovered = None
    if recovery_cfg is not None:
        t = time.perf_counter()
        report["recovery"] = recover(loaded.model, loaded.tokenizer, recovery_cfg, teacher=teacher, device=dev,
                                     seed=seed, progress=progress)
        seconds["recover"] = time.perf_counter() - t
        recovered = evaluate("recovered")
    cost = None
    if measure:
        t = time.perf_counter()
        cost = _running_cost(model, loaded, quick, progress)
        seconds["measure"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    run = DemoRun(model, rec.name, dense, after, report, recovered, seconds, cost, schedule)
    if json_path:
        write_json(Path(json_path), run.to_dict())
    return run


def _running_cost(model: str, loaded, quick: bool, progress: bool) -> dict:
    """The final model written to a temporary compressed folder and measured against MODEL in one
    bench run (`smartprune.runs.cost`): a short one, sized for the demo's time, of the model held the way
    it would be deployed (packed when it has pruned entries); `compare --measure` and `bench` give the rest."""
    import tempfile

    from smartprune.runs.cost import keep, measure

    length, new_tokens = 128, (16 if quick else 64)
    masked = any(getattr(m, "mask", None) is not None for m in loaded.model.modules())
    held = ("compact",) if masked else ("dense",)
    with tempfile.TemporaryDirectory(prefix="smartprune-demo-") as tmp:
        spec = keep(loaded.model.to("cpu"), loaded.tokenizer, Path(tmp) / "model")
        entries, machine = measure([model, spec], ("speed", "memory"), repeats=1, length=length,
                                   new_tokens=new_tokens, device="cpu", residencies=held, progress=progress)
    return {"dense": entries[0][0], "compressed": entries[1], "machine": machine, "length": length,
            "new_tokens": new_tokens}
