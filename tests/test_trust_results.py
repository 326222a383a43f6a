"""Rows mean what they say: out-of-range metrics and one run with two different results are
refused (readers report and skip, never write; the writer sets them aside and redoes the run),
rows that lack what readers need are refused in one line, and the writer's lock, temporary and
set-aside files never follow a planted link."""
import json

import pytest

from dreg_jax.cli import main
from dreg_jax.engine import EngineOptions, ResultsFile, SweepConfig, run_sweep

from conftest import file_snapshot, one_line_refusal

TINY = SweepConfig(datasets=("iris",), regularizers=("none",), seeds=2, epochs=1, hidden=(4,))
OPTIONS = EngineOptions(per_epoch_diagnostics=False)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    path = tmp_path_factory.mktemp("rows") / "r.jsonl"
    records = run_sweep(TINY.expand(), path, progress=False, options=OPTIONS)
    return [json.loads(line) for line in path.read_text().splitlines()], records


def _changed(row, **metrics):
    row = json.loads(json.dumps(row))
    row["metrics"].update(metrics)
    return row


def _without(row, *path):
    row = json.loads(json.dumps(row))
    node = row
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return row


def _newer(row, *path):  # a row from a newer version (an unknown spec field) that also lacks a part
    row = _without(row, *path)
    row["spec"]["from_the_future"] = 1
    return row


# name: (make the file's rows from the two good rows (a, b), run ids a reader keeps, words)
CASES = {
    "accuracy in percent": (lambda a, b: [_changed(a, test_accuracy=97.0), b], ["b"], "outside [0, 1]"),
    "negative accuracy": (lambda a, b: [_changed(a, validation_accuracy=-0.1), b], ["b"], "outside [0, 1]"),
    "accuracy text": (lambda a, b: [_changed(a, test_accuracy="0.9"), b], ["b"], "not a number"),
    "accuracy bool": (lambda a, b: [_changed(a, test_accuracy=True), b], ["b"], "not a number"),
    "robust accuracy dict out of range": (lambda a, b: [_changed(a, robust_accuracy={"noise": 2.0}), b], ["b"],
                                          "outside [0, 1]"),
    "one run, two results": (lambda a, b: [a, b, _changed(a, test_accuracy=0.1)], ["b"], "other results than on line 1"),
    "one run, two results, three rows": (lambda a, b: [a, _changed(a, test_accuracy=0.1), a, b], ["b"],
                                         "different results"),
    "identical duplicate is harmless": (lambda a, b: [a, b, a], ["a", "b"], None),
    "identical copies, then a conflict": (lambda a, b: [a, a, b, _changed(a, test_accuracy=0.1)], ["b"],
                                          "different results"),
    "newer row without config": (lambda a, b: [_newer(a, "spec", "config"), b], ["b"], "no config"),
    "newer row without optimizer": (lambda a, b: [_newer(a, "spec", "config", "optimizer"), b], ["b"], "'optimizer'"),
    "row without dataset": (lambda a, b: [_without(a, "spec", "dataset"), b], ["b"], "'dataset'"),
    "newer row without hidden": (lambda a, b: [_newer(a, "spec", "config", "model", "hidden"), b], ["b"],
                                 "hidden widths"),
    "NaN accuracy of an older diverged row": (lambda a, b: [_changed(a, test_accuracy=float("nan")), b], ["a", "b"], None),
}


def _file(tmp_path, rows_):
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows_))
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_readers_report_and_skip_and_never_write(case, rows, tmp_path, capsys):
    (a, b), _ = rows
    make, keep, words = CASES[case]
    path = _file(tmp_path, make(a, b))
    before = file_snapshot(tmp_path)
    messages = []
    loaded = ResultsFile(path, log=messages.append).load()
    assert sorted(loaded) == sorted({"a": a["run_id"], "b": b["run_id"]}[k] for k in keep)
    if words:
        assert any(words in m and "r.jsonl:" in m for m in messages), messages
    else:
        assert not messages
    assert main(["results", str(path)]) == 0
    assert file_snapshot(tmp_path) == before


@pytest.mark.parametrize("case", ["accuracy in percent", "one run, two results", "newer row without config",
                                  "identical copies, then a conflict"])
def test_the_writer_sets_bad_rows_aside_and_redoes_the_run(case, rows, tmp_path, capsys):
    (a, b), _ = rows
    path = _file(tmp_path, CASES[case][0](a, b))
    records = run_sweep(TINY.expand(), path, progress=False, options=OPTIONS)
    assert sorted(r["run_id"] for r in records) == sorted([a["run_id"], b["run_id"]])
    assert all(0 <= r["metrics"]["test_accuracy"] <= 1 for r in records)
    aside = [json.loads(line) for line in (tmp_path / "r.jsonl.rejected").read_text().splitlines()]
    assert aside and all(r["reason"] for r in aside)
    assert ResultsFile(path).load().keys() == {a["run_id"], b["run_id"]}


def test_plot_of_rows_without_curves(rows, tmp_path, capsys):
    (a, b), _ = rows
    path = _file(tmp_path, [_without(a, "curves"), _without(b, "curves")])
    assert main(["plot", str(path), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "learning_curves.png").stat().st_size > 0


def test_plot_with_no_finished_run_is_one_line(rows, tmp_path, capsys):
    (a, b), _ = rows
    failed = json.loads(json.dumps(a))
    failed["status"] = "failed"
    path = _file(tmp_path, [failed])
    one_line_refusal(capsys, main(["plot", str(path), "--out", str(tmp_path / "plots")]), "no finished")


@pytest.mark.parametrize("name", ["r.jsonl.lock", "r.jsonl.rejected"])
def test_planted_links_are_never_followed(name, rows, tmp_path, capsys):
    (a, b), _ = rows
    path = _file(tmp_path, [a, "torn" if name.endswith("rejected") else b])
    if name.endswith("rejected"):
        path.write_text(json.dumps(a) + "\nnot json\n")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / name).symlink_to("victim.txt")
    code = main(["sweep", "--datasets", "iris", "--regularizers", "none", "--seeds", "2", "--epochs", "1",
                 "--hidden", "4", "--results", str(path)])
    one_line_refusal(capsys, code, name, "link")
    assert victim.read_text() == "keep me"


def test_a_planted_tmp_link_is_never_written(rows, tmp_path, capsys):
    (a, b), _ = rows
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(a) + "\nnot json\n" + json.dumps(b) + "\n")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "r.jsonl.tmp").symlink_to("victim.txt")
    run_sweep(TINY.expand(), path, progress=False, options=OPTIONS)  # the repair rewrites the file
    assert victim.read_text() == "keep me" and (tmp_path / "r.jsonl.tmp").is_symlink()
    assert "not json" not in path.read_text() and len(path.read_text().splitlines()) == 2
