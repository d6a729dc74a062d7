"""Recipe dataclasses and their validation.

A recipe is a mapping of stages (``fpp_emb``, ``irc``, ``dwc``, ``fpp_ff``) plus ``strategy`` and
``calibration``; each is a mapping of that dataclass's fields. Field metadata carries the allowed
choices or numeric range, so one validator checks every section and names the offending key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from smartprune.errors import RecipeError, did_you_mean


def _opt(default: Any, doc: str, *, choices: tuple[str, ...] | None = None,
         lo: float | None = None, hi: float | None = None) -> Any:
    """A dataclass field with validation metadata (choices or closed range [lo, hi])."""
    return field(default=default, metadata={"doc": doc, "choices": choices, "lo": lo, "hi": hi})


@dataclass(frozen=True)
class FitConfig:
    """How a stage re-optimizes the weights it compressed (shared by every paper method)."""

    steps: int = _opt(5, "Adam steps after each compression increment (0 = direct compression)", lo=0, hi=100_000)
    lr: float = _opt(5e-5, "Adam learning rate (Table 2: 5e-5)", lo=0.0, hi=1.0)
    batch_size: int = _opt(8, "calibration sequences per Adam step", lo=1, hi=100_000)
    cumulative: str = _opt("window", "cumulative loss: window | value | off (METHOD.md)",
                           choices=("window", "value", "off"))
    window: int = _opt(1, "previous batches summed into the loss when cumulative=window", lo=1, hi=64)
    objective: str = _opt("local", "local (fit the dense sublayer output) | task (the model's own loss)",
                          choices=("local", "task"))


@dataclass(frozen=True)
class IRCConfig(FitConfig):
    """Identical Row Compression of W_Q and/or W_K."""

    rate_field: ClassVar[str] = "rate"  # the field a sweep varies

    variant: str = _opt("qk", "which matrices: q | k | qk", choices=("q", "k", "qk"))
    rate: float = _opt(1.0, "fraction of rows replaced by the shared row (1 = full IRC)", lo=0.0, hi=1.0)
    init: str = _opt("random-row", "shared row: random-row | mean-row | fit (least squares)",
                     choices=("random-row", "mean-row", "fit"))
    orientation: str = _opt("input", "which reading of IRC: input (rows folded, W = 1 q^T: each token's feature "
                            "sum times q) | output (columns folded, W = q 1^T: every output is x . q)",
                            choices=("input", "output"))
    train_rest: bool = _opt(True, "also optimize the attention's other weights after the fold")


@dataclass(frozen=True)
class DWCConfig(FitConfig):
    """Diagonal Weight Compression of W_V."""

    rate_field: ClassVar[str] = "rate"  # the field a sweep varies

    variant: str = _opt("both", "which triangle is removed: lower | upper | both", choices=("lower", "upper", "both"))
    rate: float = _opt(1.0, "fraction of the removable entries zeroed, farthest from the diagonal first",
                       lo=0.0, hi=1.0)
    rect_diagonal: str = _opt("largest", "input read by each column of a rectangular W_V: largest | strided",
                              choices=("largest", "strided"))
    train_rest: bool = _opt(True, "also optimize the attention's other weights after the fold")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"N:M"`` -> (N, M): N zeros in every group of M consecutive inputs."""
    if pattern == "unstructured":
        return None
    n, sep, m = pattern.partition(":")
    if sep and n.isdigit() and m.isdigit() and 0 < int(n) < int(m):
        return int(n), int(m)
    raise ValueError(f"pattern: {pattern!r} is neither 'unstructured' nor 'N:M' with 0 < N < M (e.g. 2:4)")


class NMPattern:
    """A stage with a ``pattern`` field (FPP, the pruning baselines): ``nm`` is the parsed pattern, and an
    N:M pattern fixes the stage's rate (its ``rate_field``) to N/M."""

    pattern: str
    rate_field: ClassVar[str]

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    def _rate_from_pattern(self) -> None:
        if self.nm is not None:
            object.__setattr__(self, self.rate_field, self.nm[0] / self.nm[1])


CRITERIA = ("magnitude", "literal", "wanda", "obs", "frequency")
ACTIVATION_CRITERIA = ("wanda", "obs")  # need a layer's input activations: not for an embedding


