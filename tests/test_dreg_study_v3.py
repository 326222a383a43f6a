"""The DREG study v3: its data draws (scarcity that scales the validation split, no test rows in
tuning), the fixed program layout across rounds, and (slow) the tiny profile end to end with a
byte-for-byte rebuild of its report."""
import numpy as np
import pytest

from dreg_jax.engine.grouping import plan_folds
from dreg_jax.training.config import TrainConfig


@pytest.fixture
def study(load_experiment):
    return load_experiment("dreg_study_v3")


def test_draws_scale_the_validation_split_and_tuning_sees_no_test_rows(study):
    from dreg_jax.data import load_dataset
    from dreg_jax.data.registry import USER_DATASETS

    profile = study.PROFILES["full"]
    base = load_dataset("pima")
    sizes = {}
    for fraction in (0.2, 0.5, 1.0):
        ds = USER_DATASETS[study.draw_dataset("pima", fraction, 3, profile, tuning=False)]
        n = len(ds.y_train) + len(ds.y_val)
        sizes[fraction] = n
        assert len(ds.y_val) == pytest.approx(0.2 * n, abs=2)  # the validation share of the subset
        assert abs(n - fraction * len(base.y_train)) <= 2
        np.testing.assert_array_equal(ds.x_test, base.x_test)  # the real test split, untouched
        rows = {r.tobytes() for r in base.x_train}
        assert all(r.tobytes() in rows for r in np.concatenate([ds.x_train, ds.x_val]))
        assert not {r.tobytes() for r in ds.x_train} & {r.tobytes() for r in ds.x_val}
    assert sizes[0.2] < sizes[0.5] < sizes[1.0]
    tuning = USER_DATASETS[study.draw_dataset("pima", 0.2, study.TUNING_DRAW, profile, tuning=True)]
    assert not tuning.x_test.any() and not tuning.y_test.any()  # placeholders: no test row
    assert all(not v.any() for v in tuning.robust.values())
    assert tuning.x_test.shape == base.x_test.shape  # the same programs serve both stages
    # each seed draws its own subset
    other = USER_DATASETS[study.draw_dataset("pima", 0.2, 4, profile, tuning=False)]
    assert not np.array_equal(other.x_train, USER_DATASETS[study.draw_dataset("pima", 0.2, 3, profile, False)].x_train)


