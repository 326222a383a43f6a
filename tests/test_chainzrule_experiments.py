"""Each ChainzRule experiment's quick profile end to end: runs, report.md, figures (slow suite)."""
import pytest


@pytest.mark.slow  # studies: `make test-slow`
@pytest.mark.parametrize("script,figures,sections,extra", [
    ("chainzrule_fractions", ["accuracy_vs_fraction.png"], ["pima: test accuracy", "Beside the paper", "SVM"], []),
    ("chainzrule_robustness", ["robustness_digits.png"], ["mean corruption accuracy", "pixelate", "Bonferroni"], []),
    ("chainzrule_tau", ["tau_pima.png"], ["final tau", "final tau_steps", "Spearman rho", "1.01-1.02"], []),
    ("chainzrule_text", ["text_accuracy_vs_fraction.png"], ["reviews: test accuracy", "LogReg", "Bonferroni", "hashed word"],
     ["--featurizer", "hashed"]),  # the MiniLM path: tests/test_featurizer.py
    ("chainzrule_schedules", ["schedule_gains.png", "schedule_multipliers.png"],
     ["Test accuracy", "noise_inv_input", "Measured representation noise", "Bonferroni", "Verdict"], []),
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
