r"""Effect sizes with intervals, exact signed-rank tests with ties, and four-word verdicts.

The DREG study v3 (``docs/preregistration.md``) judges every claim by these functions:

* :func:`exact_signed_rank`: the Wilcoxon signed-rank test with its **exact** null
  distribution whatever the data: differences within ``tol`` of zero are zeros (dropped,
  Wilcoxon's method), magnitudes within ``tol`` of each other are ties (mid-ranks), and the
  null distribution of :math:`T^+ = \sum_{d_i > 0} r_i` over the :math:`2^n` sign patterns is
  counted by dynamic programming over doubled mid-ranks (integers), so ties and zeros never send
  it to a normal approximation. One-sided :math:`p = P(T^+ \ge t)`; two-sided
  :math:`\min(1, 2 \min(P(T^+ \ge t), P(T^+ \le t)))`.
* :func:`hierarchical_bootstrap`: the mean difference over units (datasets) of the mean over
  seeds, with a percentile interval from resampling datasets, then seeds within each drawn
  dataset (both with replacement).
* :func:`verdict`: SUPPORTED, CONTRADICTED, EQUIVALENT or INCONCLUSIVE from the interval, the
  Holm-adjusted p and the equivalence margin (rules in its docstring); :func:`combine` joins a
  claim's components; :func:`can_reach` says whether ``n`` units can reach ``alpha`` at a given
  Holm step at all (an honest "not measured well enough").
"""
from __future__ import annotations

import math

import numpy as np

#: Differences (and gaps between magnitudes) at most this large are floating-point residues:
#: accuracies are multiples of 1/rows, so real differences are far larger.
TOLERANCE = 1e-9

VERDICTS = ("SUPPORTED", "CONTRADICTED", "EQUIVALENT", "INCONCLUSIVE")


def _midranks(magnitudes: np.ndarray, tol: float) -> np.ndarray:
    """Mid-ranks (1-based) of ``magnitudes``, values within ``tol`` of their sorted neighbour tied."""
    order = np.argsort(magnitudes, kind="stable")
    sorted_m = magnitudes[order]
    ranks = np.empty(len(magnitudes))
    start = 0
    for i in range(1, len(sorted_m) + 1):
        if i == len(sorted_m) or sorted_m[i] - sorted_m[i - 1] > tol:
            ranks[order[start:i]] = (start + 1 + i) / 2.0
            start = i
    return ranks


def signed_rank_null(doubled_ranks) -> np.ndarray:
    """Counts of each value of :math:`2T^+` over all :math:`2^n` sign patterns (exact integers as
    float64 up to n ~ 1000): ``counts[k]`` patterns give :math:`2T^+ = k`."""
    doubled_ranks = [int(r) for r in doubled_ranks]
    counts = np.zeros(sum(doubled_ranks) + 1)
    counts[0] = 1.0
    for r in doubled_ranks:
        shifted = np.zeros_like(counts)
        shifted[r:] = counts[: len(counts) - r]
        counts = counts + shifted
    return counts


def exact_signed_rank(differences, tol: float = TOLERANCE) -> dict:
    """Exact Wilcoxon signed-rank test of paired ``differences`` (module docs).

    Returns:
      ``n`` (all pairs), ``nonzero``, ``wins/ties/losses`` (tolerance applied), ``statistic``
      (:math:`T^+`), ``p_greater`` (H1: differences > 0), ``p_less``, ``p_two_sided`` and
      ``min_p`` (the smallest one-sided p these nonzero pairs allow, :math:`2^{-n}` without ties).
    """
    d = np.asarray(differences, np.float64).reshape(-1)
    if not np.isfinite(d).all():
        raise ValueError("differences must be finite (a NaN accuracy means a run that did not finish)")
    d = np.where(np.abs(d) <= tol, 0.0, d)
    nonzero = d[d != 0]
    out = {"n": int(d.size), "nonzero": int(nonzero.size), "wins": int((d > 0).sum()),
           "ties": int((d == 0).sum()), "losses": int((d < 0).sum())}
    if nonzero.size == 0:
        return {**out, "statistic": 0.0, "p_greater": 1.0, "p_less": 1.0, "p_two_sided": 1.0, "min_p": 1.0}
    doubled = np.rint(2 * _midranks(np.abs(nonzero), tol)).astype(int)
    counts = signed_rank_null(doubled)
    total = counts.sum()
    t2 = int(doubled[nonzero > 0].sum())
    p_greater = float(counts[t2:].sum() / total)
    p_less = float(counts[: t2 + 1].sum() / total)
    min_p = float(counts[-1] / total)
    return {**out, "statistic": t2 / 2.0, "p_greater": p_greater, "p_less": p_less,
            "p_two_sided": min(1.0, 2.0 * min(p_greater, p_less)), "min_p": min_p}


def exact_permutation_difference(group_a, group_b) -> dict:
    """Exact one-sided permutation test that ``mean(group_a) > mean(group_b)`` (two independent
    groups of units, e.g. messy against clean datasets): every split of the pooled values into
    groups of the same sizes. Returns ``p_greater``, ``p_less`` and ``min_p`` = 1 / splits."""
    import itertools

    a, b = np.asarray(group_a, float), np.asarray(group_b, float)
    pooled = np.concatenate([a, b])
    n, k = len(pooled), len(a)
    splits = math.comb(n, k)
    if splits > 2_000_000:
        raise ValueError(f"{splits} splits is too many to enumerate")
    observed = a.mean() - b.mean()
    total = pooled.sum()
    sums = np.array([pooled[list(c)].sum() for c in itertools.combinations(range(n), k)])
    diffs = sums / k - (total - sums) / (n - k)
    return {"p_greater": float(np.mean(diffs >= observed - TOLERANCE)),
            "p_less": float(np.mean(diffs <= observed + TOLERANCE)), "min_p": 1.0 / splits}


