"""Statistics functions against hand-computed cases."""
import numpy as np
import pytest

from dreg_jax.analysis import average_ranks, bonferroni, paired_wilcoxon, win_rates


def test_average_ranks_with_ties():
    scores = np.array([[0.9, 0.8, 0.8], [0.5, 0.7, 0.6]])
    # cell 1: ranks 1, 2.5, 2.5; cell 2: ranks 3, 1, 2
    np.testing.assert_allclose(average_ranks(scores), [2.0, 1.75, 2.25])
    with pytest.raises(ValueError, match="cells, methods"):
        average_ranks(np.zeros(3))


def test_wilcoxon_exact_small_sample():
    a = np.array([1.0, 2, 3, 4, 5]) + 10
    b = np.full(5, 10.0)
    r = paired_wilcoxon(a, b)
    # all 5 differences positive: exact two-sided p = 2 / 2**5
    assert r["p"] == pytest.approx(2 / 32)
    assert (r["wins"], r["ties"], r["losses"]) == (5, 0, 0) and r["median_diff"] == 3.0
    # a zero difference is dropped: 4 positive non-zero differences -> p = 2 / 16
    r = paired_wilcoxon([1.0, 2, 3, 4, 0], [0, 0, 0, 0, 0])
    assert r["p"] == pytest.approx(2 / 16) and r["ties"] == 1
    assert paired_wilcoxon([1, 2], [1, 2])["p"] == 1.0
    with pytest.raises(ValueError, match="matched"):
        paired_wilcoxon([1, 2], [1])


def test_wilcoxon_statistic_is_smaller_rank_sum():
    # diffs: +1, -2, +3, +4 -> ranks 1, 2, 3, 4; W- = 2, W+ = 8; statistic = min = 2
    r = paired_wilcoxon([1.0, -2, 3, 4], [0, 0, 0, 0])
    assert r["statistic"] == 2.0 and r["p"] == pytest.approx(0.375)


def test_bonferroni_and_win_rates():
    np.testing.assert_allclose(bonferroni([0.01, 0.3, 0.5]), [0.03, 0.9, 1.0])
    np.testing.assert_allclose(bonferroni([0.01], m=5), [0.05])
    scores = np.array([[1.0, 0.5], [0.2, 0.2], [0.1, 0.9]])
    np.testing.assert_allclose(win_rates(scores), [0.5, 0.5])  # win, tie (half each), loss


@pytest.mark.parametrize("n", [3, 5, 10, 20])
def test_smallest_wilcoxon_p_is_scipy_exact_for_all_wins(n):
    from dreg_jax.analysis import power_note, smallest_wilcoxon_p

    a, b = np.arange(1, n + 1, dtype=float) + 0.5, np.zeros(n)  # every pair won, distinct ranks
    np.testing.assert_allclose(paired_wilcoxon(a, b)["p"], smallest_wilcoxon_p(n), rtol=1e-9)
    assert ("CANNOT" in power_note(n, 60)) == (smallest_wilcoxon_p(n) * 60 > 0.05)
