"""The DREG study's tiny profile end to end: sweep, statistics, report.md and figures."""
import numpy as np

from dreg_jax.analysis.dreg_study import analyse

def test_tiny_profile_end_to_end(tmp_path, load_experiment):
    study = load_experiment("dreg_study")
    assert len(study.PROFILES["full"].expand()) == 1920  # 960 runs x {10%, 100%} training data
    records = study.main(["--profile", "tiny", "--out", str(tmp_path), "--no-progress"])
    assert len(records) == 48 and all(r["status"] == "ok" for r in records)
    report = (tmp_path / "report.md").read_text()
    for section in ("Accuracy (%) and average rank", "paired Wilcoxon", "Per activation",
                    "published claims", "DREG best on clean accuracy"):
        assert section in report
    for fig in ("accuracy_by_regime.png", "win_rate_heatmap.png", "accuracy_vs_fraction.png",
                "jacobian_norms.png", "tau_distributions.png"):
        assert (tmp_path / fig).stat().st_size > 1000
    # resumable: a second invocation runs nothing and reports the same table
    again = study.main(["--profile", "tiny", "--out", str(tmp_path), "--no-progress"])
    assert [r["run_id"] for r in again] == [r["run_id"] for r in records]


def _record(dataset, act, reg, seed, frac, acc, robust):
    return {"status": "ok", "spec": {"dataset": dataset, "seed": seed, "data_fraction": frac,
            "config": {"model": {"activation": act, "hidden": [4]}, "regularizer": {"kind": reg}}},
            "metrics": {"test_accuracy": acc, "robust_accuracy": robust, "tau": 1.0, "jacobian_sq_norms": [1.0]}}


def test_regime_scores_and_ranks_hand_computed():
    recs = []
    for seed in range(3):
        recs += [_record("d", "gelu", "none", seed, 1.0, 0.80, 0.70), _record("d", "gelu", "dreg", seed, 1.0, 0.90, 0.60),
                 _record("d", "gelu", "none", seed, 0.1, 0.50, 0.40), _record("d", "gelu", "dreg", seed, 0.1, 0.60, 0.30)]
    a = analyse(recs)
    assert a["regs"] == ["none", "dreg"]
    np.testing.assert_allclose(a["means"]["clean"], [0.80, 0.90])
    np.testing.assert_allclose(a["means"]["noise"], [0.70, 0.60])
    np.testing.assert_allclose(a["means"]["scarcity"], [0.50, 0.60])
    np.testing.assert_allclose(a["means"]["overall"], [2.0 / 3, 2.1 / 3])
    np.testing.assert_allclose(a["ranks"]["clean"], [2.0, 1.0])
    np.testing.assert_allclose(a["ranks"]["noise"], [1.0, 2.0])
    t = a["wilcoxon"]["clean"]["none"]
    assert (t["wins"], t["losses"]) == (3, 0) and t["p"] == 0.25  # exact: 2 / 2**3


def test_chainzrule_demo_runs_and_dreg_lowers_the_penalty_terms(load_experiment):
    demo = load_experiment("demo")
    rows = demo.main(["--epochs", "3", "--seeds", "1", "--hidden", "16", "16", "--no-progress"])
    assert set(rows) == {"none", "dreg"}
    assert all(0.5 < r["accuracy_mean"] <= 1.0 for r in rows.values())
    # trained with DREG, the networks end with a smaller Jacobian penalty than without
    assert rows["dreg"]["dreg_penalty_at_default_lambda"] < rows["none"]["dreg_penalty_at_default_lambda"]
