"""Recipe dataclasses and their validation.

A recipe is a mapping of stages (the keys of the method registry, `smartprune.methods.METHODS`, each
validated into its method's own config class) plus ``strategy`` and ``calibration`` and the optional
sections defined here; each is a mapping of that dataclass's fields. Field metadata carries the allowed
choices or numeric range, so one validator checks every section and names the offending key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from smartprune.errors import RecipeError, did_you_mean
from smartprune.methods import METHODS, STRUCTURED
from smartprune.methods.config import FitConfig, StrategyConfig, option
from smartprune.methods.criteria import needing, offered
from smartprune.recipes.sections import RECOVERY_BUDGETS, RecoverConfig  # noqa: F401  (the schema's sections)


@dataclass(frozen=True)
class CalibrationConfig:
    """Calibration windows: seeded random windows of a training text."""

    text: str = option("wikitext2", "training text: wikitext2 | ptb", choices=("wikitext2", "ptb"))
    samples: int = option(32, "number of calibration windows", lo=1, hi=1_000_000)
    seqlen: int = option(128, "tokens per calibration window", lo=2, hi=1_000_000)
    eval_samples: int = option(4, "held-out windows for the perplexity metric of the recursive strategy",
                               lo=1, hi=1_000_000)


# What an `overall` section leaves unset, by how units are measured (docs/smart-results.md sections 8-11):
# joint: each unit moved JOINT_POINTS step(s) each side of the mean, within JOINT_SPREAD of it;
# the single-unit measurements: a grid of GRID_POINTS rates up to max_rate, unbounded.
JOINT_POINTS, JOINT_SPREAD, GRID_POINTS = 2, 0.2, 4


@dataclass(frozen=True)
class OverallConfig:
    """Allocation instead of fixed rates: the overall compression to reach exactly, shared out over the
    embedding and every block's Q/K, V, O and feed-forward matrices by measured sensitivity (the rates
    of fpp_emb and of the pruning stage are then per matrix; smartprune/compression/allocation.py)."""

    target: float = option(0.5, "fraction of all the model's parameters removed (exactly)", lo=0.0, hi=0.99)
    max_rate: float = option(0.9, "highest rate any matrix may reach (the sensitivity grid's top)", lo=0.01, hi=1.0)
    points: int | None = option(None, f"rates measured per unit: joint: mean +- spread * k / points, k = 1..points "
                                f"each side (default {JOINT_POINTS}); wanda, stage: max_rate * k / points, k = "
                                f"1..points (default {GRID_POINTS})", lo=1, hi=100)
    emb_criterion: str = option("frequency", "how the embedding is scored while measuring: magnitude | frequency",
                                choices=offered("embedding"))
    sensitivity: str = option("joint", "how a block unit is measured: joint (the default: every unit pruned by the "
                              "recipe's stage at the mean rate, each one moved within +-spread of it, the divergence "
                              "from the dense model) | wanda (each unit alone, |W| * ||X||, no weight update) | stage "
                              "(each unit alone, by the recipe's own pruning stage)",
                              choices=("joint", "wanda", "stage"))
    spread: float | None = option(None, "bound every unit's rate to within this of the mean rate the allocatable "
                                  f"matrices need (OWL's lambda); default {JOINT_SPREAD} under joint, unbounded "
                                  "otherwise", lo=0.0, hi=1.0)
    structure: str = option("zeroed", "structured stages: how each (blocks, heads, width) candidate is scored: "
                            "zeroed (the removed inputs zeroed) | compensated (where the stage compensates, the "
                            "removed inputs replaced by their least-squares prediction, as its re-fit does)",
                            choices=("zeroed", "compensated"))

    def __post_init__(self) -> None:  # the unset fields take their measurement's default
        joint = self.sensitivity == "joint"
        if self.points is None:
            object.__setattr__(self, "points", JOINT_POINTS if joint else GRID_POINTS)
        if self.spread is None and joint:
            object.__setattr__(self, "spread", JOINT_SPREAD)

    def grid(self) -> tuple[float, ...]:
        return tuple(self.max_rate * k / self.points for k in range(1, self.points + 1))


@dataclass(frozen=True)
class HeadConfig:
    """The output head (`smartprune.modules.head`): ``untie`` keeps it dense while FPP prunes the input table;
    ``low-rank`` replaces it, after the stages, by a rank-`rank` factorization fitted to the model's
    final hidden states on the calibration windows (cheaper per token)."""

    kind: str = option("low-rank", "untie | low-rank", choices=("untie", "low-rank"))
    rank: int = option(128, "low-rank: the head's rank (below the hidden size)", lo=1, hi=1_000_000)


# Stage key -> config class, from the method registry. The order is the order stages run within their scope.
STAGE_TYPES: dict[str, type[FitConfig]] = {key: spec.config for key, spec in METHODS.items()}
SECTION_TYPES: dict[str, type] = {"strategy": StrategyConfig, "calibration": CalibrationConfig}
PRUNING_STAGES = tuple(key for key, spec in METHODS.items() if spec.baseline)
EXPORTS = ("any", "standard")
# Sections that are absent (None) unless the recipe names them.
OPTIONAL_SECTIONS: dict[str, type] = {"recover": RecoverConfig, "overall": OverallConfig, "head": HeadConfig}


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: the stages to run, in order, and how."""

    name: str
    stages: dict[str, FitConfig]
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    recover: RecoverConfig | None = None  # retraining after the compression stages
    overall: OverallConfig | None = None  # allocation of per-matrix rates by measured sensitivity
    head: HeadConfig | None = None  # an untied or low-rank output head
    description: str = ""
    export: str = "any"  # "standard": the result must be a smaller standard architecture (checked here)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: dataclasses.asdict(v) for k, v in self.stages.items()}
        if self.export != "any":
            out["export"] = self.export
        out["strategy"] = dataclasses.asdict(self.strategy)
        out["calibration"] = dataclasses.asdict(self.calibration)
        for key in OPTIONAL_SECTIONS:
            if getattr(self, key) is not None:
                out[key] = dataclasses.asdict(getattr(self, key))
        return out

    def replace(self, **sections: Any) -> Recipe:
        """A copy with some sections (strategy, calibration) or stages overridden."""
        stages = dict(self.stages)
        kw: dict[str, Any] = {}
        for key, value in sections.items():
            if key in STAGE_TYPES:
                stages[key] = value
            else:
                kw[key] = value
        return dataclasses.replace(self, stages=stages, **kw)


