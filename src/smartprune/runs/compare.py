"""``smartprune compare``: the paper's method and the peer baselines on one model, one calibration set,
one seed, one evaluation protocol, in one table.

Methods: ``dense``; a baseline (``magnitude``, ``magnitude-global``, ``wanda``, ``sparsegpt``), run at
each requested sparsity; or a recipe (``paper``, a YAML file, ...), run once as written. Sparsities:
a fraction (``0.5``: unstructured, every linear of every block), an N:M pattern (``2:4``), or
``match:RECIPE``: the fraction of the block linears that removes as many parameters as RECIPE does,
so the methods are compared at equal size.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from smartprune.adapters import get_adapter
from smartprune.compression.accounting import block_linear_weights
from smartprune.compression.engine import compress
from smartprune.data import Calibration, calibration, check_positions, eval_text, tokenize, train_text_path
from smartprune.device import resolve_compute_dtype, resolve_device
from smartprune.errors import RecipeError, did_you_mean
from smartprune.evaluation.perplexity import check_limit, perplexity_of_ids
from smartprune.methods import METHODS
from smartprune.methods.config import parse_pattern
from smartprune.recipes import Recipe, load_recipe
from smartprune.recipes.schema import RECOVERY_BUDGETS, RecoverConfig, build_recipe
from smartprune.storage.sources import load_model
from smartprune.training.recover import recover

log = logging.getLogger(__name__)

# the peers, run at each --sparsity: the pruning stages uniform, magnitude over all block linears at once, and
# SparseGPT and Wanda with OWL's non-uniform block sparsities (m 5, lambda 0.08)
BASELINES = {k: {} for k, spec in METHODS.items() if spec.baseline} | {"magnitude-global": {"scope": "global"},
                                                                       "owl-sparsegpt": {"owl": {}},
                                                                       "owl-wanda": {"owl": {}}}


def _baseline_key(name: str) -> str:
    return "magnitude" if name == "magnitude-global" else name.removeprefix("owl-")


def parse_sparsity(token: str) -> tuple[str, float | None, str | None]:
    """``"0.5"`` -> ("0.5", 0.5, None); ``"2:4"`` -> ("2:4", None, "2:4");
    ``"match:paper"`` -> ("match:paper", None, None) (resolved once the recipe has run)."""
    if token.startswith("match:"):
        return token, None, None
    if ":" in token:
        try:
            parse_pattern(token)
        except ValueError:
            raise RecipeError(f"--sparsity: {token!r} is not a fraction, an N:M pattern or match:RECIPE") from None
        return token, None, token
    try:
        value = float(token)
    except ValueError:
        raise RecipeError(f"--sparsity: {token!r} is not a fraction, an N:M pattern or match:RECIPE") from None
    if not 0.0 <= value <= 1.0:
        raise RecipeError(f"--sparsity: {value} is outside [0, 1]")
    return token, value, None


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 20 ms)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096
        except OSError:
            return 0

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakRSS:
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


@dataclass
class CompareSettings:
    model: str
    methods: list[str]
    sparsities: list[str] = field(default_factory=lambda: ["0.5"])
    tasks: list[str] = field(default_factory=lambda: ["wikitext2", "ptb"])
    limit: int | None = None
    seqlen: int = 1024
    calib_samples: int = 32
    calib_seqlen: int = 128
    seed: int = 0
    recover_tokens: int | None = None  # equal recovery for every row (and a dense fine-tuned row)
    recover_budget: str | None = None  # or a named budget (`RECOVERY_BUDGETS`: the demo's quick / full)
    device: str | torch.device = "auto"
    compute_dtype: str = "auto"  # compression and recovery forwards (evaluation stays float32)
    measure: tuple[str, ...] = ()  # running cost of every row's final model: "speed", "memory" (`runs.cost`)
    keep: Path | None = None  # where the measured models are written (None: a temporary folder, removed after)
    measure_repeats: int = 3  # bench rounds
    measure_length: int = 512  # prefill and batch-8 throughput length
    measure_new_tokens: int = 128  # greedy decoding length

    def key(self) -> dict:
        """What must match for rows of an interrupted run to be reused (`resume_file`)."""
        keys = ("model", "methods", "sparsities", "tasks", "limit", "seqlen", "calib_samples", "calib_seqlen", "seed",
                "recover_tokens", "recover_budget", "compute_dtype")
        return {k: getattr(self, k) for k in keys}


def resume_file(json_path: Path) -> Path:
    """Where `compare --json FILE` keeps its rows as they finish: ``.FILE.partial`` beside FILE, removed once
    FILE is written; the same command after an interruption reuses them."""
    return json_path.with_name(f".{json_path.name}.partial")


@dataclass
class Comparison:
    settings: dict
    rows: list[dict]

    def to_dict(self) -> dict:
        return {"settings": self.settings, "rows": self.rows}

    def table(self) -> str:
        from smartprune.runs.cost import cost_table

        running = cost_table(self.rows, self.settings.get("measure_length", 512))
        quality = self.quality_table()
        if not running:
            return quality
        return (f"{quality}\n\nRunning cost of each final model (float32 weights and compute; ratio to dense from "
                f"the same run; a compressed model held as plain dense matrices and as its packed form):\n\n{running}")

    def quality_table(self) -> str:
        tasks = self.settings["tasks"]
        recovered = any("recovered" in r for r in self.rows)
        extra = [f"{t} ppl recovered" for t in tasks] if recovered else []
        head = " | ".join([*(f"{t} ppl" for t in tasks), *extra])
        lines = [f"| method | sparsity | compression | {head} | compress s | peak RSS GiB |",
                 "|---|---|---:|" + "---:|" * (len(tasks) + len(extra)) + "---:|---:|"]
        for r in self.rows:
            cells = [f"{r['perplexity'][t]:,.2f}" for t in tasks]
            if recovered:
                cells += [f"{r['recovered']['perplexity'][t]:,.2f}" if "recovered" in r else "" for t in tasks]
            lines.append(f"| {r['method']} | {r['sparsity']} | {100 * r['compression']:.2f}% | {' | '.join(cells)} | "
                         f"{r['seconds']:.1f} | {r['peak_rss_bytes'] / 2**30:.2f} |")
        if recovered:
            tokens = next(r["recovered"]["tokens"] for r in self.rows if "recovered" in r)
            lines += ["", f"recovered: every model retrained with the same budget ({tokens:,} tokens of WikiText-2 "
                      "train, distillation from the dense model); 'dense fine-tuned' is the "
                      "dense model retrained the same way: a compressed model that beats the untouched dense model "
                      "may only be beating it because it trained on the task's text"]
        return "\n".join(lines)

    def summary(self) -> str:
        s = self.settings
        limit = f"first {s['limit']} windows" if s["limit"] else "full test sets"
        return (f"{s['model']}: perplexity ({limit}, seqlen {s['seqlen']}), calibration {s['calib_samples']} x "
                f"{s['calib_seqlen']} tokens, seed {s['seed']}\n\n{self.table()}")


def _resolve_methods(names: list[str]) -> list[tuple[str, Recipe | None]]:
    """(name, recipe) per method; recipe None for dense and the baselines."""
    out = []
    for name in names:
        if name == "dense" or name in BASELINES:
            out.append((name, None))
            continue
        try:
            out.append((name, load_recipe(name)))
        except RecipeError:
            known = ["dense", *BASELINES]
            raise RecipeError(f"--methods: unknown method '{name}'{did_you_mean(name, known)}; baselines: "
                              f"{', '.join(known)}, or a recipe name or file") from None
    return out


def _removed(report: dict) -> int:
    """Parameters a compression run removed."""
    return report["overall"]["params_before"] - report["overall"]["params_after"]


def _baseline_recipe(name: str, fraction: float | None, pattern: str | None) -> Recipe:
    fields = dict(BASELINES[name])
    fields.update({"pattern": pattern} if pattern else {"sparsity": fraction})
    return build_recipe({_baseline_key(name): fields}, f"{name}", "compare")


def run_compare(settings: CompareSettings, *, progress: bool = True, partial: Path | None = None) -> Comparison:
    """Run every method on the same model, calibration windows and evaluation windows; with
    ``settings.measure``, then measure every row's final model's running cost in one bench run.
    With `partial` (not with ``measure``: its models would be gone), each method's rows are written there
    as they finish, and the methods already there (same `CompareSettings.key`) are not run again."""
    from smartprune.runs.cost import check_measures

    check_measures(settings.measure)  # an unknown word fails before any work
    if settings.measure_repeats < 1:
        raise RecipeError(f"measure_repeats must be at least 1, not {settings.measure_repeats}")
    if settings.measure:
        with _measured_models(settings.keep) as folder:
            result = _run_compare(settings, folder, progress, None)
            _measure_rows(result, settings, progress)
        if settings.keep is None:  # the temporary folders are gone: name none of them
            for row in result.rows:
                row.pop("folder", None)
        return result
    return _run_compare(settings, None, progress, partial)


def _saved_units(partial: Path | None, settings: CompareSettings) -> dict:
    """The finished methods of an interrupted run with the same settings: ``{"units": {key: rows},
    "removed_by": {recipe: parameters removed}}``."""
    from smartprune.errors import DataError
    from smartprune.files import read_json

    if partial is None or not partial.is_file():
        return {"units": {}, "removed_by": {}}
    data = read_json(partial, "interrupted compare (rows so far)", DataError)
    if data.get("settings_key") != settings.key():
        raise DataError(f"{partial} holds the rows of an interrupted compare with other settings; run that command "
                        "again to finish it, or delete the file")
    log.info("resuming: %d method(s) already done in %s", len(data.get("units", {})), partial)
    return {"units": data.get("units", {}), "removed_by": data.get("removed_by", {})}


@contextlib.contextmanager
def _measured_models(keep: Path | None):
    """The folder the measured models are written to: `keep` (checked first), or a temporary one."""
    from smartprune.files import check_output

    if keep is not None:
        check_output(Path(keep), False)
        Path(keep).mkdir(parents=True, exist_ok=True)
        yield Path(keep)
        return
    with tempfile.TemporaryDirectory(prefix="smartprune-compare-") as tmp:
        yield Path(tmp)


def _measure_rows(result: Comparison, settings: CompareSettings, progress: bool) -> None:
    from smartprune.runs.cost import measure

    dense = next((r for r in result.rows if r["method"] == "dense"), None)  # the reference, measured first
    rows = [dense, *(r for r in result.rows if "folder" in r)]
    specs = [settings.model, *(r["folder"] for r in rows[1:])]
    entries, machine = measure(specs, settings.measure, repeats=settings.measure_repeats,
                               length=settings.measure_length, new_tokens=settings.measure_new_tokens,
                               device=settings.device, progress=progress)
    for row, per in zip(rows, entries, strict=True):
        if row is not None:
            row["running"] = per
    result.settings["machine"] = machine


def _run_compare(settings: CompareSettings, keep_dir: Path | None, progress: bool,
                 partial: Path | None) -> Comparison:
    c = _Comparer(settings, keep_dir, progress, partial)
    order = [m for m in c.methods if m[1] is not None] + [m for m in c.methods if m[1] is None]
    for name, recipe in order:  # recipes first: their budgets define the match:RECIPE sparsities
        if recipe is not None:
            c.unit(f"recipe {name}", lambda name=name, recipe=recipe: c.recipe_row(name, recipe))
        elif name == "dense":
            c.unit("dense", c.dense)
        else:
            for label, fraction, pattern in c.sparsities:
                c.unit(f"{name} {label}", lambda name=name, label=label, fraction=fraction, pattern=pattern:
                       c.baseline_row(name, label, fraction, pattern))
    return Comparison({**settings.__dict__}, c.rows)


class _Comparer:
    """One comparison's shared state (the model, its windows, the rows so far) and the steps that use it."""

    def __init__(self, settings: CompareSettings, keep_dir: Path | None, progress: bool,
                 partial: Path | None) -> None:
        self.settings, self.keep_dir, self.progress, self.partial = settings, keep_dir, progress, partial
        self.methods = _resolve_methods(settings.methods)
        self.sparsities = [parse_sparsity(t) for t in settings.sparsities]
        # match:RECIPE names a recipe that must exist before any work
        matched = [load_recipe(label[6:]) for label, _, _ in self.sparsities if label.startswith("match:")]
        check_limit(settings.limit)
        self.dev = resolve_device(settings.device)
        resolve_compute_dtype(settings.compute_dtype, self.dev)  # an unknown name fails before any model work
        self.recover_cfg = _recover_config(settings)
        recipes = [r for _, r in self.methods if r is not None] + matched
        for text in {"wikitext2"} | {r.calibration.text for r in recipes}:  # the baselines calibrate on wikitext2
            train_text_path(text)
        texts = {t: eval_text(t) for t in settings.tasks}  # missing data fails before any model work
        self.saved = _saved_units(partial, settings)  # an interrupted run's rows: refused (other settings) first
        self.loaded = load_model(settings.model)
        check_positions(self.loaded.model, settings.seqlen, "--seqlen")
        check_positions(self.loaded.model, settings.calib_seqlen, "--calib-seqlen")
        if settings.measure:  # the running-cost measurement's longest sequence, before any compression
            from smartprune.runs.cost import longest

            check_positions(self.loaded.model, longest(settings.measure_length, settings.measure_new_tokens),
                            "--measure")
        self.tok = self.loaded.tokenizer
        self.eval_ids = {t: tokenize(self.tok, text) for t, text in texts.items()}
        self.calibs: dict[tuple[str, int], Calibration] = {}  # by (text, held-out windows), `calibration`
        self.removed_by: dict[str, int] = dict(self.saved["removed_by"])
        self.rows: list[dict] = []

    def scores(self, model) -> dict[str, float]:
        model.to(self.dev)
        return {t: perplexity_of_ids(model, ids, self.settings.seqlen, limit=self.settings.limit, task=t,
                                     progress=self.progress).perplexity for t, ids in self.eval_ids.items()}

    def evaluate(self, model, method: str, sparsity: str, cost: tuple[float, float, int], retrain: bool = True) -> None:
        """A row for `model`: its perplexity (and after equal retraining); `cost`: compression, seconds, peak RSS."""
        compression, seconds, peak = cost
        ppl = self.scores(model)
        row = {"method": method, "sparsity": sparsity, "compression": compression, "perplexity": ppl,
               "seconds": seconds, "peak_rss_bytes": peak}
        log.info("%s %s: %s", method, sparsity, ", ".join(f"{t} {v:.2f}" for t, v in ppl.items()))
        if self.recover_cfg is not None and retrain:
            rec = recover(model, self.tok, self.recover_cfg, teacher=self.loaded.model, device=self.dev,
                          seed=self.settings.seed, progress=self.progress)
            row["recovered"] = {"perplexity": self.scores(model), "tokens": rec["tokens"], "steps": rec["steps"],
                                "seconds": rec["seconds"], "structure_kept": rec["structure"]["kept"]}
            log.info("%s %s recovered: %s", method, sparsity,
                     ", ".join(f"{t} {v:.2f}" for t, v in row["recovered"]["perplexity"].items()))
        if self.keep_dir is not None and method != "dense":  # the final model, for the running-cost measurement
            from smartprune.runs.cost import folder_name, keep

            row["folder"] = keep(model, self.tok, self.keep_dir / folder_name(len(self.rows), method, sparsity))
        self.rows.append(row)

    def calibration(self, recipe: Recipe) -> Calibration:
        """The recipe's calibration text and held-out windows (its own measurement's; an allocation's), the
        window count and length of the comparison: the baselines' windows wherever the recipe's text is theirs."""
        key = (recipe.calibration.text, recipe.calibration.eval_samples)
        if key not in self.calibs:
            self.calibs[key] = calibration(self.tok, key[0], self.settings.calib_samples, self.settings.calib_seqlen,
                                           key[1], self.settings.seed)
        return self.calibs[key]

    def run(self, method: str, label: str, recipe: Recipe) -> dict:
        fresh = load_model(self.settings.model).model
        calib = self.calibration(recipe)  # tokenized once per text, outside the compression's time
        with PeakRSS() as mem:
            t = time.perf_counter()
            report = compress(fresh, self.tok, recipe, seed=self.settings.seed, calib=calib,
                              progress=self.progress, device=self.dev,
                              compute_dtype=self.settings.compute_dtype).report
            seconds = time.perf_counter() - t
        self.evaluate(fresh, method, label, (report["overall"]["compression"], seconds, mem.peak))
        self.rows[-1]["calibration"] = report["calibration"]  # the windows it was compressed with
        if "allocation" in report:  # the rates a recipe with an overall section chose
            self.rows[-1]["allocation"] = report["allocation"]
        return report

    def unit(self, key: str, work) -> None:
        """One method (at one sparsity): its rows from an interrupted run, or run now and saved."""
        if key in self.saved["units"]:
            self.rows.extend(self.saved["units"][key])
            return
        start = len(self.rows)
        work()
        self.saved["units"][key] = self.rows[start:]
        if self.partial is not None:
            from smartprune.files import write_json

            write_json(self.partial, {"settings_key": self.settings.key(), "units": self.saved["units"],
                                      "removed_by": self.removed_by})

    def dense(self) -> None:
        self.evaluate(self.loaded.model, "dense", "0", (0.0, 0.0, PeakRSS._rss()), retrain=False)
        if self.recover_cfg is not None:  # the reference for equal retraining: the dense model retrained too
            self.evaluate(copy.deepcopy(self.loaded.model), "dense fine-tuned", "0", (0.0, 0.0, PeakRSS._rss()))

    def recipe_row(self, name: str, recipe: Recipe) -> None:
        self.removed_by[name] = _removed(self.run(name, "recipe", recipe))

    def baseline_row(self, name: str, label: str, fraction: float | None, pattern: str | None) -> None:
        if label.startswith("match:"):
            fraction = _matched_fraction(label[6:], self.removed_by, self.loaded.model, self.settings,
                                         self.calibration)
            label = f"{label} ({fraction:.4f})"
        self.run(name, label, _baseline_recipe(name, fraction, pattern))


