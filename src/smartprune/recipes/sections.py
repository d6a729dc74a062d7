"""The recover section (retraining after compression) and the named recovery budgets: free of torch,
so the command line draws `recover`'s flags from them (cli/shared.config_flags) without loading a model
library. The recipe schema (recipes/schema.py) validates them with the other sections."""

from __future__ import annotations

from dataclasses import dataclass

from smartprune.options import option

OBJECTIVES = ("end_to_end", "blockwise", "auto")
BLOCK_LOSSES = ("mse", "token")
HIDDEN_LAYERS = ("last", "blocks")


@dataclass(frozen=True)
class RecoverConfig:
    """Retraining after compression (the paper's "retrained using the updated compressed weights"):
    distillation from the dense model, or plain fine-tuning with ``teacher: none``. The structure
    is kept exactly: pruned entries stay zero, folded rows one shared vector, diagonals diagonal."""

    text: str = option("wikitext2", "training text: wikitext2 | ptb (their train splits) or a text file's path")
    steps: int | None = option(None, "end-to-end optimizer steps (the budget: give steps, tokens or minutes; default "
                               "200 steps; 0 with objective blockwise: the block fits only)", lo=0, hi=1e9)
    tokens: int | None = option(None, "training tokens (budget; steps = tokens / (batch_size * seqlen))", lo=1, hi=1e13)
    minutes: float | None = option(None, "wall-time budget in minutes (steps sized from the first steps' speed)",
                                   lo=1e-3, hi=1e6)
    seqlen: int = option(256, "tokens per training window", lo=2, hi=1_000_000)
    batch_size: int = option(8, "windows per optimizer step (the global batch, split across processes)",
                             lo=1, hi=1_000_000)
    lr: float = option(2e-4, "AdamW peak learning rate (warm-up, then cosine to a tenth)", lo=0.0, hi=1.0)
    weight_decay: float = option(0.0, "AdamW weight decay (the paper: 0.01)", lo=0.0, hi=10.0)
    warmup: float = option(0.05, "share of the steps spent warming up the learning rate", lo=0.0, hi=1.0)
    clip: float = option(1.0, "gradient-norm clipping (0 = off)", lo=0.0, hi=1e6)
    teacher: str = option("dense", "dense (the model before compression) | none (plain fine-tuning)",
                          choices=("dense", "none"))
    kl_weight: float = option(1.0, "weight of KL(teacher || student) on the logits", lo=0.0, hi=1e6)
    temperature: float = option(1.0, "distillation temperature (the KL term is scaled by its square)", lo=1e-3,
                                hi=100.0)
    ce_weight: float = option(1.0, "weight of the next-token cross-entropy", lo=0.0, hi=1e6)
    hidden_weight: float = option(0.0, "weight of matching the teacher's hidden states (see hidden_layers)", lo=0.0,
                                  hi=1e6)
    hidden_layers: str = option("last", "which hidden states hidden_weight matches: last (the final ones, mean "
                                "squared error) | blocks (every kept block's output against the output of the dense "
                                "span it stands for, each error relative to its target's mean square, averaged)",
                                choices=HIDDEN_LAYERS)
    objective: str = option("auto", "end_to_end (distil the whole model) | blockwise (first fit each block to "
                            "the dense block's outputs on cached windows, block_steps steps per block, far cheaper "
                            "per step; then the end-to-end budget) | auto (blockwise where the compression changed "
                            "the model's shapes, blocks, heads or widths removed, and one process runs it; "
                            "end_to_end otherwise)", choices=OBJECTIVES)
    block_steps: int = option(32, "objective blockwise: optimizer steps per block (batch_size cached windows each)",
                              lo=0, hi=1e7)
    lr_after_fits: float | None = option(None, "end-to-end peak learning rate after block-wise fits (default: lr): a "
                                         "model the fits brought near the dense one wants smaller steps", lo=0.0,
                                         hi=1.0)
    block_lr: float = option(3e-3, "objective blockwise: AdamW peak learning rate of the block fits (warm-up, then "
                             "cosine to a tenth, per block)", lo=0.0, hi=1.0)
    block_loss: str = option("mse", "objective blockwise: what a block fit minimizes: mse (the squared error of "
                             "the block's output) | token (each token's squared error over its target's squared "
                             "norm: the next block reads its input through an RMS norm, so a token whose hidden "
                             "state is a hundred times larger weighs no more than the others)",
                             choices=BLOCK_LOSSES)
    cache_windows: int = option(64, "objective blockwise: training windows whose hidden states are cached", lo=1,
                                hi=1e6)
    eval_every: int = option(50, "steps between held-out perplexity checks", lo=1, hi=1e9)
    eval_windows: int = option(4, "held-out windows (of seqlen, from the text's validation split)", lo=1, hi=1e6)
    checkpoint_minutes: float = option(5.0, "minutes between checkpoints (a checkpoint also at the end and on Ctrl-C)",
                                       lo=0.0, hi=1e6)
    compute_dtype: str = option("auto", "forward precision: auto (bfloat16 on a GPU, float32 on a CPU) | float32 | "
                                "bfloat16 | float16", choices=("auto", "float32", "bfloat16", "float16"))
    sharding: str = option("none", "with several processes: none (each holds the whole model, gradients averaged as "
                           "in DDP) | fsdp (parameters, gradients and optimizer state split over the processes, "
                           "for models that do not fit one device)", choices=("none", "fsdp"))

    def __post_init__(self) -> None:
        if self.steps == 0 and self.objective != "blockwise":
            raise ValueError("steps: 0 end-to-end steps is only a budget with objective blockwise")
        if self.objective == "blockwise" and self.teacher == "none":
            raise ValueError("objective: blockwise fits the dense model's block outputs; it needs teacher: dense")
        if self.teacher == "none" and self.ce_weight == 0:
            raise ValueError("ce_weight: without a teacher the cross-entropy is the only loss; it must be above 0")
        if self.hidden_layers != "last" and self.hidden_weight == 0:
            raise ValueError(f"hidden_layers: {self.hidden_layers} chooses what hidden_weight matches, and "
                             "hidden_weight is 0")
        if self.teacher == "dense" and self.kl_weight == self.ce_weight == self.hidden_weight == 0:
            raise ValueError("kl_weight: every loss weight is 0")

    def budget(self) -> str:
        given = [k for k in ("steps", "tokens", "minutes") if getattr(self, k) is not None]
        return ", ".join(f"{k} {getattr(self, k)}" for k in given) or "steps 200"