def test_small_subsets_get_enough_steps(study):
    from dreg_jax.data.registry import USER_DATASETS

    profile = study.PROFILES["full"]
    name = study.draw_dataset("crabs", 0.2, 1, profile, tuning=False)
    epochs = study.epochs_for(name, profile)
    steps = epochs * -(-len(USER_DATASETS[name].y_train) // profile.batch_size)
    assert epochs >= profile.epochs and steps >= profile.min_steps


def test_activation_fold_is_the_same_whatever_is_pending():
    config = TrainConfig()
    full = plan_folds(config, {("relu", "dreg"): 10, ("gelu", "dreg"): 10, ("gelu", "igpen"): 4}, 100,
                      "activations", fold_activations=("relu", "gelu"))
    later = plan_folds(config, {("gelu", "dreg"): 1}, 100, "activations", fold_activations=("relu", "gelu"))
    assert later[0] in full and all(f.activations == ("relu", "gelu") for f in full + later)
    with pytest.raises(ValueError, match="fold_activations"):
        plan_folds(config, {("tanh", "dreg"): 1}, 100, "activations", fold_activations=("relu",))


def test_classical_rebuild_never_trains(tmp_path, load_experiment):
    classical = load_experiment("classical")
    with pytest.raises(SystemExit, match="never trains"):
        classical.classical_scores({"SVM": "svm"}, ["iris"], [1.0], 1, tmp_path / "c.json", False, cached_only=True)
    assert not (tmp_path / "c.json").exists()


@pytest.mark.slow
def test_tiny_profile_end_to_end_and_rebuild(tmp_path, study, load_experiment):
    study.main(["--profile", "tiny", "--out", str(tmp_path), "--no-progress"])
    report = (tmp_path / "report.md").read_text()
    for section in ("## Verdicts", "## Tuning convergence", "## Datasets", "hierarchical bootstrap"):
        assert section in report
    assert any(w in report for w in ("SUPPORTED", "CONTRADICTED", "EQUIVALENT", "INCONCLUSIVE"))
    records = study.read_compact(tmp_path / "results.jsonl.gz")
    assert {r["study"]["arm"] for r in records} == {*study.ARMS, *study.FIXED_ARMS}
    tuning = study.read_compact(tmp_path / "tuning.jsonl.gz")
    # stage 1 never scored a test row: its test arrays were zeros (all labels 0)
    assert tuning and all(r["spec"]["dataset"].endswith(f"d{study.TUNING_DRAW}") for r in tuning)
    (tmp_path / "report.md").unlink()
    rebuild = load_experiment("rebuild_report")
    rebuild.rebuild(tmp_path)
    assert (tmp_path / "report.md").read_text() == report


def synthetic_records(effects, datasets=12, seeds=10, noise=0.2, rng_seed=0):
    """Final-stage records whose accuracies are ``60 + effects[arm] (pp) + noise``, the same for
    clean and robust accuracy, per (dataset, fraction, activation, arm, seed)."""
    rng = np.random.default_rng(rng_seed)
    records = []
    for d in range(datasets):
        base = rng.normal(70, 5)
        for f in (0.2, 1.0):
            for act in ("relu", "gelu"):
                for seed in range(seeds):
                    for arm in ("none", "WD", "SN", "IGPen", "JacReg", "DREG-act", "DREG-layer",
                                "DREG-act fixed", "DREG-layer fixed"):
                        acc = (base + effects.get(arm, 0.0) + rng.normal(0, noise)) / 100
                        records.append({"status": "ok", "metrics": {"test_accuracy": acc, "robust_accuracy": acc},
                                        "study": {"dataset": f"set{d}", "fraction": f, "activation": act,
                                                  "arm": arm, "seed": seed}})
    return records


def synthetic_meta(datasets=12):
    picks = [{"dataset": f"set{d}", "fraction": 1.0, "activation": "gelu", "arm": "none",
              "validation_accuracy": 0.9} for d in range(datasets)]
    design = {"activations": ["relu", "gelu"], "fractions": [0.2, 1.0], "margin": 0.5, "alpha": 0.05,
              "bootstrap": 500}
    return {"design": design, "picks": picks, "majority": {f"set{d}": 0.5 for d in range(datasets)},
            "messy": ["set0", "set1", "set2"]}


def test_verdict_logic_on_synthetic_results_of_known_answer(load_experiment):
    analysis = load_experiment("dreg_study_v3_analysis")
    # DREG-act +2 pp above every rival (and SN); DREG-layer exactly like none; fixed lambda =
    # tuned for DREG-act, 3 pp worse for DREG-layer
    effects = {"DREG-act": 2.0, "DREG-act fixed": 2.0, "DREG-layer fixed": -3.0}
    a = analysis.analyse(synthetic_records(effects), synthetic_meta())
    v = a["verdicts"]
    assert v[("C1", "DREG-act")] == "SUPPORTED"
    assert v[("C1", "DREG-layer")] == "EQUIVALENT"
    assert v[("C2", "DREG-act")] == "CONTRADICTED"  # DREG is above SN, not second to it
    assert v[("C6", "DREG-act")] == "SUPPORTED" and v[("C6", "DREG-layer")] == "CONTRADICTED"
    assert v[("C3", "DREG-act")] == "EQUIVALENT"  # the same gain under both activations
    # too little data to decide: 4 datasets, noisy seeds, a small positive effect
    few = analysis.analyse(synthetic_records({"DREG-act": 0.6}, datasets=4, noise=3.0), synthetic_meta(4))
    assert few["verdicts"][("C1", "DREG-act")] == "INCONCLUSIVE"
    assert not any(c["reachable"] for c in few["comparisons"] if c["kind"] == "greater")