def _recover_config(settings: CompareSettings) -> RecoverConfig | None:
    """Every row's recovery: a token budget, or a named one (the demo's), or none."""
    if settings.recover_tokens is not None and settings.recover_budget is not None:
        raise RecipeError("--recover-tokens and --recover-budget both set the recovery budget: give one")
    if settings.recover_budget is not None:
        if settings.recover_budget not in RECOVERY_BUDGETS:
            raise RecipeError(f"--recover-budget: unknown budget '{settings.recover_budget}'"
                              f"{did_you_mean(settings.recover_budget, list(RECOVERY_BUDGETS))}; known: "
                              f"{', '.join(RECOVERY_BUDGETS)}")
        return RecoverConfig(**RECOVERY_BUDGETS[settings.recover_budget], compute_dtype=settings.compute_dtype)
    if settings.recover_tokens is None:
        return None
    return RecoverConfig(tokens=settings.recover_tokens, seqlen=min(256, settings.seqlen),
                         compute_dtype=settings.compute_dtype)


def _matched_fraction(recipe_name: str, removed_by: dict[str, int], model, settings: CompareSettings,
                      calib: Callable[[Recipe], Calibration]) -> float:
    """The block-linear sparsity that removes as many parameters as `recipe_name` did (`calib`: the windows
    a recipe is compressed with)."""
    if recipe_name not in removed_by:  # not among --methods: run it now (it is not reported)
        fresh = load_model(settings.model).model
        recipe = load_recipe(recipe_name)
        removed_by[recipe_name] = _removed(
            compress(fresh, None, recipe, seed=settings.seed, calib=calib(recipe),
                     device=settings.device, compute_dtype=settings.compute_dtype).report)
    total = block_linear_weights(get_adapter(model))
    fraction = removed_by[recipe_name] / total
    if fraction > 1:
        raise RecipeError(f"match:{recipe_name} removes {removed_by[recipe_name]:,} parameters, more than all "
                          f"{total:,} block-linear weights")
    return fraction


