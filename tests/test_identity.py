"""Run identity of user models: it covers the code, and is the same in every process."""
import functools
import json
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax.numpy as jnp
import pytest

import dreg_jax
from dreg_jax.engine import EngineOptions, RunSpec, SweepConfig, run_sweep
from dreg_jax.engine.identity import UnstableIdentity, model_identity

SOURCE = textwrap.dedent("""
    import functools
    import flax.linen as nn, jax.numpy as jnp
    import dreg_jax

    class Net(nn.Module):
        act: object = nn.gelu
        scale: float = {scale}

        @nn.compact
        def __call__(self, x):
            x = nn.Dense(8)(x)
            return nn.Dense(3)(dreg_jax.Activation(self.act)(x) * self.scale{edit})
    """)


def make(scale=1.0, edit=""):
    namespace = {}
    exec(compile(SOURCE.format(scale=scale, edit=edit), "user_model.py", "exec"), namespace)
    return namespace["Net"]


def spec_for(module):
    return SweepConfig(datasets=("iris",), module=module, regularizers=("none",), seeds=1, epochs=1).expand()[0]


def test_editing_a_method_body_changes_the_run_id_and_a_rerun_trains(tmp_path):
    before, after = make()(), make(edit=" + 0.5 * x[..., :1]")()
    assert spec_for(before).run_id != spec_for(after).run_id
    assert spec_for(make()()).run_id == spec_for(before).run_id  # same code, same id
    path = tmp_path / "r.jsonl"
    options = EngineOptions(per_epoch_diagnostics=False)
    first = run_sweep([spec_for(before)], path, progress=False, options=options)
    second = run_sweep([spec_for(after)], path, progress=False, options=options)
    assert first[0]["run_id"] != second[0]["run_id"]
    assert len(path.read_text().splitlines()) == 2  # the edited module was trained, not looked up
    assert RunSpec.from_dict(second[0]["spec"]).run_id == second[0]["run_id"]


def test_attributes_that_differ_give_different_ids():
    Net = make()
    ids = {model_identity(Net(act=a)) for a in (nn.gelu, nn.relu, lambda z: z * 2, lambda z: z * 3,
                                                 functools.partial(jnp.clip, min=-1.0),
                                                 functools.partial(jnp.clip, min=-2.0))}
    assert len(ids) == 6
    assert model_identity(make(scale=2.0)()) != model_identity(Net())


PROBE = textwrap.dedent("""
    import functools, json, sys
    import jax.numpy as jnp
    sys.path.insert(0, {tests!r})
    from test_identity import make
    from dreg_jax.engine import SweepConfig
    Net = make()
    modules = [Net(), Net(act=functools.partial(jnp.clip, min=-1.0)), Net(act=lambda z: z * 2)]
    print(json.dumps([SweepConfig(datasets=("iris",), module=m, regularizers=("none",), seeds=1).expand()[0].run_id
                      for m in modules]))
    """)


def test_same_module_same_id_in_two_processes():
    import pathlib

    tests = str(pathlib.Path(__file__).parent)
    code = PROBE.format(tests=tests)
    runs = [json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                      timeout=300).stdout.strip().splitlines()[-1]) for _ in range(2)]
    assert runs[0] == runs[1] and len(set(runs[0])) == 3


def test_unstable_attribute_is_refused_with_its_path(tmp_path):
    class Holder:
        pass

    Net = make()
    with pytest.raises(UnstableIdentity, match=r"module\.act is a .*Holder.*stable across processes"):
        spec_for(Net(act=Holder())).run_id


def test_nnx_model_identity_follows_its_factory():
    from flax import nnx

    class A(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x):
            return self.fc(x)

    class B(A):
        def __call__(self, x):
            return self.fc(x) * 2

    assert model_identity(dreg_jax.NNXModel(A)) != model_identity(dreg_jax.NNXModel(B))
    assert model_identity(dreg_jax.NNXModel(A)) == model_identity(dreg_jax.NNXModel(A))


@pytest.mark.parametrize("case", ["wrong width", "dropped batch axis"])
def test_user_module_output_shape_refused_before_compiling(case, tmp_path):
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            logits = nn.Dense(5)(x)
            return logits if case == "wrong width" else logits.mean(axis=0)

    spec = SweepConfig(datasets=("iris",), module=Net(), regularizers=("none",), seeds=1, epochs=1).expand()[0]
    expect = r"returns \(2, 5\)" if case == "wrong width" else r"returns \(5,\)"
    with pytest.raises(ValueError, match=expect + r".*\(batch, num_classes\) = \(2, 3\)"):
        run_sweep([spec], tmp_path / "r.jsonl", progress=False)
    assert not (tmp_path / "r.jsonl").read_text()  # nothing trained, no row written


def test_a_config_strength_that_disagrees_with_the_runs_is_refused():
    from dreg_jax.engine import EngineData, RunHParams, train_many

    x = jnp.ones((8, 3))
    data = EngineData(x, jnp.arange(8) % 2, x, jnp.arange(8) % 2)
    config = dreg_jax.TrainConfig(model=dreg_jax.ModelConfig(hidden=(4,)),
                                  regularizer=dreg_jax.RegularizerConfig(kind="dreg", strength=0.1), epochs=1)
    runs = RunHParams.stack([RunHParams(seed=0, learning_rate=1e-3, strength=0.01)])
    with pytest.raises(ValueError, match=r"RegularizerConfig.strength=0.1 but RunHParams.strength=\[0.0099"):
        train_many(runs, data, config, 2)