def _check_value(where: str, f: dataclasses.Field, value: Any, hint: Any) -> Any:
    """Coerce and range-check one field value; raise RecipeError naming `where`."""
    optional = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint
    if value is None:
        if optional:
            return None
        raise RecipeError(f"{where}: a value is required")
    if base is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true or false, got {value!r}")
        return value
    if base in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):  # NaN passes every range comparison
            raise RecipeError(f"{where}: expected a finite number, got {value!r}")
        if base is int and float(value) != int(value):
            raise RecipeError(f"{where}: expected a whole number, got {value!r}")
        value = base(value)
        lo, hi = f.metadata.get("lo"), f.metadata.get("hi")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise RecipeError(f"{where}: {value} is outside [{lo:g}, {hi:g}]")
        return value
    if dataclasses.is_dataclass(base):  # a nested section, e.g. sparsegpt.owl
        return build_section(base, value, where)
    if base is str:
        choices = f.metadata.get("choices")
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected text, got {value!r}")
        if choices and value not in choices:
            raise RecipeError(f"{where}: {value!r} is not one of {', '.join(choices)}{did_you_mean(value, choices)}")
        return value
    raise TypeError(f"unsupported field type {hint!r}")  # a schema bug, not user input


def build_section(cls: type, data: Any, where: str) -> Any:
    """Validate a mapping into dataclass `cls`; unknown keys and bad values name `where.key`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping of fields, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    fields |= {f.metadata["alias"]: f for f in fields.values() if f.metadata.get("alias")}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise RecipeError(f"{where}: unknown key '{key}'{did_you_mean(str(key), fields)}")
        f = fields[key]
        kwargs[f.name] = _check_value(f"{where}.{key}", f, value, hints[f.name])
    try:
        return cls(**kwargs)
    except ValueError as exc:  # cross-field checks in __post_init__ name their field first
        raise RecipeError(f"{where}.{exc}") from None


def build_recipe(data: Any, name: str, source: str) -> Recipe:
    """Validate a parsed recipe document (from YAML or JSON) into a Recipe."""
    if not isinstance(data, dict) or not data:
        raise RecipeError(f"recipe {source}: expected a mapping of stages such as 'irc: {{rate: 1.0}}'")
    data = dict(data)
    description = data.pop("description", "")
    if not isinstance(description, str):
        raise RecipeError(f"recipe {source}: description must be text")
    export = data.pop("export", "any")
    if export not in EXPORTS:
        raise RecipeError(f"recipe {source}: export: {export!r} is not one of {', '.join(EXPORTS)}")
    known = [*STAGE_TYPES, *SECTION_TYPES, *OPTIONAL_SECTIONS, "description", "export"]
    for key in data:
        if key not in known:
            raise RecipeError(f"recipe {source}: unknown key '{key}'{did_you_mean(str(key), known)}")
    stages = {k: build_section(cls, data[k], f"recipe {source}: {k}") for k, cls in STAGE_TYPES.items() if k in data}
    if not stages:
        raise RecipeError(f"recipe {source}: no stage given (expected one of {', '.join(STAGE_TYPES)})")
    sections = {k: build_section(cls, data.get(k), f"recipe {source}: {k}") for k, cls in SECTION_TYPES.items()}
    sections.update({k: build_section(cls, data[k], f"recipe {source}: {k}") for k, cls in OPTIONAL_SECTIONS.items()
                     if k in data})
    _check_fpp(stages, source)
    _check_structured(stages, source)
    _check_overall(stages, sections.get("overall"), source)
    recipe = Recipe(name=name, stages=stages, description=description, export=export, **sections)
    if export == "standard":
        why = not_standard(recipe)
        if why:
            raise RecipeError(f"recipe {source}: export: standard: {why}")
    return recipe


def not_standard(recipe: Recipe) -> str | None:
    """Why `recipe`'s result is not a smaller standard architecture (one line naming the stage), or None."""
    for key in recipe.stages:
        if key not in STRUCTURED:
            left = "a folded or diagonal structure" if key in ("irc", "dwc") else "unstructured sparsity"
            if getattr(recipe.stages[key], "structure", "weight") == "neuron":
                left = "per-block widths through FPP's schedule (use ff_neurons)"
            return f"stage '{key}' leaves {left}, which a standard config cannot express (structured stages: " \
                   f"{', '.join(STRUCTURED)})"
    if recipe.head is not None:
        return f"the head section ({recipe.head.kind}) is not part of a standard config"
    return None


