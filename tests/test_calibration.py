"""Calibration and adaptive prefetch: fitted temperatures, per-token counts, and the runtime mode."""

import numpy as np

from edge_preattn.model.layout import read_layout
from edge_preattn.predictors import calibration
from edge_preattn.runtime.cache_runtime import RandomRanking

from .test_cache import run_mode


def crafted(seed: int = 0, n: int = 400, n_expert: int = 16, k: int = 4):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, n_expert)) * 2.0
    true = np.argsort(-(logits + rng.standard_normal((n, n_expert))), axis=1)[:, :k]  # noisy truth
    return logits.astype(np.float32), true


def test_fitted_temperature_minimizes_the_loss_and_scales_with_the_scores():
    scores, true = crafted()
    labels = calibration.selection_labels(true, scores.shape[1])
    t = calibration.fit_temperature(scores, true)
    best = calibration._bce(scores, labels, t)
    assert best <= calibration._bce(scores, labels, t * 1.2) and best <= calibration._bce(
        scores, labels, t / 1.2
    )
    assert abs(calibration.fit_temperature(3 * scores, true) / t - 3) < 0.01


def test_prefetch_counts_follow_confidence():
    k, n_expert = 2, 8
    confident = np.array([[20, 20, -20, -20, -20, -20, -20, -20]], np.float32)
    unsure = np.zeros((1, n_expert), np.float32)
    assert calibration.prefetch_counts(confident, k, 1.0, 0.9).tolist() == [2]
    assert calibration.prefetch_counts(unsure, k, 1.0, 0.9).tolist() == [8]  # 0.9 of a flat share needs 7.2
    assert calibration.prefetch_counts(unsure, k, 1.0, 0.5).tolist() == [4]
    assert calibration.prefetch_counts(confident, k, 1.0, 1.0).tolist() == [8]  # certainty: everything


def test_reliability_bins_count_every_probability():
    scores, true = crafted()
    report = calibration.reliability(scores, true, 1.0, bins=5)
    assert sum(b["count"] for b in report["bins"]) == scores.size
    assert all(0 <= b["observed"] <= 1 for b in report["bins"])


def test_adaptive_at_certainty_behaves_like_overprov_with_every_expert(llama_lib, moe_ref_a):
    layout = read_layout(moe_ref_a)
    extra = layout.n_expert - layout.n_expert_used
    # the routing waits for each prefetch, so residency does not depend on the thread's timing
    adaptive = run_mode(
        llama_lib,
        moe_ref_a,
        layout,
        "adaptive",
        16,
        predictors=RandomRanking(layout.n_expert),
        target=1.0,
        wait_for_prefetch=True,
    )
    overprov = run_mode(
        llama_lib,
        moe_ref_a,
        layout,
        "overprov",
        16,
        predictors=RandomRanking(layout.n_expert),
        extra=extra,
        wait_for_prefetch=True,
    )
    assert adaptive[0] == overprov[0] and np.array_equal(adaptive[1], overprov[1])
    for a, o in zip(adaptive[2].layers.values(), overprov[2].layers.values(), strict=True):
        assert (a.hits, a.late, a.misses, a.prefetch_issued) == (o.hits, o.late, o.misses, o.prefetch_issued)
        assert a.late == 0 and a.prefetch_issued > 0
