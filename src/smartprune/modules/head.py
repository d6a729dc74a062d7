"""Cheaper or better output heads (a recipe's ``head`` section).

SmolLM2's head is tied to its 49,152 x 576 input embedding: after FPP-emb it is 70% zeros, but at
that sparsity the dense product is still the fastest on a CPU, so the head costs a full 49,152 x 576
product per token, a third of the compressed model's forward (docs/compact-results.md). Two options:

- ``untie``: the head keeps the dense original matrix while FPP prunes only the input table (quality
  first: the head is then as costly as the dense model's, and adds its parameters to the count);
- ``low-rank``: the head becomes ``up (V x r) @ down (r x d)``, fitted to the model's own final hidden
  states (minimizing the error of the logits on calibration tokens, not of the weights), so each
  token costs ``r (V + d)`` multiply-adds instead of ``V d`` (rank 128 on SmolLM2: 4.4x fewer).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from smartprune.modules.masked import forward_pre_hooks, run_in_chunks


class LowRankHead(nn.Module):
    """``logits = (h @ down^T) @ up^T (+ bias)``: a head of rank `rank`."""

    def __init__(self, d_in: int, d_out: int, rank: int, bias: bool = False) -> None:
        super().__init__()
        self.down = nn.Linear(d_in, rank, bias=False)
        self.up = nn.Linear(rank, d_out, bias=bias)

    @property
    def rank(self) -> int:
        return self.down.out_features

    @property
    def in_features(self) -> int:
        return self.down.in_features

    @property
    def out_features(self) -> int:
        return self.up.out_features

    def forward(self, h: Tensor) -> Tensor:
        return self.up(self.down(h))

    def to_linear(self) -> nn.Linear:
        """The plain head this equals (for a Hugging Face export)."""
        layer = nn.Linear(self.down.in_features, self.up.out_features, bias=self.up.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(self.up.weight @ self.down.weight)
            if self.up.bias is not None:
                layer.bias.copy_(self.up.bias)
        return layer


def tied(model: nn.Module) -> bool:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and getattr(head, "weight", None) is getattr(emb, "weight", False)


def untie_head(model: nn.Module) -> int:
    """Give a tied head its own copy of the (still dense) table; returns the parameters added."""
    if not tied(model):
        return 0
    head = model.get_output_embeddings()
    head.weight = nn.Parameter(head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return head.weight.numel()


def head_gram(model: nn.Module, ids: Tensor) -> Tensor:
    """``E[h h^T]`` (float64) of the hidden states entering the head over the windows `ids`."""
    head = model.get_output_embeddings()
    gram = torch.zeros(head.in_features, head.in_features, dtype=torch.float64)
    count = [0]

    def seen(_module, args):
        h = args[0].detach().reshape(-1, args[0].shape[-1]).double().cpu()
        gram.add_(h.t() @ h)
        count[0] += h.shape[0]

    with torch.no_grad(), forward_pre_hooks([(head, seen)]):
        run_in_chunks(model, ids)
    return gram / max(count[0], 1)


def low_rank_head(model: nn.Module, rank: int, gram: Tensor | None = None) -> int:
    """Replace the head by its rank-`rank` factorization closest on hidden states of second moment
    `gram` (``min ||(W - W_r) L||``, ``G = L L^T``: truncated SVD of ``W L``; plain SVD of ``W`` when
    no `gram`). Returns the parameters added (a tied head was free: all of them)."""
    head = model.get_output_embeddings()
    w = head.weight.detach().double().cpu()  # (vocab, d)
    d = w.shape[1]
    if not 0 < rank < d:
        raise ValueError(f"head rank must be between 1 and {d - 1}, got {rank}")
    if gram is None:
        chol = torch.eye(d, dtype=torch.float64)
    else:  # a little ridge keeps the factor invertible when some directions are never seen
        chol = torch.linalg.cholesky(gram + 1e-6 * gram.diagonal().mean() * torch.eye(d, dtype=torch.float64))
    u, s, vh = torch.linalg.svd(w @ chol, full_matrices=False)
    down = torch.linalg.solve_triangular(chol, vh[:rank], upper=False, left=False) if gram is not None \
        else vh[:rank]  # V_r^T L^{-1}: the rows solve x L = v_r^T
    was_tied = tied(model)
    bias = getattr(head, "bias", None)
    new = LowRankHead(d, w.shape[0], rank, bias=bias is not None).to(head.weight.device)
    with torch.no_grad():
        new.up.weight.copy_(u[:, :rank] * s[:rank])
        new.down.weight.copy_(down)
        if bias is not None:
            new.up.bias.copy_(bias)
    model.set_output_embeddings(new)
    model.config.tie_word_embeddings = False
    added = sum(p.numel() for p in new.parameters())
    return added if was_tied else added - w.numel()