def _check_structured(stages: dict[str, FitConfig], source: str) -> None:
    """Structured stages replace the paper's on the same matrices; they do not stack with them."""
    for structured, other in (("attn_heads", "irc"), ("attn_heads", "dwc"), ("ff_neurons", "fpp_ff")):
        if structured in stages and other in stages:
            raise RecipeError(f"recipe {source}: {structured} and {other} both reshape the same matrices; use one")


def _check_fpp(stages: dict[str, FitConfig], source: str) -> None:
    """Criteria and structures that only make sense for one kind of matrix."""
    emb, ff = stages.get("fpp_emb"), stages.get("fpp_ff")
    if emb is not None and emb.structure != "weight":
        raise RecipeError(f"recipe {source}: fpp_emb.structure: an embedding has no neurons; 'neuron' applies to "
                          "fpp_ff only")
    if emb is not None and emb.criterion in needing("input activations"):
        raise RecipeError(f"recipe {source}: fpp_emb.criterion: '{emb.criterion}' needs a layer's input "
                          "activations and an embedding only looks rows up; use magnitude, literal or frequency")
    if ff is not None and ff.criterion == "frequency":
        raise RecipeError(f"recipe {source}: fpp_ff.criterion: 'frequency' counts embedding lookups; use "
                          "magnitude, literal, wanda or obs")
    if ff is not None and ff.structure == "neuron" and ff.criterion not in ("magnitude", "literal"):
        raise RecipeError(f"recipe {source}: fpp_ff.criterion: whole neurons are ranked by their weights; use "
                          "magnitude or literal with structure 'neuron'")


def _check_overall(stages: dict[str, FitConfig], overall: OverallConfig | None, source: str) -> None:
    """Allocation gives rates to fpp_emb and to one pruning stage on the block linears, nothing else."""
    if overall is None:
        return
    if any(k in STRUCTURED for k in stages):
        others = [k for k in stages if k not in STRUCTURED]
        if others:
            raise RecipeError(f"recipe {source}: overall: an allocation over structured stages "
                              f"({', '.join(STRUCTURED)}) cannot mix in {', '.join(others)}")
        if getattr(stages.get("attn_heads"), "unit", "query") != "query":
            raise RecipeError(f"recipe {source}: overall: the allocation removes query heads per group; set "
                              "attn_heads.unit: query")
        return
    others = [k for k in stages if k not in ("fpp_emb", *PRUNING_STAGES)]
    if others:
        raise RecipeError(f"recipe {source}: overall: the allocation sets the rates of fpp_emb and of a pruning "
                          f"stage ({', '.join(PRUNING_STAGES)}); remove {', '.join(others)}")
    if sum(k in PRUNING_STAGES for k in stages) > 1:
        raise RecipeError(f"recipe {source}: overall: one pruning stage at most")
    if overall.sensitivity == "joint" and not overall.spread:
        raise RecipeError(f"recipe {source}: overall: sensitivity 'joint' measures each unit within +-spread of the "
                          f"mean rate; spread 0 leaves it nothing to measure (default {JOINT_SPREAD})")
    if any(getattr(stages.get(k), "owl", None) is not None for k in PRUNING_STAGES):
        raise RecipeError(f"recipe {source}: overall: the allocation and OWL both set the block sparsities; "
                          "keep one")
    if getattr(stages.get("magnitude"), "scope", "matrix") == "global" or any(
            getattr(stages.get(k), "nm", None) for k in (*PRUNING_STAGES, "fpp_emb")):
        raise RecipeError(f"recipe {source}: overall: per-matrix rates exclude magnitude scope 'global' and N:M "
                          "patterns")


def field_docs(cls: type) -> list[tuple[str, Any, str]]:
    """(name, default, doc) of each field, for `smartprune recipes --fields`."""
    return [(f.name, f.default, f.metadata.get("doc", "")) for f in dataclasses.fields(cls)]