def hierarchical_bootstrap(effects: dict, resamples: int = 4000, seed: int = 0, level: float = 0.95,
                           keep_draws: bool = False) -> dict:
    """Mean over units of the mean over seeds, with a hierarchical percentile interval.

    Args:
      effects: ``{unit: per-seed differences}`` (e.g. ``{dataset: [acc_A - acc_B per seed]}``).
      resamples: bootstrap draws.
      seed: the resampling seed (fixed, so reports rebuild byte for byte).
      level: interval coverage.

    Returns:
      ``mean`` (the point estimate), ``low``, ``high``, ``units``, ``per_unit`` (unit means),
      and ``draws`` (every resampled mean) with ``keep_draws``.
    """
    units = sorted(effects)
    if not units:
        raise ValueError("no units to bootstrap")
    values = [np.asarray(effects[u], np.float64).reshape(-1) for u in units]
    if any(v.size == 0 or not np.isfinite(v).all() for v in values):
        raise ValueError("every unit needs at least one finite per-seed difference")
    rng = np.random.default_rng(seed)
    n = len(units)
    per_unit = np.array([v.mean() for v in values])
    picks = rng.integers(0, n, size=(resamples, n))  # datasets, with replacement
    sizes = np.array([v.size for v in values])
    if len(set(sizes.tolist())) == 1:  # every unit has the same seeds: one gather
        s = int(sizes[0])
        table = np.stack(values)  # (units, seeds)
        inner = rng.integers(0, s, size=(resamples, n, s))  # seeds within each drawn dataset
        draws = table[picks[..., None], inner].mean(axis=2).mean(axis=1)
    else:  # ragged: pad, draw within each unit's own size, average over its own seeds only
        width = int(sizes.max())
        table = np.zeros((n, width))
        for j, v in enumerate(values):
            table[j, : v.size] = v
        own = sizes[picks][..., None]  # (resamples, n, 1)
        inner = (rng.random((resamples, n, width)) * own).astype(int)
        used = np.arange(width) < own
        draws = ((table[picks[..., None], inner] * used).sum(axis=2) / own[..., 0]).mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(draws, [alpha, 1 - alpha])
    out = {"mean": float(per_unit.mean()), "low": float(low), "high": float(high), "units": n,
           "per_unit": dict(zip(units, per_unit.tolist()))}
    if keep_draws:
        out["draws"] = draws
    return out


def can_reach(min_p: float, alpha: float, tests: int) -> bool:
    """Whether a test whose smallest attainable p is ``min_p`` can be significant under Holm at
    the **first** step (``alpha / tests``): if not, it can never be (no step is stricter)."""
    return min_p <= alpha / tests


def verdict(low: float, high: float, p_holm: float, margin: float, alpha: float = 0.05,
            claim: str = "greater") -> str:
    """The four-word verdict of one comparison, effect = claimed-better minus rival (pp).

    ``claim="greater"`` (A beats B):

    * SUPPORTED: the interval lies above 0 and the Holm-adjusted one-sided p <= alpha;
    * CONTRADICTED: the interval lies below 0 (B beats A);
    * EQUIVALENT: the interval lies inside (-margin, +margin): no difference as large as the
      margin either way, so the claimed advantage is ruled out at that size;
    * INCONCLUSIVE: anything else (too little data to tell).

    ``claim="equivalent"`` (A is as good as B, e.g. a fixed lambda against a tuned one):
    SUPPORTED when the interval lies inside (-margin, +margin); CONTRADICTED when it lies
    wholly outside it (beyond +margin or beyond -margin); INCONCLUSIVE otherwise.
    """
    if not (np.isfinite(low) and np.isfinite(high)) or low > high:
        raise ValueError(f"bad interval [{low}, {high}]")
    if claim == "equivalent":
        if -margin < low and high < margin:
            return "SUPPORTED"
        if low >= margin or high <= -margin:
            return "CONTRADICTED"
        return "INCONCLUSIVE"
    if claim != "greater":
        raise ValueError(f"claim must be 'greater' or 'equivalent', got {claim!r}")
    if low > 0 and p_holm <= alpha:
        return "SUPPORTED"
    if high < 0:
        return "CONTRADICTED"
    if -margin < low and high < margin:
        return "EQUIVALENT"
    return "INCONCLUSIVE"


def combine(components) -> str:
    """A claim made of several comparisons that must all hold ("DREG beats none, WD and IGPen"):
    CONTRADICTED if any is; else SUPPORTED if all are; else EQUIVALENT if any is (that rival
    is matched, not beaten, so the claim fails at the margin's size); else INCONCLUSIVE.
    One underpowered component never hides another that clearly fails."""
    components = list(components)
    if not components:
        raise ValueError("a claim needs at least one comparison")
    unknown = set(components) - set(VERDICTS)
    if unknown:
        raise ValueError(f"unknown verdict(s) {sorted(unknown)}")
    if "CONTRADICTED" in components:
        return "CONTRADICTED"
    if all(c == "SUPPORTED" for c in components):
        return "SUPPORTED"
    if "EQUIVALENT" in components:
        return "EQUIVALENT"
    return "INCONCLUSIVE"


__all__ = ["TOLERANCE", "VERDICTS", "can_reach", "combine", "exact_permutation_difference", "exact_signed_rank",
           "hierarchical_bootstrap", "signed_rank_null", "verdict"]
