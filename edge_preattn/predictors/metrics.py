"""Prediction accuracy: the one place it is defined (eval, training and tests all use this module).

Per token and MoE layer, with T the router's k experts and P a predictor's ranked list (ids, best
first):

- `exact_set`          set(P[:k]) == T
- `recall_at_k`        |P[:k] ∩ T| / k
- `recall_at_k_plus_m` |P[:k+m] ∩ T| / k       (k+m experts loaded, hits counted over the k needed)
- `cover_at_k_plus_m`  T ⊆ P[:k+m]             (no miss at all with k+m loaded)
- `top1`               P[0] ∈ T

How they map onto the paper (sections 4.1, 5.1, 5.2, 6.2; Table 4). Its words define "exact-match
accuracy" as "the percentage of predictions that correctly identify all k selected experts", and
section 6.2 speaks of "93.03% of tokens" — both the literal `exact_set`. Its numbers read more like
`recall_at_k`: 94.69% on the *first* layer of Qwen3-30B (8 of 128 experts, where even the router's
own k-th and (k+1)-th scores often nearly tie) would be an implausibly high all-k-right rate, and
the FATE figure it compares with (78.79%) is, as far as we can tell, a per-expert hit rate. Section
6.2's expected loading time, (1 − accuracy) × time to load k experts, fits both readings. Its
"over-provisioning accuracy" (10 loaded for k = 6 → 98.65%) is `cover_at_k_plus_m` under the literal
reading, `recall_at_k_plus_m` under the other. The paper does not settle it, so we report both
readings everywhere. `top1` is unambiguous.

All functions are vectorized over tokens: `ranked_ids` [N, n] (n ≥ the largest k+m asked for; the
entries of a row should be distinct, duplicates never count twice) and `true_ids` [N, k] (the
router's ids, distinct); they return per-token float arrays [N] with values in {0, 1/k, ..., 1}.
"""

import math

import numpy as np

METRICS = ("exact_set", "recall_at_k", "top1")  # per-token metrics without a margin
MARGIN_METRICS = ("recall_at_k_plus_m", "cover_at_k_plus_m")  # per-token metrics for each margin m


def margins(k: int) -> tuple[int, ...]:
    """The over-provisioning margins reported: m ∈ {1, ⌈k/2⌉, k}, without repeats (k = 1 gives (1,))."""
    return tuple(sorted({1, math.ceil(k / 2), k}))


def ranked(scores: np.ndarray, n: int) -> np.ndarray:
    """The ids of the n highest scores per row, best first; ties go to the lower id.

    scores: [N, E] → ids: [N, min(n, E)] int64.
    """
    scores = np.asarray(scores)
    # a stable sort of the negated scores keeps equal scores in id order
    order = np.argsort(-scores.astype(np.float64), axis=1, kind="stable")
    return order[:, : min(n, scores.shape[1])]


def true_ranks(ranked_ids: np.ndarray, true_ids: np.ndarray) -> np.ndarray:
    """Where each of the router's experts first appears in the ranked list (n where it does not).

    ranked_ids: [N, n], true_ids: [N, k] → ranks: [N, k] int64.
    """
    ranked_ids = np.asarray(ranked_ids, np.int64)
    true_ids = np.asarray(true_ids, np.int64)
    if ranked_ids.shape[0] != true_ids.shape[0]:
        raise ValueError(f"{ranked_ids.shape[0]} predictions for {true_ids.shape[0]} tokens")
    n = ranked_ids.shape[1]
    match = true_ids[:, :, None] == ranked_ids[:, None, :]  # [N, k, n]
    return np.where(match.any(axis=2), match.argmax(axis=2), n)


def _hits(ranked_ids: np.ndarray, true_ids: np.ndarray, depth: int) -> np.ndarray:
    """|P[:depth] ∩ T| per token: [N] int."""
    return (true_ranks(ranked_ids, true_ids) < depth).sum(axis=1)


def _need(ranked_ids: np.ndarray, depth: int) -> None:
    if ranked_ids.shape[1] < depth:
        raise ValueError(f"{ranked_ids.shape[1]} ranked ids are too few to score depth {depth}")


