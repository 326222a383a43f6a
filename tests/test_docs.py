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


V4 = ROOT / "docs" / "results" / "dreg_study_v4_full"


@pytest.mark.parametrize("page, study", [("README.md", V4), ("docs/studies/dreg_v4.md", V4),
                                         ("docs/studies/dreg_v3.md", V3)])
def test_should_i_use_dreg_box_is_the_reports(page, study):
    """The README's first-screen answer is the v4 report's own text (computed from its results);
    each study page shows its own study's box."""
    from readme_blocks import block

    box = block((ROOT / page).read_text(), "should-i-use-dreg")
    assert box == block((study / "report.md").read_text(), "should-i-use-dreg") and "**Answer:**" in box


def test_dreg_study_v4_page_block_is_the_reports():
    from readme_blocks import block

    name = "dreg-study-v4-summary"
    assert block((ROOT / "docs" / "studies" / "dreg_v4.md").read_text(), name) == block((V4 / "report.md").read_text(), name)


def test_committed_v4_report_is_rebuilt_byte_for_byte(tmp_path, load_experiment):
    out = tmp_path / "results" / "dreg_study_v4_full"
    shutil.copytree(V4, out, ignore=shutil.ignore_patterns("*.png", "report.md"))
    load_experiment("rebuild_report").rebuild(out)
    assert (out / "report.md").read_text() == (V4 / "report.md").read_text()
    for png in V4.glob("*.png"):
        assert (out / png.name).read_bytes() == png.read_bytes(), png.name


def test_v4_preregistration_came_before_the_results():
    import json

    meta = json.loads((V4 / "meta.json").read_text())
    _assert_preregistered_before(V4 / "results.jsonl.gz", meta["preregistration_commit"])


#: what decides a v4 verdict: changed after the pre-registration only as a listed deviation
V4_VERDICT_LOGIC = {"experiments/dreg_study_v4_analysis.py": ("LEARNABLE_MARGIN", "CEILING", "COMPARISONS", "learnable",
                                                              "outcome_table", "table_effects", "t_interval",
                                                              "evaluate", "analyse"),
                    "experiments/dreg_study_v4.py": ("LAMBDA", "ARMS", "FIXED_ARMS", "CENTRES", "OPTIONS", "TABLES",
                                                     "Profile", "PROFILES", "starting_grid", "pick", "extension",
                                                     "correct_count", "tuning_stage", "final_stage", "draw_dataset",
                                                     "base_dataset", "table_frame")}


def _definitions(source: str, names) -> dict:
    """``{name: source text}`` of the module-level functions, classes and assignments ``names``."""
    import ast

    tree = ast.parse(source)
    out = {}
    for node in tree.body:
        targets = ([node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef))
                   else [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
                   + ([node.target.id] if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) else []))
        for name in targets:
            if name in names:
                out[name] = ast.dump(node)  # the code, not its comments or blank lines
    return out


def test_v4_verdict_logic_is_the_preregistered_one_or_a_listed_deviation():
    """Every definition that decides a verdict is as it was at the pre-registration commit, or
    the study lists deviations (meta.json, from the runner's DEVIATIONS)."""
    import json
    import subprocess

    meta = json.loads((V4 / "meta.json").read_text())
    changed = []
    for path, names in V4_VERDICT_LOGIC.items():
        try:
            then = subprocess.run(["git", "show", f"{meta['preregistration_commit']}:{path}"], cwd=ROOT,
                                  capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            pytest.skip("no git")
        if then.returncode != 0:
            pytest.skip("the pre-registration commit is not in this checkout")
        before, now = _definitions(then.stdout, names), _definitions((ROOT / path).read_text(), names)
        assert set(now) == set(names), f"{path}: missing {set(names) - set(now)}"
        changed += [f"{path}:{n}" for n in names if before.get(n) != now[n]]
    assert not changed or meta["deviations"], f"changed after the pre-registration without a deviation: {changed}"


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


def test_committed_transformer_v1_scratch_rows_each_find_their_arm(load_experiment):
    """The v1 rows were written before class_weight, task and the per_step weight-decay default
    existed: each still maps to its arm (specs compared as their run ids hash them)."""
    import json

    study = load_experiment("transformer_study")
    committed = ROOT / "docs" / "results" / "transformer_scratch_full"
    meta = json.loads((committed / "meta.json").read_text())
    _, arm_of = study.scratch_specs(study.PROFILES[meta["profile"]][meta["regime"]])
    rows = study.scratch_rows(study.load_raw_results(committed), arm_of)
    assert len(rows) == 144 and {r["arm"] for r in rows} >= {"none", "DREG-act"}


@pytest.mark.slow
def test_every_committed_report_is_rebuilt_byte_for_byte(tmp_path, load_experiment):
    """`make rebuild-reports` as a test: every results folder with a meta.json, its report removed
    first, rebuilt from its raw results alone, equal to the committed report."""
    results = tmp_path / "results"
    shutil.copytree(ROOT / "docs" / "results", results)
    rebuild = load_experiment("rebuild_report").rebuild
    folders = sorted(meta.parent for meta in results.glob("*/meta.json"))
    assert len(folders) >= 15
    for folder in folders:
        (folder / "report.md").unlink()
        rebuild(folder)
        committed = ROOT / "docs" / "results" / folder.name / "report.md"
        assert (folder / "report.md").read_text() == committed.read_text(), folder.name


def test_transformer_v2_preregistration_came_before_the_results():
    """The pre-registration commit each report names is an ancestor of the commit that added its results."""
    import json

    for committed in TRANSFORMER_V2.values():
        _assert_preregistered_before(committed / "results.jsonl.gz",
                                     json.loads((committed / "meta.json").read_text())["preregistration_commit"])
