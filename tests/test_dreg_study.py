"""The DREG study v2: the tiny profile end to end, and the verdict logic on synthetic results
whose answer is known (supported, not supported, underpowered)."""
import numpy as np
import pytest

from dreg_study_analysis import (
    NOT_SUPPORTED,
    SUPPORTED,
    UNDERPOWERED,
    analyse,
    select_protocol,
    flatten,
    verdict,
    write_report,
)

LAMBDA = 10 ** -2.5


@pytest.mark.slow  # the default suite's time budget; `make test-slow` runs it
def test_tiny_profile_end_to_end(tmp_path, load_experiment):
    study = load_experiment("dreg_study")
    specs, grid = study.study_specs(study.PROFILES["full"])
    # 4 activations x 8 datasets x 5 seeds x 2 fractions x 19 arm-strengths, less DREG-act's
    # grid under ReLU (a forced tie at every strength)
    assert len(specs) == 5840 and sum(grid) == 3040
    records = study.main(["--profile", "tiny", "--out", str(tmp_path), "--no-progress"])
    assert len(records) == 88 and all(r["status"] == "ok" for r in records)
    assert all("validation_accuracy" in r["metrics"] for r in records)
    report = (tmp_path / "report.md").read_text()
    for section in ("Summary (copied into docs/history/dreg_v2.md)", "Verdicts in full", "paper protocol", "fair protocol",
                    "Scarcity interaction", "Per dataset over seeds", "DREG's scaling, decided on validation data",
                    "docs/papers.md"):
        assert section in report
    assert "../shared" not in report
    for fig in ("accuracy_by_regime.png", "tuning_picks.png", "jacobian_norms.png", "tau_distributions.png"):
        assert (tmp_path / fig).stat().st_size > 1000
    # resumable: a second invocation runs nothing and reports the same table
    again = study.main(["--profile", "tiny", "--out", str(tmp_path), "--no-progress"])
    assert [r["run_id"] for r in again] == [r["run_id"] for r in records]


def _record(dataset, act, kind, seed, frac, acc, val=None, robust=None, scope="activation", strength=None):
    metrics = {"test_accuracy": acc, "robust_accuracy": acc - 0.1 if robust is None else robust, "tau": 1.0,
               "jacobian_sq_norms": [1.0]}
    if val is not None:
        metrics["validation_accuracy"] = val
    return {"status": "ok", "seconds": 0.0, "hparams": {"strength": strength},
            "spec": {"dataset": dataset, "seed": seed, "data_fraction": frac,
                     "config": {"model": {"activation": act, "hidden": [4]},
                                "regularizer": {"kind": kind, "dreg_scope": scope, "strength": strength}}},
            "metrics": metrics}


def _synthetic(effect, datasets=("digits", "mnist1d", "breast_cancer", "reviews", "wine", "pima"),
               activations=("gelu", "tanh"), seeds=5, scarce_extra=0.0, relu=False):
    """DREG (both arms) = baseline + ``effect`` (+ ``scarce_extra`` at 10%), others = baseline;
    per-cell baselines and small seed noise so no pair ties."""
    rng = np.random.default_rng(0)
    strengths = {"none": None, "weight_decay": 0.05, "igpen": 0.01}
    recs = []
    for d_i, ds in enumerate(datasets):
        for act in activations + (("relu",) if relu else ()):
            for seed in range(seeds):
                for frac in (0.1, 1.0):
                    base = 0.7 + 0.02 * d_i - (0.1 if frac == 0.1 else 0.0) + 0.01 * rng.random()
                    for kind, s in strengths.items():
                        acc = base + 0.001 * rng.random()
                        recs.append(_record(ds, act, kind, seed, frac, acc, val=acc, strength=s))
                    for scope in ("activation", "layer"):
                        if act == "relu" and scope == "activation":  # a forced tie: none's run
                            acc = recs[-3]["metrics"]["test_accuracy"]
                        else:
                            acc = base + effect + (scarce_extra if frac == 0.1 else 0.0) + 0.001 * rng.random()
                        recs.append(_record(ds, act, "dreg", seed, frac, acc, val=acc, scope=scope, strength=LAMBDA))
    return recs


def _verdicts(a, protocol="paper", arm="dreg_act"):
    return {claim: v for claim, v, _ in a["claims"][(protocol, arm, False)]}


