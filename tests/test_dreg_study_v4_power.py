"""The v4 power simulation (experiments/dreg_study_v4_power.py): its spreads are v3's committed
raw results read again, and its power behaves as power must (closed-form edges)."""
import json
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def power_module(load_experiment):
    return load_experiment("dreg_study_v4_power")


def test_committed_spreads_are_v3s_raw_results_read_again(power_module):
    committed = json.loads((ROOT / "docs" / "results" / "dreg_study_v4_power" / "power.json").read_text())
    again = power_module.v3_spreads()
    assert again.keys() == committed["spreads"].keys()
    for name, spread in again.items():
        for key, value in spread.items():
            assert value == pytest.approx(committed["spreads"][name][key], rel=1e-12), (name, key)


def test_power_is_one_for_a_sure_effect_near_alpha_at_none_and_grows_with_datasets(power_module):
    rng = np.random.default_rng(0)
    assert power_module.power(20, 0.0, 1e-6, 1.0, 200, rng) == 1.0
    null = power_module.power(30, 1.0, 1.0, 0.0, 4000, rng)
    assert null <= power_module.ALPHA / power_module.PRIMARY + 0.01  # one-sided alpha / 2, Monte Carlo slack
    small, large = (power_module.power(n, 1.0, 1.0, 0.5, 2000, rng) for n in (15, 60))
    assert small < large
    # a t-test's power at the same effect bounds the signed-rank test's from above, roughly
    from scipy import stats

    n, tau, sigma = 60, 1.0, 1.0
    scale = np.sqrt(tau ** 2 + sigma ** 2 / power_module.SEEDS)
    t_power = 1 - stats.nct.cdf(stats.t.ppf(1 - 0.025, n - 1), n - 1, 0.5 / scale * np.sqrt(n))
    assert abs(large - t_power) < 0.08
