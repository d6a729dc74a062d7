"""Forward Propagation Pruning (Algorithm 2) of embedding and feed-forward matrices.

Iteration ``it`` zeroes, among the still-alive entries of each matrix, ``p_pos * N`` positive and
``p_neg * N`` negative weights (``N`` the matrix's size) and freezes them for good; the fit then
re-optimizes the survivors. ``magnitude`` (default) takes the weights of each sign closest to zero;
``literal`` takes the paper's words at face value: the largest positive and the most negative.
The last iteration is trimmed so the target sparsity is met exactly.

Criteria beyond the paper (the peers' selection inside the paper's sign-balanced schedule), each
taking the lowest scores of each sign: ``wanda`` scores ``|W_ij| * ||X_i||`` (the input feature's
norm over the calibration tokens); ``obs`` scores ``W_ij^2 / [U]_ii^2`` (``U`` the upper Cholesky
factor of the damped inverse input Hessian, SparseGPT's score) and then updates the surviving
weights of each output to absorb the removed ones (SparseGPT's optimal-brain-surgeon sweep with the
increment's mask). An embedding looks rows up and has no input activations; its criterion besides
magnitude is ``frequency``: ``|E_tj| * sqrt(1 + c_t)`` with ``c_t`` how often row ``t`` is looked up
in the calibration windows, so rows the text never uses go first.

``structure: neuron`` (feed-forward only, beyond the paper) applies the same schedule to whole
intermediate neurons instead of single weights: a neuron is its column in each input projection
(up / gate, GPT-2's ``c_fc``) and its row in the output projection (down, ``c_proj``); its score is
the L2 norm of all those weights, signed by the sum of its outgoing weights, and ``p_pos`` / ``p_neg``
are shares of the neuron count. At the end the dead neurons are cut out, so the matrices become
smaller dense ones that any dense kernel runs faster.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from smartprune.errors import RecipeError
from smartprune.methods.base import Stage, Sublayer
from smartprune.methods.config import FitConfig, NMPattern, StrategyConfig, option
from smartprune.methods.criteria import frequency_score, obs_score, offered, wanda_score
from smartprune.methods.neurons import cut_dead_neurons
from smartprune.methods.oneshot import collect_stats
from smartprune.methods.sparsegpt import inverse_hessian_factor, sparsegpt
from smartprune.modules.masked import Maskable, forward_pre_hooks, run_in_chunks

CRITERIA = offered("fpp")


@dataclass(frozen=True)
class FPPConfig(NMPattern, FitConfig):
    """Forward Propagation Pruning (Algorithm 2) of embedding or feed-forward matrices."""

    rate_field: ClassVar[str] = "target_sparsity"  # the field a sweep varies

    target_sparsity: float = option(0.7, "fraction of each matrix's weights zeroed at the end", lo=0.0, hi=1.0)
    p_pos: float = option(0.05, "share of the matrix's weights, taken from the positive ones, zeroed per iteration",
                          lo=0.0, hi=1.0)
    p_neg: float = option(0.05, "share of the matrix's weights, taken from the negative ones, zeroed per iteration",
                          lo=0.0, hi=1.0)
    max_it: int = option(100, "maximum pruning iterations (MaxIt)", lo=1, hi=100_000)
    criterion: str = option("magnitude", "magnitude (closest to zero) | literal (largest of each sign) | wanda "
                            "(|W| x input norm) | obs (SparseGPT's score, survivors updated) | frequency (embedding: "
                            "|E| x sqrt(1 + lookups))", choices=CRITERIA)
    structure: str = option("weight", "weight (single entries) | neuron (whole feed-forward neurons, fpp_ff only: "
                            "the matrices become smaller and dense; beyond the paper)", choices=("weight", "neuron"))
    pattern: str = option("unstructured", "unstructured | N:M (N zeros in every M consecutive inputs of each output, "
                          "e.g. 2:4, which GPUs run as semi-structured sparse tensors; target_sparsity becomes N/M; "
                          "beyond the paper)")

    def __post_init__(self) -> None:
        if self.nm is not None and self.structure == "neuron":
            raise ValueError("pattern: an N:M pattern prunes single weights; it excludes structure 'neuron'")
        self._rate_from_pattern()

def sign_balanced_mask(weight: Tensor, mask: Tensor | None, n_pos: int, n_neg: int, criterion: str,
                       score: Tensor | None = None) -> Tensor:
    """A new mask (True = alive) with `n_pos` more non-negative and `n_neg` more negative entries
    removed. When one sign has too few alive entries, the other sign makes up the difference.
    With `score`, the lowest scores of each sign go (the criteria beyond the paper)."""
    w = weight.detach().flatten()
    alive = torch.ones_like(w, dtype=torch.bool) if mask is None else mask.flatten().clone()
    pos = (alive & (w >= 0)).nonzero().flatten()
    neg = (alive & (w < 0)).nonzero().flatten()
    have_pos, have_neg = pos.numel(), neg.numel()
    n_pos, n_neg = (min(have_pos, n_pos + max(0, n_neg - have_neg)),
                    min(have_neg, n_neg + max(0, n_pos - have_pos)))
    if score is not None:
        s = score.detach().flatten()
        for idx, n in ((pos, n_pos), (neg, n_neg)):
            if n:
                alive[idx[torch.topk(s[idx], n, largest=False).indices]] = False
        return alive.view_as(weight)
    # magnitude: smallest positives, least negative negatives; literal: the extremes of each sign.
    smallest = criterion == "magnitude"
    if n_pos:
        alive[pos[torch.topk(w[pos], n_pos, largest=not smallest).indices]] = False
    if n_neg:
        alive[neg[torch.topk(w[neg], n_neg, largest=smallest).indices]] = False
    return alive.view_as(weight)


def _rank_key(weight: Tensor, criterion: str, score: Tensor | None) -> Tensor:
    """The value whose lowest entries of either sign go first: the criterion's score, else |W| for
    magnitude (closest to zero) and -|W| for literal (the extremes of each sign)."""
    if score is not None:
        return score.detach()
    w = weight.detach().abs()
    return w if criterion == "magnitude" else -w


def nm_balanced_mask(weight: Tensor, mask: Tensor | None, n_pos: int, n_neg: int, criterion: str,
                     score: Tensor | None, nm: tuple[int, int], axis: int) -> Tensor:
    """`sign_balanced_mask` under an N:M pattern: no group of M consecutive entries along `axis` (a
    product's inputs) ever loses more than N. Positives go first, then negatives, each among the
    entries their group still has room for (the lowest of the group first); what a sign could not give
    is then taken from the lowest of either sign, so the count is exact whenever the groups have room
    (they do up to sparsity N/M, FPP's target under a pattern)."""
    n, m = nm
    alive = torch.ones_like(weight, dtype=torch.bool) if mask is None else mask.clone()
    if weight.shape[axis] % m:
        raise RecipeError(f"FPP pattern {n}:{m}: a matrix with {weight.shape[axis]} inputs is not a multiple of {m}")
    key = _rank_key(weight, criterion, score).float()
    negative = weight.detach() < 0

    def grouped(t: Tensor) -> Tensor:  # (outputs, groups, m) view of a matrix-shaped tensor
        t = t if axis == 1 else t.T
        return t.reshape(t.shape[0], -1, m)

    def take(count: int, sign: Tensor | None) -> int:
        """Remove up to `count` of the lowest entries of `sign` (None: either) that fit their group."""
        if count <= 0:
            return 0
        ok = grouped(alive if sign is None else alive & sign)
        room = n - (m - grouped(alive).sum(-1, keepdim=True))  # each group's remaining prunable entries
        k = torch.where(ok, grouped(key), torch.inf)
        eligible = ok & (k.argsort(-1).argsort(-1) < room)
        flat = torch.where(eligible, k, torch.inf).flatten()
        count = min(count, int(eligible.sum()))
        chosen = torch.zeros_like(flat, dtype=torch.bool)
        chosen[torch.topk(flat, count, largest=False).indices] = True
        removed = chosen.view_as(eligible).reshape(alive.shape[1 - axis], alive.shape[axis])
        alive.mul_(~(removed if axis == 1 else removed.T))
        return count

    got_pos = take(n_pos, ~negative)
    got_neg = take(n_neg + n_pos - got_pos, negative)
    take(n_pos + n_neg - got_pos - got_neg, None)
    return alive


def fpp_rates(cfg: FPPConfig, target: float | None = None) -> list[float]:
    """Cumulative sparsity after each iteration: ``it * (p_pos + p_neg)``, capped at the target
    (`target`, else the configured one)."""
    per_it = cfg.p_pos + cfg.p_neg
    target = cfg.target_sparsity if target is None else target
    if target <= 0:
        return []
    if per_it <= 0:
        raise RecipeError("FPP: p_pos + p_neg must be above 0 to reach target_sparsity "
                          f"{target}")
    rates: list[float] = []
    for it in range(1, cfg.max_it + 1):
        rates.append(min(target, it * per_it))
        if rates[-1] >= target - 1e-12:
            break
    return rates


def neuron_scores(inputs: list[Tensor], output: Tensor) -> Tensor:
    """Per intermediate neuron: the L2 norm of its weights (columns of the ``d x k`` input matrices,
    row of the ``k x d`` output matrix), signed by the sum of its outgoing weights."""
    sq = output.detach().pow(2).sum(1)
    for w in inputs:
        sq = sq + w.detach().pow(2).sum(0)
    sign = torch.where(output.detach().sum(1) >= 0, 1.0, -1.0)
    return sign * sq.sqrt()


def criterion_score(weight: Tensor, criterion: str, observed: Tensor | None) -> Tensor | None:
    """The score whose lowest entries of each sign go first (None: the paper's own rules on the
    weights). `observed`: the input Gram matrix (wanda, obs) or the row lookup counts (frequency)."""
    w = weight.detach()
    if criterion in ("magnitude", "literal"):
        return None
    if criterion == "frequency":
        return frequency_score(w, observed)
    if criterion == "wanda":
        return wanda_score(w.double(), observed.diagonal().clamp_min(0).sqrt())
    return obs_score(w, inverse_hessian_factor(observed)[0])


def fpp_increment(weight: Tensor, mask: Tensor | None, n_pos: int, n_neg: int, criterion: str,
                  observed: Tensor | None = None, nm: tuple[int, int] | None = None,
                  axis: int = 0) -> tuple[Tensor, Tensor]:
    """One FPP increment on a ``d_in x d_out`` matrix: (new weights, new alive mask). With ``obs`` the
    survivors of each output absorb what the removed weights did (SparseGPT's sweep, mask given).
    `nm`: keep an N:M pattern along `axis` (the matrix's inputs)."""
    score = criterion_score(weight, criterion, observed)
    alive = sign_balanced_mask(weight, mask, n_pos, n_neg, criterion, score) if nm is None else \
        nm_balanced_mask(weight, mask, n_pos, n_neg, criterion, score, nm, axis)
    if criterion != "obs":
        return weight.detach() * alive, alive
    new_t, _ = sparsegpt(weight.detach().T, observed, 0.0, fixed=~alive.T)
    return new_t.T * alive, alive


def lookup_counts(embed: Callable[[Tensor], Tensor], ids: Tensor, embeddings: list[nn.Module]) -> list[Tensor]:
    """How often each row of each embedding table is looked up while `embed` runs on the windows
    `ids` (token ids for a token table, positions for a position table)."""
    counts = [torch.zeros(e.weight.shape[0], dtype=torch.long, device=e.weight.device) for e in embeddings]

    def counter(c: Tensor):
        def hook(_module, args) -> None:  # returns None: a pre-hook's return value would replace the input
            c.add_(torch.bincount(args[0].flatten(), minlength=c.numel()).to(c.device))
        return hook

    with forward_pre_hooks((e, counter(c)) for e, c in zip(embeddings, counts, strict=True)):
        run_in_chunks(embed, ids)
    return counts


class FPPStage(Stage):
    cfg: FPPConfig
    state_attributes = ("rate", "neurons")

    def __init__(self, cfg: FPPConfig, sub: Sublayer, generator: torch.Generator) -> None:
        super().__init__(cfg, sub, generator)
        self.rate = 0.0
        self.neurons: Tensor | None = None  # structure: neuron: alive intermediate neurons
        if cfg.structure == "neuron":
            if sub.scope != "ff":
                raise RecipeError("FPP structure 'neuron' applies to feed-forward blocks only")
            out = self.targets[-1].weight
            self.neurons = torch.ones(out.shape[0], dtype=torch.bool, device=out.device)

    @property
    def targets(self) -> list[Maskable]:
        """The sublayer's maskable modules, looked up each time (a restore or a cut replaces them)."""
        return [m for m in self.sub.modules().values() if isinstance(m, Maskable)]

    def final_rates(self) -> list[float]:
        """Each target's final rate: the configured one, or the matrix's own where an allocation gave one."""
        alloc = self.sub.plan.allocation
        paths = {id(m): self.sub.paths[r] for r, m in self.sub.modules().items()}
        return [alloc.get(paths[id(m)], self.cfg.target_sparsity) for m in self.targets]

    def schedule(self, strategy: StrategyConfig) -> list[float]:
        # FPP is iterative by nature, whatever the strategy; each matrix stops at its own final rate
        return fpp_rates(self.cfg, max(self.final_rates(), default=0.0))

    def _split(self, new: int) -> tuple[int, int]:
        n_pos = round(new * self.cfg.p_pos / (self.cfg.p_pos + self.cfg.p_neg))
        return n_pos, new - n_pos

    def compress_to(self, rate: float) -> None:
        if self.neurons is not None:
            self._prune_neurons(rate)
            return
        for m, observed, final in zip(self.targets, self._observe(), self.final_rates(), strict=True):
            n = m.weight.numel()
            new = max(0, round(min(rate, final) * n) - (n - m.alive()))
            weight, alive = fpp_increment(m.weight, m.mask, *self._split(new), self.cfg.criterion, observed,
                                          self.cfg.nm, m.input_axis)
            with torch.no_grad():
                m.weight.copy_(weight)
            m.set_mask(alive)
        self.rate = rate

    def _observe(self) -> list[Tensor | None]:
        """What the criterion needs of each target, measured on the calibration input with the
        sublayer as it is now (earlier increments and matrices already pruned): the input Gram
        matrix (wanda, obs), how often each row is looked up (frequency), or nothing."""
        crit, targets = self.cfg.criterion, self.targets
        if crit in ("magnitude", "literal"):
            return [None] * len(targets)
        if crit == "frequency":
            return lookup_counts(self.sub.forward, self.sub.inputs, targets)
        roles = {id(m): r for r, m in self.sub.modules().items()}
        stats = collect_stats(self.sub, [roles[id(m)] for m in targets])
        return [stats[roles[id(m)]].gram for m in targets]

    def _prune_neurons(self, rate: float) -> None:
        *inputs, output = self.targets
        k = self.neurons.numel()
        new = max(0, round(rate * k) - int((~self.neurons).sum()))
        scores = neuron_scores([m.weight for m in inputs], output.weight)
        self.neurons = sign_balanced_mask(scores, self.neurons, *self._split(new), self.cfg.criterion)
        for m in inputs:
            m.set_mask(self.neurons[None, :].expand_as(m.weight))
        output.set_mask(self.neurons[:, None].expand_as(output.weight))
        self.rate = rate

    def finalize(self) -> None:
        if self.neurons is None or bool(self.neurons.all()):
            return
        cut_dead_neurons(self.sub, self.neurons)

    def trainable(self) -> list[nn.Parameter]:
        return self.sub.parameters()

    def achieved(self) -> float:
        return self.rate
