"""Each ChainzRule experiment's quick profile end to end: runs, report.md, figures, and the
report rebuilt from the raw results alone (slow suite)."""
import pytest


@pytest.mark.slow  # studies: `make test-slow`
@pytest.mark.parametrize("script,figures,sections,extra", [
    ("chainzrule_fractions", ["accuracy_vs_fraction.png"], ["pima: test accuracy", "Beside the paper", "SVM"], []),
    ("chainzrule_robustness", ["robustness_digits.png"], ["mean corruption accuracy", "pixelate", "Bonferroni"], []),
    ("chainzrule_tau", ["tau_pima.png"], ["final tau", "final tau_steps", "Spearman rho", "1.01-1.02"], []),
    ("chainzrule_text", ["text_accuracy_vs_fraction.png"], ["reviews: test accuracy", "LogReg", "Bonferroni", "hashed word"],
     ["--featurizer", "hashed"]),  # the MiniLM path: tests/test_featurizer.py
    ("chainzrule_schedules", ["schedule_gains.png", "schedule_multipliers.png"],
     ["Test accuracy", "noise_inv_input", "Measured representation noise", "Bonferroni", "Verdict",
      "picked on validation accuracy"], []),
    ("chainzrule_volatility", ["volatility_curves.png"], ["peak volatility", "Equal accuracy", "15.5x"], []),
    ("coherent_strong", ["coherent_accuracy.png"], ["coherent", "compression", "Holm", "9.9x"], []),
])
def test_quick_profile_writes_report_and_figures(script, figures, sections, extra, tmp_path, load_experiment):
    module = load_experiment(script)
    assert "full" in module.PROFILES and "quick" in module.PROFILES
    module.main(["--profile", "quick", "--out", str(tmp_path), "--no-progress", *extra])
    report = (tmp_path / "report.md").read_text()
    for section in sections:
        assert section in report, section
    for figure in figures:
        assert (tmp_path / figure).stat().st_size > 1000
    assert "nan" not in report.lower().replace("nans", "")
    # the report is a function of the raw results and meta.json: rebuilt, it is the same
    rebuild = load_experiment("rebuild_report")
    rebuild.rebuild(tmp_path)
    strip = lambda text: [line for line in text.splitlines() if "Wall time" not in line and "Profile:" not in line]  # noqa: E731
    assert strip((tmp_path / "report.md").read_text()) == strip(report)
