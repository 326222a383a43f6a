"""The v3 statistics against independent references: brute-force enumeration of sign patterns
(with ties and zeros), scipy where it is exact, a bootstrap's coverage on synthetic data of
known mean, and the verdict rules on synthetic results of known answer."""
import itertools

import numpy as np
import pytest
from scipy import stats

from dreg_jax.analysis.effects import (
    can_reach,
    combine,
    exact_permutation_difference,
    exact_signed_rank,
    hierarchical_bootstrap,
    verdict,
)


def brute_force(d):
    """Every sign pattern of the nonzero |d| with scipy's mid-ranks: the reference p-values."""
    d = np.asarray(d, float)
    nz = d[d != 0]
    ranks = stats.rankdata(np.abs(nz))
    t = ranks[nz > 0].sum()
    sums = np.array([sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product([0, 1], repeat=len(nz))])
    return np.mean(sums >= t - 1e-12), np.mean(sums <= t + 1e-12)


CASES = {
    "no ties": [0.3, -0.1, 0.5, 0.2, 0.7, -0.4, 0.9],
    "tied magnitudes": [0.2, -0.2, 0.2, 0.4, 0.4, -0.1, 0.2, 0.6],
    "zeros and ties": [0.0, 0.1, 0.1, -0.1, 0.0, 0.3, 0.3, 0.3],
    "all positive, tied": [1 / 60, 1 / 60, 2 / 60, 1 / 60, 1 / 60],
    "one pair": [0.5],
    "all tied magnitudes, mixed signs": [0.25, -0.25, 0.25, 0.25, -0.25, 0.25],
}


@pytest.mark.parametrize("name", CASES)
def test_exact_signed_rank_matches_enumeration(name):
    d = CASES[name]
    greater, less = brute_force(d)
    r = exact_signed_rank(d)
    assert r["p_greater"] == pytest.approx(greater, abs=1e-12)
    assert r["p_less"] == pytest.approx(less, abs=1e-12)
    assert r["p_two_sided"] == pytest.approx(min(1.0, 2 * min(greater, less)), abs=1e-12)


def test_five_of_five_tied_wins_is_never_below_the_exact_floor():
    # the v2 case: 5 wins with tied magnitudes got the normal approximation's 0.0211 < 1/32
    r = exact_signed_rank([0.02, 0.02, 0.04, 0.02, 0.02])
    assert r["p_greater"] == pytest.approx(1 / 32) and r["min_p"] == pytest.approx(1 / 32)
    assert r["p_two_sided"] == pytest.approx(2 / 32)


def test_float_residues_are_zeros_and_ties():
    residue = 1e-16
    r = exact_signed_rank([residue, -residue, 0.1, 0.1 + 1e-15, -0.2])
    assert (r["ties"], r["wins"], r["losses"]) == (2, 2, 1)
    clean = exact_signed_rank([0.0, 0.0, 0.1, 0.1, -0.2])
    assert r["p_greater"] == clean["p_greater"] and r["p_less"] == clean["p_less"]


def test_matches_scipy_exact_without_ties():
    rng = np.random.default_rng(0)
    for n in (6, 12, 20):
        d = rng.normal(0.3, 1, size=n)
        ours = exact_signed_rank(d)
        theirs = stats.wilcoxon(d, alternative="greater", method="exact").pvalue
        assert ours["p_greater"] == pytest.approx(theirs, rel=1e-9)


def test_permutation_test_against_enumeration():
    a, b = [3.0, 2.5, 2.0], [0.1, 0.5, -0.2, 0.0, 1.0]
    r = exact_permutation_difference(a, b)
    assert r["p_greater"] == pytest.approx(1 / 56) and r["min_p"] == pytest.approx(1 / 56)


@pytest.mark.parametrize("seeds_per_unit", ["equal", "ragged"])
def test_hierarchical_bootstrap_covers_the_true_mean(seeds_per_unit):
    """95% intervals on synthetic two-level data (dataset effects ~ N(mu, 1), seeds ~ N(0, 0.5)):
    coverage of the true mean over 200 replications within the binomial band."""
    rng = np.random.default_rng(1)
    mu, hits, reps = 0.7, 0, 200
    for r in range(reps):
        units = {}
        for u in range(12):
            s = 10 if seeds_per_unit == "equal" else 5 + u % 6
            units[u] = rng.normal(0, 1) + mu + rng.normal(0, 0.5, size=s)
        ci = hierarchical_bootstrap(units, resamples=600, seed=r)
        hits += ci["low"] <= mu <= ci["high"]
    coverage = hits / reps
    # percentile intervals with 12 units run a little narrow; a broken resampler (seeds only,
    # or no dataset level) covers far less (~40%)
    assert 0.85 <= coverage <= 0.99, coverage


def test_bootstrap_resamples_datasets_not_only_seeds():
    # all spread between datasets, none within: the interval must still be wide
    units = {u: np.full(10, float(u)) for u in range(12)}
    ci = hierarchical_bootstrap(units, resamples=2000)
    assert ci["high"] - ci["low"] > 2.0 and ci["mean"] == pytest.approx(5.5)


@pytest.mark.parametrize("low,high,p,expected", [
    (0.4, 1.6, 0.001, "SUPPORTED"),
    (0.4, 1.6, 0.2, "INCONCLUSIVE"),      # interval above 0 but Holm p too large
    (-1.5, -0.2, 0.9, "CONTRADICTED"),
    (-0.3, 0.4, 0.3, "EQUIVALENT"),       # inside the 0.5 pp margin
    (-0.3, 0.9, 0.2, "INCONCLUSIVE"),     # crosses 0 and the margin
    (0.1, 0.4, 0.001, "SUPPORTED"),       # significant, even if small
])
def test_verdict_rules(low, high, p, expected):
    assert verdict(low, high, p, margin=0.5) == expected


@pytest.mark.parametrize("low,high,expected", [
    (-0.2, 0.3, "SUPPORTED"), (0.6, 1.2, "CONTRADICTED"), (-1.2, -0.7, "CONTRADICTED"), (-0.2, 0.8, "INCONCLUSIVE")])
def test_equivalence_claim_verdicts(low, high, expected):
    assert verdict(low, high, 1.0, margin=0.5, claim="equivalent") == expected


def test_combined_claims_and_the_mixed_underpowered_case():
    assert combine(["SUPPORTED", "SUPPORTED"]) == "SUPPORTED"
    # one comparison could never reach alpha (too few units) while another clearly fails: the
    # claim is CONTRADICTED, not "underpowered"
    assert combine(["INCONCLUSIVE", "CONTRADICTED"]) == "CONTRADICTED"
    assert combine(["SUPPORTED", "EQUIVALENT", "INCONCLUSIVE"]) == "EQUIVALENT"
    assert combine(["SUPPORTED", "INCONCLUSIVE"]) == "INCONCLUSIVE"
    with pytest.raises(ValueError):
        combine(["MAYBE"])


def test_holm_aware_reach():
    # 7 units: smallest one-sided p 1/128 ~ 0.0078; with 22 tests Holm's first step needs 0.0023
    assert not can_reach(exact_signed_rank(np.ones(7))["min_p"], 0.05, 22)
    assert can_reach(exact_signed_rank(np.ones(12))["min_p"], 0.05, 22)


def test_refuses_nan():
    with pytest.raises(ValueError, match="finite"):
        exact_signed_rank([0.1, np.nan])
