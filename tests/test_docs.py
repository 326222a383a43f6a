"""Docs that match the code and the results: links stay inside the repository, the README's and
the study pages' blocks are the reports', and the committed reports are rebuilt from their raw
results."""
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


def test_dreg_study_v2_page_block_is_the_reports():
    assert _block((ROOT / "docs" / "history" / "dreg_v2.md").read_text()) == _block((STUDY / "report.md").read_text())


def test_committed_dreg_report_is_rebuilt_from_its_raw_results(tmp_path, load_experiment):
    out = tmp_path / "results" / "dreg_study_full"
    shutil.copytree(STUDY, out, ignore=shutil.ignore_patterns("*.png"))
    shutil.copytree(ROOT / "docs" / "results" / "dreg_study_v1", tmp_path / "results" / "dreg_study_v1")
    (out / "report.md").unlink()
    load_experiment("rebuild_report").rebuild(out)
    assert (out / "report.md").read_text() == (STUDY / "report.md").read_text()


V3 = ROOT / "docs" / "results" / "dreg_study_v3_full"


def _v3_block(text: str) -> str:
    from dreg_study_v3_analysis import README_BEGIN, README_END

    start, end = text.index(README_BEGIN), text.index(README_END)
    return text[start + len(README_BEGIN):end].strip()


def test_dreg_study_v3_page_block_is_the_reports():
    assert _v3_block((ROOT / "docs" / "studies" / "dreg_v3.md").read_text()) == _v3_block((V3 / "report.md").read_text())


@pytest.mark.parametrize("page", ["README.md", "docs/studies/dreg_v3.md"])
def test_should_i_use_dreg_box_is_the_reports(page):
    """The README's first-screen answer is the v3 report's own text (computed from its results)."""
    from readme_blocks import block

    box = block((ROOT / page).read_text(), "should-i-use-dreg")
    assert box == block((V3 / "report.md").read_text(), "should-i-use-dreg") and "**Answer:**" in box


def test_readme_is_a_front_page():
    """At most ~300 lines, and its first screen (40 lines) already holds the measured answer."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300
    assert any("Should I use DREG?" in line for line in lines[:40])
    assert any("pp [" in line for line in lines[:40])  # an effect with its interval


def test_committed_v3_report_is_rebuilt_from_its_raw_results(tmp_path, load_experiment):
    out = tmp_path / "results" / "dreg_study_v3_full"
    shutil.copytree(V3, out, ignore=shutil.ignore_patterns("*.png"))
    shutil.copytree(STUDY, tmp_path / "results" / "dreg_study_full", ignore=shutil.ignore_patterns("*.png", "*.gz"))
    (out / "report.md").unlink()
    load_experiment("rebuild_report").rebuild(out)
    assert (out / "report.md").read_text() == (V3 / "report.md").read_text()


def _assert_preregistered_before(results, prereg: str):
    """``prereg`` is an ancestor of (and not) the commit that added ``results`` (skipped outside
    a git checkout or before the results are committed)."""
    import subprocess

    try:
        added = subprocess.run(["git", "log", "--diff-filter=A", "--format=%h", "--", str(results)],
                               cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        pytest.skip("no git")
    if not added:
        pytest.skip("the results are not committed yet (or this is not a git checkout)")
    done = subprocess.run(["git", "merge-base", "--is-ancestor", prereg, added[-1]], cwd=ROOT, timeout=30)
    assert done.returncode == 0 and prereg != added[-1]


def test_v3_preregistration_came_before_the_results():
    """The commit the report names as the pre-registration is an ancestor of the commit that
    added the results."""
    import json

    _assert_preregistered_before(V3 / "results.jsonl.gz", json.loads((V3 / "meta.json").read_text())["preregistration_commit"])


TRANSFORMER_V2 = {regime: ROOT / "docs" / "results" / f"transformer_v2_{regime}_cpu" for regime in ("scratch", "finetune")}


@pytest.mark.parametrize("regime", sorted(TRANSFORMER_V2))
def test_transformer_v2_page_blocks_are_the_reports(regime):
    from readme_blocks import block

    name = f"transformer-v2-{regime}-summary"
    page = ROOT / "docs" / "studies" / "transformer_v2.md"
    assert block(page.read_text(), name) == block((TRANSFORMER_V2[regime] / "report.md").read_text(), name)


@pytest.mark.parametrize("regime", sorted(TRANSFORMER_V2))
def test_committed_transformer_v2_reports_are_rebuilt_from_their_raw_results(regime, tmp_path, load_experiment):
    committed = TRANSFORMER_V2[regime]
    out = tmp_path / committed.name
    shutil.copytree(committed, out, ignore=shutil.ignore_patterns("*.png", "report.md"))
    load_experiment("rebuild_report").rebuild(out)
    assert (out / "report.md").read_text() == (committed / "report.md").read_text()


def test_transformer_v2_preregistration_came_before_the_results():
    """The pre-registration commit each report names is an ancestor of the commit that added its results."""
    import json

    for committed in TRANSFORMER_V2.values():
        _assert_preregistered_before(committed / "results.jsonl.gz",
                                     json.loads((committed / "meta.json").read_text())["preregistration_commit"])
