"""The README's example is real code: extract it and run it."""
import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_flax_example_runs_and_penalizes():
    blocks = python_blocks()
    assert blocks, "README lost its python example"
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    grads = namespace["grads"]
    leaves = [np.asarray(g) for g in __import__("jax").tree_util.tree_leaves(grads)]
    assert leaves and all(np.isfinite(g).all() for g in leaves)
    # the penalty is really part of the loss: it is positive and changes the gradient
    loss_fn, params, x, y, key = (namespace[k] for k in ("loss_fn", "params", "x", "y", "key"))
    import optax

    model = namespace["model"]
    plain = optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, x), y).mean()
    assert float(loss_fn(params, x, y, key)) > float(plain)
    # and the chain of submodules reproduces the model's own forward pass
    fns = namespace["dreg_jax"].submodule_fns(model, {"params": params}, ["blocks.0", "blocks.1", "head"])
    h = x
    for f in fns:
        h = f(h)
    np.testing.assert_allclose(h, model.apply({"params": params}, x), rtol=1e-6)


def test_submodule_fns_names_unknown_submodules():
    import pytest
    ns = {}
    exec(compile(python_blocks()[0], "README.md", "exec"), ns)
    with pytest.raises(ValueError, match="blocks_0, blocks_1, head.*addressed as"):
        ns["dreg_jax"].submodule_fns(ns["model"], {"params": ns["params"]}, ["blocks.0", "tail"])
    with pytest.raises(ValueError, match="index below 2"):
        ns["dreg_jax"].submodule_fns(ns["model"], {"params": ns["params"]}, ["blocks.5"])
