"""Statistics for comparing regularizers over matched cells (dataset, activation, seed).

* :func:`average_ranks`: rank the methods within each cell (1 = highest accuracy, ties get
  the mean of their ranks, as ``scipy.stats.rankdata``), then average over cells.
* :func:`paired_wilcoxon`: two-sided Wilcoxon signed-rank test of ``a - b`` over matched
  cells (``scipy.stats.wilcoxon``, zero differences dropped as in Wilcoxon's original method);
  p = 1 when every difference is zero.
* :func:`bonferroni`: ``min(1, p * m)`` for ``m`` comparisons.
* :func:`win_rates`: the share of cells each method wins (ties share the win equally).
"""
from __future__ import annotations

import numpy as np
from scipy import stats


def average_ranks(scores: np.ndarray) -> np.ndarray:
    """``scores``: ``(cells, methods)``, higher is better. Returns ``(methods,)`` mean ranks."""
    scores = np.asarray(scores, float)
    if scores.ndim != 2 or scores.shape[0] == 0:
        raise ValueError(f"scores must be (cells, methods) with at least one cell, got {scores.shape}")
    ranks = np.apply_along_axis(lambda row: stats.rankdata(-row), 1, scores)
    return ranks.mean(axis=0)


def paired_wilcoxon(a, b) -> dict:
    """Two-sided signed-rank test of paired samples; also wins/ties/losses and median diff."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a and b must be matched 1-D samples, got {a.shape} and {b.shape}")
    diff = a - b
    out = {"n": int(diff.size), "wins": int((diff > 0).sum()), "ties": int((diff == 0).sum()),
           "losses": int((diff < 0).sum()), "median_diff": float(np.median(diff)) if diff.size else 0.0,
           "mean_diff": float(diff.mean()) if diff.size else 0.0}
    if not np.any(diff != 0):
        out.update(statistic=0.0, p=1.0)
        return out
    res = stats.wilcoxon(a, b, zero_method="wilcox", alternative="two-sided")
    out.update(statistic=float(res.statistic), p=float(res.pvalue))
    return out


def smallest_wilcoxon_p(n: int) -> float:
    """The smallest two-sided exact signed-rank p-value with ``n`` pairs: ``2 / 2**n``.

    With ``m`` Bonferroni-corrected tests nothing can be significant at ``alpha`` unless
    ``m * 2 / 2**n <= alpha``: reports state this so a null result is not mistaken for evidence.
    """
    return min(1.0, 2.0 / 2.0 ** n)


def power_note(seeds: int, tests: int, alpha: float = 0.05) -> str:
    """One sentence: the smallest p attainable with ``seeds`` pairs, before and after correction."""
    p = smallest_wilcoxon_p(seeds)
    reach = "can" if p * tests <= alpha else "CANNOT"
    return (f"with {seeds} seeds the smallest two-sided Wilcoxon p is {p:.3g}, {min(1.0, p * tests):.3g} after "
            f"Bonferroni over {tests}, so a difference {reach} reach alpha = {alpha}")


def bonferroni(pvalues, m: int | None = None) -> np.ndarray:
    p = np.asarray(pvalues, float)
    return np.minimum(1.0, p * (p.size if m is None else m))


def win_rates(scores: np.ndarray) -> np.ndarray:
    """``(methods,)`` share of cells (rows) where each method has the best score."""
    scores = np.asarray(scores, float)
    best = scores == scores.max(axis=1, keepdims=True)
    return (best / best.sum(axis=1, keepdims=True)).mean(axis=0)


def signed_rank_test(a, b) -> dict:
    """Paired Wilcoxon signed-rank test of ``a - b``, one- and two-sided.

    Exact p-values (the null distribution of the signed-rank sum) when there are at most 50
    non-zero differences and no tied magnitudes, else scipy's normal approximation
    (``method`` says which). Zero differences are dropped (Wilcoxon's method).

    Returns:
      ``n`` pairs, ``nonzero``, ``wins/ties/losses`` (a > b, =, <), ``mean_diff``,
      ``median_diff``, ``p_greater`` (one-sided, H1: a > b), ``p_two_sided``, ``method`` and
      ``min_p_greater`` = ``2**-nonzero``, the smallest one-sided exact p these pairs allow.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a and b must be matched 1-D samples, got {a.shape} and {b.shape}")
    diff = a - b
    nonzero = diff[diff != 0]
    out = {"n": int(diff.size), "nonzero": int(nonzero.size), "wins": int((diff > 0).sum()),
           "ties": int((diff == 0).sum()), "losses": int((diff < 0).sum()),
           "mean_diff": float(diff.mean()) if diff.size else 0.0,
           "median_diff": float(np.median(diff)) if diff.size else 0.0,
           "min_p_greater": 0.5 ** nonzero.size}
    if nonzero.size == 0:
        out.update(p_greater=1.0, p_two_sided=1.0, method="none (all pairs tied)")
        return out
    tied = len(np.unique(np.abs(nonzero))) < nonzero.size
    method = "exact" if nonzero.size <= 50 and not tied else "approx"
    greater = stats.wilcoxon(nonzero, alternative="greater", method=method)
    two = stats.wilcoxon(nonzero, alternative="two-sided", method=method)
    out.update(p_greater=float(greater.pvalue), p_two_sided=float(two.pvalue), method=method)
    return out


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control, uniformly more
    powerful than Bonferroni): sorted ascending, ``p_(i) * (m - i + 1)``, made monotone."""
    p = np.asarray(pvalues, float)
    m = p.size
    if m == 0:
        return p
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    out = np.empty(m)
    out[order] = adjusted
    return out


def pairs_needed(tests: int, alpha: float = 0.05) -> int:
    """The fewest pairs with which a one-sided exact signed-rank test can reach ``alpha`` after
    correcting for ``tests`` tests (Bonferroni bound of Holm's first step): ``2**-n <= alpha / tests``."""
    return int(np.ceil(np.log2(tests / alpha)))
