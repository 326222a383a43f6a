"""`make docs`: the MkDocs site builds with warnings as errors (strict), API pages included."""
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_docs_site_builds_strictly_with_the_api_pages(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(pathlib.Path(sys.executable).parent))
    if mkdocs is None:
        pytest.fail("mkdocs is not installed: pip install -e '.[docs]' (the test extra includes it)")
    done = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    site = tmp_path / "site"
    assert (site / "index.html").exists() and (site / "guide" / "your_model" / "index.html").exists()
    api = (site / "api" / "layers" / "index.html").read_text()
    assert "jacobian_terms" in api and "row_fraction" in api  # generated from the docstring
    for page in (site / "api").rglob("index.html"):  # Sphinx roles are shown as code (docs/_griffe_roles.py)
        assert ":func:`" not in page.read_text() and ":class:`" not in page.read_text(), page
    study = (site / "studies" / "dreg_v3" / "index.html").read_text()
    assert "Should I use DREG?" in study and "<code>experiments/dreg_study_v3.py</code>" in study
