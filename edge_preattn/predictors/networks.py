"""The paper's per-layer expert predictors (section 4.3) and its four training losses (section 4.5).

A predictor maps one token's activation `x` [d] to one score per expert [E]; the experts it names are
the top-k of those scores (eq. 4). Every loss below takes the same three tensors:

    logits: [N, E]  the predictor's raw scores z (float32)
    probs:  [N, E]  the router's probabilities s for the same tokens, as captured (the truth)
    ids:    [N, k]  the experts the router selected (the positives)

"Top-10" and "top-30" of the paper (written for E = 64 and 128) become min(10, E) and min(30, E), so
the losses stay defined for models with few experts (Phi-mini-MoE has E = 16).
"""

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

ARCHS = (1, 2)
DEFAULT_HIDDEN = 2048
TOP_STRONG, TOP_MIDDLE = 10, 30  # the paper's "real top-10" and "top-11 to 30" tiers
RANK_LAMBDA, RANK_MARGIN = 0.3, 0.1  # eq. 9's λ and eq. 11's m (section 4.5.4)
FOCAL_GAMMA, FOCAL_ALPHA = 2.0, 0.25  # Lin et al. 2017's defaults: the paper gives none


class InputNorm(nn.Module):
    """Per-feature standardization with statistics of the training split, kept as buffers so that
    it travels inside the state dict and the exported ONNX graph: callers feed raw activations."""

    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_embd))
        self.register_buffer("std", torch.ones(n_embd))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        # x: [n_tokens, n_embd]
        x = x.float()
        self.mean.copy_(x.mean(dim=0))
        self.std.copy_(x.std(dim=0, unbiased=False).clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Predictor(nn.Module):
    """InputNorm, then Architecture 1 or 2 of figure 4; optionally on top of the router as prior.

    `prior` [E, d]: the layer's router weights mapped to the input's space (baselines.router_prior).
    With it the predictor is the residual `scale · x·priorᵀ + body(x)`: its last layer starts at zero,
    so before any training it ranks experts exactly as the prior does, and training only learns what
    attention and the layer input add. `n_extra` widens the body's input by history features
    (features.py) that come as further inputs, concatenated after x; the prior reads x alone.
    `rank` R > 0 makes the first Linear low-rank: Linear(width → R) then Linear(R → hidden), i.e.
    W1 = B·A with (width + hidden)·R numbers instead of width·hidden (both Gemms in ONNX; the library's
    reader multiplies them back into one W1, predictor_weights.read_mlp).
    """

    def __init__(
        self,
        arch: int,
        n_embd: int,
        n_expert: int,
        hidden: int = DEFAULT_HIDDEN,
        *,
        n_extra: int = 0,
        prior: torch.Tensor | None = None,
        rank: int = 0,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, not {arch!r}")
        if rank < 0:
            raise ValueError(f"rank must be 0 (full) or more, not {rank}")
        self.arch, self.n_embd, self.n_expert, self.hidden = arch, n_embd, n_expert, hidden
        self.n_extra, self.rank = n_extra, rank
        self.norm = InputNorm(n_embd + n_extra)
        width = n_embd + n_extra
        # [width → hidden], or [width → rank → hidden] (low-rank W1)
        first = [nn.Linear(width, rank), nn.Linear(rank, hidden)] if rank else [nn.Linear(width, hidden)]
        if arch == 1:  # Linear → BatchNorm1d → GELU → Dropout(0.1) → Linear
            layers = [*first, nn.BatchNorm1d(hidden), nn.GELU(), nn.Dropout(0.1)]
        else:  # Linear → SiLU → Linear
            layers = [*first, nn.SiLU()]
        self.body = nn.Sequential(*layers, nn.Linear(hidden, n_expert))
        if prior is not None and tuple(prior.shape) != (n_expert, n_embd):
            raise ValueError(f"prior must be [{n_expert}, {n_embd}], not {list(prior.shape)}")
        # [d, E] (x @ prior), or None: no entry in the state dict
        self.register_buffer("prior", None if prior is None else prior.float().t().contiguous())
        if prior is not None:
            self.prior_scale = nn.Parameter(torch.ones(()))
            nn.init.zeros_(self.body[-1].weight)
            nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        # x: [N, n_embd], extra: [N, ·] each (n_extra columns in all) → logits: [N, n_expert]
        scores = self.body(self.norm(torch.cat([x, *extra], dim=1) if extra else x))
        if self.prior is not None:
            scores = scores + (x @ self.prior) * self.prior_scale
        return scores

    def parameter_count(self) -> int:
        """Numbers stored in the exported graph: weights, biases, the prior and the input statistics."""
        return sum(t.numel() for t in self.state_dict().values() if t.dtype.is_floating_point)


def parameter_formula(
    arch: int,
    n_embd: int,
    n_expert: int,
    hidden: int,
    *,
    n_extra: int = 0,
    prior: bool = False,
    rank: int = 0,
) -> dict[str, int]:
    """Predictor.parameter_count by formula, split into its parts, for any model's shape without
    building the module: {"norm", "first", "batch_norm", "second", "prior", "total"}. With w = d + n_extra:
    norm 2w; first w·h + h (rank R: w·R + R + R·h + h); Arch 1's batch norm 4h (weight, bias, running
    mean and variance); second h·E + E; prior E·d + 1 (the model's own router weights and a scale)."""
    width = n_embd + n_extra
    parts = {
        "norm": 2 * width,
        "first": (width * rank + rank + rank * hidden + hidden) if rank else width * hidden + hidden,
        "batch_norm": 4 * hidden if arch == 1 else 0,
        "second": hidden * n_expert + n_expert,
        "prior": n_expert * n_embd + 1 if prior else 0,
    }
    return {**parts, "total": sum(parts.values())}


def _rank_key(probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The router's order as a score, [N, E]: the selected experts above all others, each group by
    probability. Selected-first keeps the positives on top even where the router selects on something
    other than its probabilities (a bias, as in DeepSeek-V3) or float16 storage ties two of them."""
    # probs: [N, E], ids: [N, k]
    selected = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, ids.long(), True)  # [N, E]
    return probs.float() + selected * (probs.float().abs().amax() * 2 + 1)


def true_ranks(probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Each expert's rank in the router's order (0 = best), [N, E]; see _rank_key."""
    order = _rank_key(probs, ids).argsort(dim=1, descending=True, stable=True)  # [N, E]: best first
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(probs.shape[1], device=probs.device).expand_as(order))
    return ranks


def _topk_labels(probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    # ids: [N, k] → labels: [N, E], 1.0 for the router's selected experts
    return torch.zeros_like(probs, dtype=torch.float32).scatter_(1, ids.long(), 1.0)


def _weighted_bce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eq. 6: −1/(N·E) Σ_i Σ_j w_ij l_ij with l_ij = log σ(z_ij) for positives, log(1 − σ(z_ij)) else."""
    return (weights * F.binary_cross_entropy_with_logits(logits, labels, reduction="none")).mean()


def mse_loss(logits: torch.Tensor, probs: torch.Tensor, ids: torch.Tensor, gating: str = "softmax"):
    """Eq. 5: (1/N) Σ_i Σ_j (s_ij − ŝ_ij)², regression on the router's probabilities.

    s is the router's score and ŝ the predictor's, put through the router's own gating function
    (eq. 1: softmax for the paper's models and for qwen3moe; sigmoid for sigmoid-gated routers), so
    that both live in the same space: softmax of the logits, not sigmoid as for the BCE losses.
    """
    predicted = torch.sigmoid(logits) if gating == "sigmoid" else torch.softmax(logits, dim=1)  # [N, E]
    return ((predicted - probs.float()) ** 2).sum(dim=1).mean()


def wbce_loss(logits: torch.Tensor, probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Eqs. 6-8: weighted BCE. Positives (eq. 7) are the router's top-k; the weight (eq. 8) is 3.0 for
    the real top-min(10, E) experts by router score and 0.5 for the others.

    With k < 10 the weight-3.0 tier also holds the 10 − k strongest non-selected experts, so their
    near misses are pushed down hard. The other reading, the top-10 as positives (an over-provisioned
    target), contradicts eq. 7's "if expert j is top-k" and is not what this implements.
    """
    ranks = true_ranks(probs, ids)  # [N, E]
    weights = torch.where(ranks < min(TOP_STRONG, probs.shape[1]), 3.0, 0.5)  # [N, E]
    return _weighted_bce(logits, _topk_labels(probs, ids), weights)


def focal_loss(logits: torch.Tensor, probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Focal loss (Lin et al. 2017, cited in section 4.5; no equation number in the paper) on the
    top-k labels: −α_t (1 − p_t)^γ log p_t, averaged over N·E like eq. 6. The paper gives no γ or α:
    these are the RetinaNet defaults γ = 2, α = 0.25 (α weighs positives, 1 − α negatives)."""
    labels = _topk_labels(probs, ids)  # [N, E]
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")  # [N, E] = −log p_t
    p_t = torch.exp(-bce)
    alpha_t = FOCAL_ALPHA * labels + (1 - FOCAL_ALPHA) * (1 - labels)
    return (alpha_t * (1 - p_t) ** FOCAL_GAMMA * bce).mean()


def ranking_hinge(
    logits: torch.Tensor, probs: torch.Tensor, ids: torch.Tensor, margin: float = RANK_MARGIN
) -> torch.Tensor:
    """Eq. 11: Σ over pairs (j, k) of the real top-min(10, E) with s_ij > s_ik of ReLU(m − (z_ij − z_ik)).

    Readings: s (the condition) is the router's true score and s^raw (the hinge) the predictor's raw
    logit z; a condition on predicted scores would give the pairs no target. Eq. 11 sums over the
    samples without 1/N, which would make λ's effect grow with the batch size; this averages over
    samples (sum over pairs, mean over tokens), which keeps λ = 0.3 on the scale of the BCE term.
    Pairs with equal true scores (s_ij = s_ik) are left out, as the strict inequality says.
    """
    key = _rank_key(probs, ids)  # [N, E]
    n_top = min(TOP_STRONG, probs.shape[1])
    key, order = key.topk(n_top, dim=1)  # [N, T]: the real top-T, best first
    z = logits.gather(1, order)  # [N, T]
    above = key[:, :, None] > key[:, None, :]  # [N, T, T]: pair (j, k) with s_j > s_k
    hinge = F.relu(margin - (z[:, :, None] - z[:, None, :]))  # [N, T, T]
    return (hinge * above).sum(dim=(1, 2)).mean()


def rank_loss(logits: torch.Tensor, probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Eqs. 9-11: ranking-aware BCE = weighted BCE with weights (eq. 10) 3.0 / 1.5 / 0.5 for the real
    ranks 1-min(10, E) / 11-min(30, E) / rest (positives still the top-k, eq. 7) + λ·ranking_hinge."""
    ranks = true_ranks(probs, ids)  # [N, E]
    n_expert = probs.shape[1]
    weights = torch.full_like(logits, 0.5)  # [N, E]
    weights[ranks < min(TOP_MIDDLE, n_expert)] = 1.5
    weights[ranks < min(TOP_STRONG, n_expert)] = 3.0
    bce = _weighted_bce(logits, _topk_labels(probs, ids), weights)
    return bce + RANK_LAMBDA * ranking_hinge(logits, probs, ids)


def distill_loss(logits: torch.Tensor, probs: torch.Tensor, ids: torch.Tensor, gating: str = "softmax"):
    """Soft targets (not in the paper): cross-entropy from the router's whole probability vector to
    the predictor's, i.e. KL(router ‖ predictor) plus the router's entropy (a constant). Softmax
    routers: −Σ_j s_j log softmax(z)_j per token; sigmoid routers: BCE of σ(z_j) against s_j. Where
    the router's k-th and (k+1)-th scores nearly tie, the hard top-k labels of the other losses flip
    between near-identical inputs; the probabilities do not."""
    if gating == "sigmoid":
        return F.binary_cross_entropy_with_logits(logits, probs.float())
    return -(probs.float() * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
LOSSES: dict[str, Loss] = {
    "mse": mse_loss,
    "wbce": wbce_loss,
    "focal": focal_loss,
    "rank": rank_loss,
    "distill": distill_loss,
}
GATED = ("mse", "distill")  # losses that put the logits through the router's gating function


def loss_names(name: str) -> list[str]:
    """`rank+distill` → ["rank", "distill"]: a sum of losses; [] when a part is unknown."""
    parts = name.split("+")
    return parts if all(part in LOSSES for part in parts) and len(set(parts)) == len(parts) else []


def make_loss(name: str, gating: str = "softmax") -> Loss:
    """The sum of the named LOSSES (see loss_names), each gated loss with the router's gating."""
    parts = [
        functools.partial(LOSSES[part], gating=gating) if part in GATED else LOSSES[part]
        for part in loss_names(name)
    ]
    if not parts:
        raise ValueError(f"unknown loss {name!r}: use one of {', '.join(LOSSES)} or a sum like rank+distill")

    def total(logits: torch.Tensor, probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return sum(part(logits, probs, ids) for part in parts)

    return parts[0] if len(parts) == 1 else total