# Named recovery budgets (the demo's, and `compare --recover-budget`'s): what fits the demo's time on two CPU
# cores (30 and 8 minutes; a step of 4 x 256 tokens takes about 17 s there, of 4 x 128 about 10 s: docs/results),
# distillation from the dense model. Until 2026-11-30 they were 120 and 16 steps (docs/frontier.md's runs). The
# full budget fits a structured model's blocks first (auto), then takes its end-to-end steps at 3e-4: on `slim-40`
# that beat end-to-end steps for the same CPU time, and 1e-3 after the fits (docs/structured-results.md); 64 fit
# steps per block on 128 cached windows (since 2026-12-08; 32 on 64 before) cost 1.27x the seconds of 32 and give
# 0.94x the perplexity, and the whole recovery (350 s on `slim-40`) stays within what the demo spends on each
# recipe's (370-400 s). The
# quick one fits too, shorter (16 steps per block on 32 cached windows: 33 s on `slim-40`, 0.79x the perplexity of
# its 8 end-to-end steps alone for 1.9x their seconds). Models that keep the dense shapes (`paper`, `smart-40`,
# every unstructured recipe) take no fits under auto, so both budgets run them exactly as before.
RECOVERY_BUDGETS = {"full": {"steps": 40, "seqlen": 256, "batch_size": 4, "lr": 1e-3, "eval_every": 20,
                             "objective": "auto", "lr_after_fits": 3e-4, "block_steps": 64, "cache_windows": 128},
                    "quick": {"steps": 8, "seqlen": 128, "batch_size": 4, "lr": 1e-3, "eval_every": 8,
                              "objective": "auto", "block_steps": 16, "cache_windows": 32, "lr_after_fits": 3e-4}}