def exact_set(ranked_ids: np.ndarray, true_ids: np.ndarray) -> np.ndarray:
    """set(P[:k]) == T: all k experts right (the paper's definition of exact-match, read literally)."""
    k = true_ids.shape[1]
    _need(ranked_ids, k)
    return (_hits(ranked_ids, true_ids, k) == k).astype(np.float64)


def recall_at_k(ranked_ids: np.ndarray, true_ids: np.ndarray) -> np.ndarray:
    """|P[:k] ∩ T| / k: the share of needed experts prefetched (what the paper's exact-match numbers
    most likely are; the fraction of loads that are hits when exactly k are prefetched)."""
    k = true_ids.shape[1]
    _need(ranked_ids, k)
    return _hits(ranked_ids, true_ids, k) / k


def recall_at_k_plus_m(ranked_ids: np.ndarray, true_ids: np.ndarray, m: int) -> np.ndarray:
    """|P[:k+m] ∩ T| / k: hit rate with k+m experts prefetched (the paper's over-provisioning
    accuracy under the recall reading). A list shorter than k+m counts as complete (E < k+m)."""
    k = true_ids.shape[1]
    return _hits(ranked_ids, true_ids, k + m) / k


def cover_at_k_plus_m(ranked_ids: np.ndarray, true_ids: np.ndarray, m: int) -> np.ndarray:
    """T ⊆ P[:k+m]: no miss at all with k+m prefetched (over-provisioning accuracy, strict reading)."""
    k = true_ids.shape[1]
    return (_hits(ranked_ids, true_ids, k + m) == k).astype(np.float64)


def top1(ranked_ids: np.ndarray, true_ids: np.ndarray) -> np.ndarray:
    """P[0] ∈ T: the single best-scored expert is one of the k used (the paper's top-1 accuracy)."""
    _need(ranked_ids, 1)
    return (true_ranks(ranked_ids, true_ids) == 0).any(axis=1).astype(np.float64)


def per_token(ranked_ids: np.ndarray, true_ids: np.ndarray, n_expert: int | None = None) -> dict:
    """Every metric per token: {"exact_set": [N], "recall_at_k": [N], "top1": [N],
    "recall_at_k_plus_m": {m: [N]}, "cover_at_k_plus_m": {m: [N]}} for m in `margins(k)`.

    ranked_ids needs 2k columns (`ranked(scores, 2 * k)`), or all n_expert when there are fewer."""
    k = true_ids.shape[1]
    _need(ranked_ids, min(2 * k, n_expert or 2 * k))
    ranks = true_ranks(ranked_ids, true_ids)  # [N, k], computed once for every metric

    def hits(depth: int) -> np.ndarray:
        return (ranks < depth).sum(axis=1)

    return {
        "exact_set": (hits(k) == k).astype(np.float64),
        "recall_at_k": hits(k) / k,
        "top1": (ranks == 0).any(axis=1).astype(np.float64),
        "recall_at_k_plus_m": {m: hits(k + m) / k for m in margins(k)},
        "cover_at_k_plus_m": {m: (hits(k + m) == k).astype(np.float64) for m in margins(k)},
    }


def mean_of(values: dict, mask: np.ndarray | None = None) -> dict:
    """The same tree as `per_token` gives, with each array replaced by its mean over the tokens in
    `mask` (all when None); margin keys become strings, as JSON writes them."""

    def mean(array: np.ndarray) -> float:
        selected = array if mask is None else array[mask]
        if selected.size == 0:
            raise ValueError("no tokens to average")
        return float(selected.mean())

    return {
        name: {str(m): mean(a) for m, a in value.items()} if isinstance(value, dict) else mean(value)
        for name, value in values.items()
    }


def summarize(
    ranked_ids: np.ndarray,
    true_ids: np.ndarray,
    mask: np.ndarray | None = None,
    n_expert: int | None = None,
) -> dict:
    """All metrics averaged over tokens, for m ∈ {1, ⌈k/2⌉, k}: {"exact_set": f, "recall_at_k": f,
    "top1": f, "recall_at_k_plus_m": {"<m>": f}, "cover_at_k_plus_m": {"<m>": f}}.

    ranked_ids: [N, 2k] (`ranked(scores, 2 * k)`), or [N, n_expert] when n_expert < 2k."""
    return mean_of(per_token(ranked_ids, true_ids, n_expert), mask)