REPORTED = """## Reported in the paper (not measured here)

Belhaouari & Kraidia (2025), Table 5: perplexity of GPT-2 small (124M) models "initialized and
trained on the datasets", so not the pretrained checkpoint measured above, and a different model.
These numbers are copied from the paper for context only.

| approach (as reported) | WikiText-2 | WikiText-103 | PTB |
|---|---:|---:|---:|
| GPT-2 (dense) | 35.57 | 20.2 | 37.2 |
| SparseGPT | 37.5 | 22.3 | 40.6 |
| smart pruning, 70% ("our approach") | 14.6 | 12.7 | 14.7 |

Published dense GPT-2 small WikiText-2 perplexity at 1024 tokens is about 29-30; a model compressed
to 70% scoring far below its dense parent would be unusual, which is why every number in the table
above is measured on one model under one protocol.
"""


def write_outputs(result: Comparison, json_path: Path, md_path: Path | None = None) -> None:
    from smartprune.files import write_json, write_text

    write_json(json_path, result.to_dict())
    write_text(md_path or json_path.with_suffix(".md"), f"# smartprune compare\n\n{result.summary()}\n\n{REPORTED}")
    resume_file(json_path).unlink(missing_ok=True)  # the rows are all in json_path now


__all__ = ["BASELINES", "CompareSettings", "Comparison", "parse_sparsity", "resume_file", "run_compare",
           "write_outputs"]
