"""Docs that match the code and the results: links stay inside the repository, the README's
DREG-study block is the report's, and the committed report is rebuilt from its raw results."""
import pathlib
import re
import shutil

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
STUDY = ROOT / "docs" / "results" / "dreg_study_full"


def _block(text: str) -> str:
    from dreg_study_analysis import README_BEGIN, README_END

    start, end = text.index(README_BEGIN), text.index(README_END)
    return text[start + len(README_BEGIN):end].strip()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_inside_the_repository_and_resolve(doc):
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if re.match(r"[a-z]+://", target) or target.startswith("#"):
            continue
        path = (doc.parent / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT), f"{doc.name} links outside the repository: {target}"
        assert path.exists(), f"{doc.name} links to a missing file: {target}"


def test_readme_dreg_study_block_is_the_reports():
    assert _block((ROOT / "README.md").read_text()) == _block((STUDY / "report.md").read_text())


def test_committed_dreg_report_is_rebuilt_from_its_raw_results(tmp_path, load_experiment):
    out = tmp_path / "results" / "dreg_study_full"
    shutil.copytree(STUDY, out, ignore=shutil.ignore_patterns("*.png"))
    shutil.copytree(ROOT / "docs" / "results" / "dreg_study_v1", tmp_path / "results" / "dreg_study_v1")
    (out / "report.md").unlink()
    load_experiment("rebuild_report").rebuild(out)
    assert (out / "report.md").read_text() == (STUDY / "report.md").read_text()