@dataclass(frozen=True)
class FPPConfig(NMPattern, FitConfig):
    """Forward Propagation Pruning (Algorithm 2) of embedding or feed-forward matrices."""

    rate_field: ClassVar[str] = "target_sparsity"  # the field a sweep varies

    target_sparsity: float = _opt(0.7, "fraction of each matrix's weights zeroed at the end", lo=0.0, hi=1.0)
    p_pos: float = _opt(0.05, "share of the matrix's weights, taken from the positive ones, zeroed per iteration",
                        lo=0.0, hi=1.0)
    p_neg: float = _opt(0.05, "share of the matrix's weights, taken from the negative ones, zeroed per iteration",
                        lo=0.0, hi=1.0)
    max_it: int = _opt(100, "maximum pruning iterations (MaxIt)", lo=1, hi=100_000)
    criterion: str = _opt("magnitude", "magnitude (closest to zero) | literal (largest of each sign) | wanda "
                          "(|W| x input norm) | obs (SparseGPT's score, survivors updated) | frequency (embedding: "
                          "|E| x sqrt(1 + lookups))", choices=CRITERIA)
    structure: str = _opt("weight", "weight (single entries) | neuron (whole feed-forward neurons, fpp_ff only: "
                          "the matrices become smaller and dense; beyond the paper)", choices=("weight", "neuron"))
    pattern: str = _opt("unstructured", "unstructured | N:M (N zeros in every M consecutive inputs of each output, "
                        "e.g. 2:4, which GPUs run as semi-structured sparse tensors; target_sparsity becomes N/M; "
                        "beyond the paper)")

    def __post_init__(self) -> None:
        if self.nm is not None and self.structure == "neuron":
            raise ValueError("pattern: an N:M pattern prunes single weights; it excludes structure 'neuron'")
        self._rate_from_pattern()


@dataclass(frozen=True)
class PruneConfig(NMPattern, FitConfig):
    """A one-shot pruning baseline on every linear layer of every block (no re-fitting by default)."""

    rate_field: ClassVar[str] = "sparsity"  # the field a sweep varies

    steps: int = _opt(0, "Adam steps after pruning (0 = the published one-shot method)", lo=0, hi=100_000)
    sparsity: float = _opt(0.5, "fraction of each matrix's weights zeroed (N:M patterns: N/M)", lo=0.0, hi=1.0)
    pattern: str = _opt("unstructured", "unstructured | N:M (N zeros in every M consecutive inputs, e.g. 2:4)")

    def __post_init__(self) -> None:
        self._rate_from_pattern()


