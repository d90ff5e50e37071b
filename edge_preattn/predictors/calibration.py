"""Calibrated predictor confidence, and how many experts to prefetch per token for a target recall.

A predictor's scores rank experts; `adaptive` prefetch needs probabilities. Per layer we fit one
temperature T so that sigmoid(score / T) matches how often an expert is really selected (held-out
tokens, binary cross-entropy). For a token the calibrated probabilities, normalized to sum to one,
estimate which share of the router's k experts lies in the first c of the ranking; the smallest
c ≥ k reaching the target recall is prefetched. Confident tokens cost k uploads, uncertain ones more.
"""

import numpy as np

TEMPERATURE_RANGE = (0.05, 20.0)


def selection_labels(true_ids: np.ndarray, n_expert: int) -> np.ndarray:
    """[N, k] ids → [N, E] 0/1 labels."""
    labels = np.zeros((len(true_ids), n_expert), np.float32)
    np.put_along_axis(labels, true_ids.astype(np.int64), 1.0, axis=1)
    return labels


def _bce(scores: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    z = scores / temperature
    # log(1 + exp(-|z|)) + max(z, 0) - z * y: stable binary cross-entropy on logits
    return float(np.mean(np.logaddexp(0.0, -np.abs(z)) + np.maximum(z, 0.0) - z * labels))


def fit_temperature(scores: np.ndarray, true_ids: np.ndarray) -> float:
    """The T minimizing BCE of sigmoid(scores / T) against the selection labels (golden-section on log T)."""
    labels = selection_labels(true_ids, scores.shape[1])
    low, high = np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1])
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = _bce(scores, labels, np.exp(a)), _bce(scores, labels, np.exp(b))
    for _ in range(60):
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = _bce(scores, labels, np.exp(a))
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = _bce(scores, labels, np.exp(b))
    return float(np.exp((low + high) / 2.0))


def prefetch_counts(scores: np.ndarray, k: int, temperature: float, target: float) -> np.ndarray:
    """Per token, how many top-ranked experts reach the target expected recall: [N] ints in [k, E].

    A target of 1.0 asks for certainty: every expert (floating-point shares never promise it earlier).
    """
    if target >= 1.0:
        return np.full(len(scores), scores.shape[1])
    probs = 1.0 / (1.0 + np.exp(-scores / temperature))  # [N, E]
    ranked = -np.sort(-probs, axis=1)
    share = np.cumsum(ranked, axis=1) / ranked.sum(axis=1, keepdims=True)  # expected recall at each cutoff
    reached = share >= target - 1e-9
    reached[:, -1] = True
    counts = reached.argmax(axis=1) + 1
    return np.maximum(counts, k)


def reliability(scores: np.ndarray, true_ids: np.ndarray, temperature: float, bins: int = 10) -> dict:
    """Predicted probability vs observed selection frequency, per probability bin (a reliability diagram)."""
    probs = (1.0 / (1.0 + np.exp(-scores / temperature))).ravel()
    labels = selection_labels(true_ids, scores.shape[1]).ravel()
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(probs, edges) - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        mask = which == b
        if mask.any():
            rows.append(
                {
                    "bin": [float(edges[b]), float(edges[b + 1])],
                    "count": int(mask.sum()),
                    "predicted": float(probs[mask].mean()),
                    "observed": float(labels[mask].mean()),
                }
            )
    return {"temperature": temperature, "bins": rows}
