"""Each ChainzRule experiment's quick profile end to end: runs, report.md, figures."""
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load(script):
    spec = importlib.util.spec_from_file_location(script, ROOT / "experiments" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script,figures,sections", [
    ("chainzrule_fractions", ["accuracy_vs_fraction.png"], ["pima: test accuracy", "Beside the paper", "SVM"]),
    ("chainzrule_robustness", ["robustness_digits.png"], ["mean corruption accuracy", "pixelate", "Bonferroni"]),
    ("chainzrule_tau", ["tau_pima.png"], ["final tau", "Spearman rho", "1.01-1.02"]),
    ("chainzrule_text", ["text_accuracy_vs_fraction.png"], ["reviews: test accuracy", "LogReg", "Bonferroni"]),
])
def test_quick_profile_writes_report_and_figures(script, figures, sections, tmp_path):
    module = load(script)
    assert "full" in module.PROFILES and "quick" in module.PROFILES
    module.main(["--profile", "quick", "--out", str(tmp_path), "--no-progress"])
    report = (tmp_path / "report.md").read_text()
    for section in sections:
        assert section in report, section
    for figure in figures:
        assert (tmp_path / figure).stat().st_size > 1000
    assert "nan" not in report.lower().replace("nans", "")
