"""jacobian_terms in data-parallel steps on 8 CPU devices (tests/many_devices_check.py runs in a
process of its own): global terms under jit with a sharded batch, per-shard terms under
shard_map whose pmean is unbiased for the global batch, BatchNorm synced over the axis included."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("many_devices_check.py")


@pytest.fixture(scope="module")
def checked():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", ["classic", "explicit"])
@pytest.mark.parametrize("estimator", ["probe-1.0", "probe-0.5", "exact-1.0"])
def test_jit_on_a_sharded_batch_gives_the_unsharded_terms_and_gradients(checked, mesh, estimator):
    terms_diff, grad_diff = checked[f"jit {mesh} {estimator}"]
    assert terms_diff < 1e-4 and grad_diff < 1e-4  # float rounding on terms of about 19


@pytest.mark.parametrize("check_vma", [True, False])
def test_shard_map_exact_terms_and_gradients_equal_the_unsharded_ones(checked, check_vma):
    term_diff, grad_diff = checked[f"shard_map {check_vma} exact"]
    assert term_diff < 1e-4 and grad_diff < 1e-4


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("fraction", ["1.0", "0.5"])
def test_shard_map_probe_estimates_are_unbiased_and_each_shard_draws_its_own(checked, check_vma, fraction):
    mean, standard_error = checked[f"shard_map {check_vma} probe-{fraction}"]
    assert abs(mean - checked["exact"]) < 3 * standard_error, (mean, standard_error, checked["exact"])
    assert checked[f"shard_map {check_vma} distinct shard estimates"] == 8


def test_batchnorm_synced_over_the_axis_is_unbiased_for_the_global_batch_map(checked):
    mean, standard_error = checked["bn shard_map probe"]
    assert abs(mean - checked["bn exact"]) < 3 * standard_error, (mean, standard_error, checked["bn exact"])


def test_the_exact_estimator_and_the_activation_scope_refuse_row_fraction():
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from dreg_jax import jacobian_terms

    model = nn.Dense(3)
    x = jnp.ones((4, 2))
    variables = model.init(jax.random.key(0), x)
    for kwargs in ({"estimator": "exact", "layers": [nn.Dense]}, {"scope": "activation"}):
        with pytest.raises(ValueError, match="row_fraction=0.5 samples the rows"):
            jacobian_terms(model, variables, x, key=jax.random.key(0), row_fraction=0.5, **kwargs)


def test_readme_data_parallel_vit_step_runs_on_8_devices(tmp_path):
    from docs_pages import section_block

    script = tmp_path / "step.py"
    script.write_text(section_block("DREG on many devices"))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, str(script)], env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("loss ") and "encoder/block_0/ffn" in line and "nan" not in line, line