@dataclass(frozen=True)
class MagnitudeConfig(PruneConfig):
    """Magnitude pruning: the smallest |W| per matrix, or over all block linears at once (global)."""

    scope: str = _opt("matrix", "compare weights within each matrix or across all block linears",
                      choices=("matrix", "global"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scope == "global" and self.nm is not None:
            raise ValueError("scope: 'global' cannot be combined with an N:M pattern")


@dataclass(frozen=True)
class WandaConfig(PruneConfig):
    """Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, compared within each output."""


@dataclass(frozen=True)
class SparseGPTConfig(PruneConfig):
    """SparseGPT (Frantar & Alistarh 2023): OBS pruning with the layer Hessian X^T X."""

    blocksize: int = _opt(128, "columns per lazy-update block", lo=1, hi=1_000_000)
    damp: float = _opt(0.01, "dampening, as a fraction of the mean Hessian diagonal", lo=0.0, hi=10.0)


@dataclass(frozen=True)
class StrategyConfig:
    """Sequential (Eq. 3) and recursive (Algorithm 1) strategies."""

    sequential: bool = _opt(True, "propagate calibration activations through the compressed prefix")
    recursive: bool = _opt(True, "grow each stage's rate step by step and keep the best state")
    step: float = _opt(0.05, "rate increment of the recursive schedule (IRC, DWC)", lo=1e-6, hi=1.0)
    threshold: float | None = _opt(None, "tolerated degradation relative to dense (null = always accept)",
                                   lo=0.0, hi=1e9)
    metric: str = _opt("local", "what the threshold is checked on: local (sublayer relative error) | "
                       "perplexity (model, held-out calibration)", choices=("local", "perplexity"))


@dataclass(frozen=True)
class CalibrationConfig:
    """Calibration windows: seeded random windows of a training text."""

    text: str = _opt("wikitext2", "training text: wikitext2 | ptb", choices=("wikitext2", "ptb"))
    samples: int = _opt(32, "number of calibration windows", lo=1, hi=1_000_000)
    seqlen: int = _opt(128, "tokens per calibration window", lo=2, hi=1_000_000)
    eval_samples: int = _opt(4, "held-out windows for the perplexity metric of the recursive strategy",
                             lo=1, hi=1_000_000)


@dataclass(frozen=True)
class RecoverConfig:
    """Retraining after compression (the paper's "retrained using the updated compressed weights"):
    distillation from the dense model, or plain fine-tuning with ``teacher: none``. The structure
    is kept exactly: pruned entries stay zero, folded rows one shared vector, diagonals diagonal."""

    text: str = _opt("wikitext2", "training text: wikitext2 | ptb (their train splits) or a text file's path")
    steps: int | None = _opt(None, "optimizer steps (the budget: give steps, tokens or minutes; default 200 steps)",
                             lo=1, hi=1e9)
    tokens: int | None = _opt(None, "training tokens (budget; steps = tokens / (batch_size * seqlen))", lo=1, hi=1e13)
    minutes: float | None = _opt(None, "wall-time budget in minutes (steps sized from the first steps' speed)",
                                 lo=1e-3, hi=1e6)
    seqlen: int = _opt(256, "tokens per training window", lo=2, hi=1_000_000)
    batch_size: int = _opt(8, "windows per optimizer step (the global batch, split across processes)",
                           lo=1, hi=1_000_000)
    lr: float = _opt(2e-4, "AdamW peak learning rate (warm-up, then cosine to a tenth)", lo=0.0, hi=1.0)
    weight_decay: float = _opt(0.0, "AdamW weight decay (the paper: 0.01)", lo=0.0, hi=10.0)
    warmup: float = _opt(0.05, "share of the steps spent warming up the learning rate", lo=0.0, hi=1.0)
    clip: float = _opt(1.0, "gradient-norm clipping (0 = off)", lo=0.0, hi=1e6)
    teacher: str = _opt("dense", "dense (the model before compression) | none (plain fine-tuning)",
                        choices=("dense", "none"))
    kl_weight: float = _opt(1.0, "weight of KL(teacher || student) on the logits", lo=0.0, hi=1e6)
    temperature: float = _opt(1.0, "distillation temperature (the KL term is scaled by its square)", lo=1e-3,
                              hi=100.0)
    ce_weight: float = _opt(1.0, "weight of the next-token cross-entropy", lo=0.0, hi=1e6)
    hidden_weight: float = _opt(0.0, "weight of matching the last hidden states (mean squared error)", lo=0.0,
                                hi=1e6)
    eval_every: int = _opt(50, "steps between held-out perplexity checks", lo=1, hi=1e9)
    eval_windows: int = _opt(4, "held-out windows (of seqlen, from the text's validation split)", lo=1, hi=1e6)
    checkpoint_minutes: float = _opt(5.0, "minutes between checkpoints (a checkpoint also at the end and on Ctrl-C)",
                                     lo=0.0, hi=1e6)
    compute_dtype: str = _opt("auto", "forward precision: auto (bfloat16 on a GPU, float32 on a CPU) | float32 | "
                              "bfloat16 | float16", choices=("auto", "float32", "bfloat16", "float16"))
    sharding: str = _opt("none", "with several processes: none (each holds the whole model, gradients averaged as "
                         "in DDP) | fsdp (parameters, gradients and optimizer state split over the processes, "
                         "for models that do not fit one device)", choices=("none", "fsdp"))

    def __post_init__(self) -> None:
        if self.teacher == "none" and self.ce_weight == 0:
            raise ValueError("ce_weight: without a teacher the cross-entropy is the only loss; it must be above 0")
        if self.teacher == "dense" and self.kl_weight == self.ce_weight == self.hidden_weight == 0:
            raise ValueError("kl_weight: every loss weight is 0")

    def budget(self) -> str:
        given = [k for k in ("steps", "tokens", "minutes") if getattr(self, k) is not None]
        return ", ".join(f"{k} {getattr(self, k)}" for k in given) or "steps 200"


@dataclass(frozen=True)
class OverallConfig:
    """Allocation instead of fixed rates: the overall compression to reach exactly, shared out over the
    embedding and every block's Q/K, V, O and feed-forward matrices by measured sensitivity (the rates
    of fpp_emb and of the pruning stage are then per matrix; smartprune/allocation.py)."""

    target: float = _opt(0.5, "fraction of all the model's parameters removed (exactly)", lo=0.0, hi=0.99)
    max_rate: float = _opt(0.9, "highest rate any matrix may reach (the sensitivity grid's top)", lo=0.01, hi=1.0)
    points: int = _opt(4, "sensitivity grid: rates max_rate * k / points for k = 1..points", lo=1, hi=100)
    emb_criterion: str = _opt("frequency", "how the embedding is scored while measuring: magnitude | frequency",
                              choices=("magnitude", "frequency"))

    def grid(self) -> tuple[float, ...]:
        return tuple(self.max_rate * k / self.points for k in range(1, self.points + 1))


@dataclass(frozen=True)
class HeadConfig:
    """The output head (`smartprune.head`): ``untie`` keeps it dense while FPP prunes the input table;
    ``low-rank`` replaces it, after the stages, by a rank-`rank` factorization fitted to the model's
    final hidden states on the calibration windows (cheaper per token)."""

    kind: str = _opt("low-rank", "untie | low-rank", choices=("untie", "low-rank"))
    rank: int = _opt(128, "low-rank: the head's rank (below the hidden size)", lo=1, hi=1_000_000)


# Stage key -> config class. The order is the order stages run within their scope.
STAGE_TYPES: dict[str, type[FitConfig]] = {
    "fpp_emb": FPPConfig,
    "irc": IRCConfig,
    "dwc": DWCConfig,
    "fpp_ff": FPPConfig,
    "magnitude": MagnitudeConfig,
    "wanda": WandaConfig,
    "sparsegpt": SparseGPTConfig,
}
SECTION_TYPES: dict[str, type] = {"strategy": StrategyConfig, "calibration": CalibrationConfig}
PRUNING_STAGES = ("magnitude", "wanda", "sparsegpt")
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

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: dataclasses.asdict(v) for k, v in self.stages.items()}
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
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise RecipeError(f"{where}: unknown key '{key}'{did_you_mean(str(key), fields)}")
        kwargs[key] = _check_value(f"{where}.{key}", fields[key], value, hints[key])
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
    known = [*STAGE_TYPES, *SECTION_TYPES, *OPTIONAL_SECTIONS, "description"]
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
    _check_overall(stages, sections.get("overall"), source)
    return Recipe(name=name, stages=stages, description=description, **sections)


def _check_fpp(stages: dict[str, FitConfig], source: str) -> None:
    """Criteria and structures that only make sense for one kind of matrix."""
    emb, ff = stages.get("fpp_emb"), stages.get("fpp_ff")
    if emb is not None and emb.structure != "weight":
        raise RecipeError(f"recipe {source}: fpp_emb.structure: an embedding has no neurons; 'neuron' applies to "
                          "fpp_ff only")
    if emb is not None and emb.criterion in ACTIVATION_CRITERIA:
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
    others = [k for k in stages if k not in ("fpp_emb", *PRUNING_STAGES)]
    if others:
        raise RecipeError(f"recipe {source}: overall: the allocation sets the rates of fpp_emb and of a pruning "
                          f"stage ({', '.join(PRUNING_STAGES)}); remove {', '.join(others)}")
    if sum(k in PRUNING_STAGES for k in stages) > 1:
        raise RecipeError(f"recipe {source}: overall: one pruning stage at most")
    if getattr(stages.get("magnitude"), "scope", "matrix") == "global" or any(
            getattr(stages.get(k), "nm", None) for k in (*PRUNING_STAGES, "fpp_emb")):
        raise RecipeError(f"recipe {source}: overall: per-matrix rates exclude magnitude scope 'global' and N:M "
                          "patterns")


def field_docs(cls: type) -> list[tuple[str, Any, str]]:
    """(name, default, doc) of each field, for `smartprune recipes --fields`."""
    return [(f.name, f.default, f.metadata.get("doc", "")) for f in dataclasses.fields(cls)]