def test_verdict_rule():
    good = {"mean_diff": 0.01, "p_holm": 0.01, "underpowered": False}
    assert verdict(True, [good, good]) == SUPPORTED
    assert verdict(False, [good]) == NOT_SUPPORTED
    assert verdict(True, [good, {**good, "mean_diff": -0.01}]) == NOT_SUPPORTED
    assert verdict(True, [good, {**good, "p_holm": 0.3}]) == NOT_SUPPORTED  # could have reached alpha
    assert verdict(True, [good, {**good, "p_holm": 0.3, "underpowered": True}]) == UNDERPOWERED


def test_synthetic_supported():
    a = analyse(_synthetic(effect=0.05, scarce_extra=0.03))
    for arm in ("dreg_act", "dreg_layer"):
        v = _verdicts(a, arm=arm)
        assert v["best on clean accuracy, Wilcoxon p <= 0.031 vs none, WD, IGPen"] == SUPPORTED
        assert v["best overall"] == SUPPORTED
        assert v["gains largest under data scarcity (interaction vs each regularizer)"] == SUPPORTED
    pooled = [t for t in a["tests"] if t["family"] == "pooled" and t["regime"] == "clean"]
    assert all(t["n"] == 12 and t["wins"] == 12 and t["p_greater"] == 0.5 ** 12 for t in pooled)


def test_synthetic_not_supported():
    a = analyse(_synthetic(effect=-0.05))
    v = _verdicts(a)
    assert v["best on clean accuracy, Wilcoxon p <= 0.031 vs none, WD, IGPen"] == NOT_SUPPORTED
    assert v["best overall"] == NOT_SUPPORTED
    assert v["gains largest under data scarcity (interaction vs each regularizer)"] == NOT_SUPPORTED


def test_synthetic_underpowered():
    # two datasets x one activation: 2 pooled cells, p >= 1/4 whatever the effect
    a = analyse(_synthetic(effect=0.05, datasets=("digits", "mnist1d"), activations=("gelu",), seeds=3))
    assert _verdicts(a)["best on clean accuracy, Wilcoxon p <= 0.031 vs none, WD, IGPen"] == UNDERPOWERED
    assert all(t["underpowered"] for t in a["tests"])


def test_forced_ties_are_left_out_of_dreg_act_tests():
    a = analyse(_synthetic(effect=0.05, relu=True))
    act = [t for t in a["tests"] if t["arm"] == "dreg_act" and t["family"] == "pooled"]
    layer = [t for t in a["tests"] if t["arm"] == "dreg_layer" and t["family"] == "pooled"]
    assert {t["n"] for t in act} == {12} and {t["n"] for t in layer} == {18}  # ReLU cells only for DREG-layer


def test_fair_protocol_picks_on_validation_never_test():
    recs = []
    for seed in range(3):
        for s, val, test in ((LAMBDA, 0.80, 0.90), (10 * LAMBDA, 0.85, 0.70)):
            recs.append(_record("digits", "gelu", "dreg", seed, 1.0, test, val=val, strength=s))
        recs.append(_record("digits", "gelu", "none", seed, 1.0, 0.8, val=0.8))
    rows = flatten(recs)
    _, fair = select_protocol(rows, "fair", {"dreg_act": LAMBDA, "none": None})
    _, paper = select_protocol(rows, "paper", {"dreg_act": LAMBDA, "none": None})
    assert fair[("digits", "gelu", 1.0, "dreg_act")] == pytest.approx(10 * LAMBDA)  # higher validation
    assert paper[("digits", "gelu", 1.0, "dreg_act")] == pytest.approx(LAMBDA)


def test_unlearnable_dataset_is_reported_apart(tmp_path):
    recs = _synthetic(effect=0.05)
    for r in recs:  # mnist1d at chance on validation (10 classes)
        if r["spec"]["dataset"] == "mnist1d":
            r["metrics"]["validation_accuracy"] = 0.12
    a = analyse(recs)
    assert "mnist1d" not in a["learnable"] and "digits" in a["learnable"]
    assert not any(t.get("dataset") == "mnist1d" for t in a["tests"])
    write_report(recs, tmp_path, {"profile": "synthetic"})
    assert "mnist1d (validation 12.00%, chance 10.00%)" in (tmp_path / "report.md").read_text()
