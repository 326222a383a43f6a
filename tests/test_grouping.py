"""Program grouping (the engine's run axis): results do not depend on it, and the cost model
folds what is cheap to fold on each backend (dreg_jax.engine.grouping)."""
import dataclasses

import chex
import jax
import numpy as np
import pytest

import dreg_jax
from dreg_jax.engine import EngineOptions, RunHParams, RunSpec, run_sweep
from dreg_jax.engine.grid import train_many
from dreg_jax.engine.grouping import BACKEND_COSTS, fold_config, plan_folds
from dreg_jax.engine.sweep import engine_data, plan_programs
from dreg_jax.training.config import Fold
from dreg_jax.training.regularizers import DEFAULT_STRENGTHS
from dreg_jax.training.train import create_train_state, loss_branches

ACTS = ("gelu", "chainzrule")
KINDS = ("none", "weight_decay", "dreg", "igpen", "jacobian")
BASE = dreg_jax.TrainConfig(model=dreg_jax.ModelConfig(hidden=(8, 8)), epochs=2, batch_size=64)
OPTS = EngineOptions(per_epoch_diagnostics=False, vmap_width=4, diag_size=16)
# exact: integers and the accuracies; reductions over steps or examples, which XLA vectorizes
# per program, may differ in the last bits (losses, epoch means, percentiles): a few ulps
EXACT = ("test_accuracy", "fail_step", "diverge_step", "train_examples", "robust_accuracy")


def _config(activation, kind):
    return dataclasses.replace(BASE, model=dataclasses.replace(BASE.model, activation=activation),
                               regularizer=dreg_jax.RegularizerConfig(kind=kind))


def _hp(seed, kind, activation_index=0, regularizer_index=0):
    return RunHParams(seed, 1e-2, DEFAULT_STRENGTHS[kind] or 0.0, 1.0, 0.0, 0.0, activation_index, regularizer_index)


@pytest.fixture(scope="module")
def pima():
    return engine_data("pima")


@pytest.mark.slow  # 6 programs (~37 s); the default suite keeps the user-module fold and record checks
def test_folded_program_gives_each_run_its_unfolded_results(pima):
    data, classes = pima
    folded = dataclasses.replace(BASE, fold=Fold(ACTS, KINDS))
    runs = [(a, k) for a in ACTS for k in KINDS]
    hps = RunHParams.stack([_hp(i, k, ACTS.index(a), KINDS.index(k)) for i, (a, k) in enumerate(runs)])
    final, curves = train_many(hps, data, folded, classes, OPTS)
    assert "strength_multiplier" in curves  # DREG's curve, NaN padding for the other runs
    # every kind and every activation once, each in its own (unfolded) program
    alone_runs = [("gelu", "none"), ("chainzrule", "weight_decay"), ("gelu", "dreg"), ("chainzrule", "igpen"),
                  ("gelu", "jacobian")]
    for i, (a, k) in enumerate(runs):
        if (a, k) not in alone_runs:
            continue
        alone, alone_curves = train_many(RunHParams.stack([_hp(i, k)]), data, _config(a, k), classes, OPTS)
        for key, value in alone.items():
            if key in EXACT:
                np.testing.assert_array_equal(final[key][i], value[0], err_msg=f"{a} {k} {key}")
            else:
                np.testing.assert_allclose(final[key][i], value[0], rtol=4e-6, atol=1e-7, err_msg=f"{a} {k} {key}")
        np.testing.assert_allclose(curves["train_loss"][i], alone_curves["train_loss"][0], rtol=4e-6)


def test_folded_mlp_has_the_plain_parameters_and_initialization():
    plain = create_train_state(_config("gelu", "none"), jax.random.key(3), 5, 3)
    folded = create_train_state(dataclasses.replace(BASE, fold=Fold(ACTS, ("none", "weight_decay"))),
                                jax.random.key(3), 5, 3, activation_index=0, regularizer_index=1)
    chainz = create_train_state(_config("chainzrule", "none"), jax.random.key(3), 5, 3)
    chex.assert_trees_all_equal(folded.params, chainz.params)  # same paths, same seeds
    chex.assert_trees_all_equal({k: v for k, v in folded.params.items() if "cubic" not in k}, plain.params)


def test_loss_branches_share_the_model_pass():
    folded = dataclasses.replace(BASE, fold=Fold((), KINDS))
    assert loss_branches(folded) == (("none", "weight_decay", "dreg"), ("igpen",), ("jacobian",))
    probe = dataclasses.replace(folded, regularizer=dreg_jax.RegularizerConfig(dreg_scope="layer"))
    assert loss_branches(probe)[0] == ("none", "weight_decay")  # probe DREG runs its own jvp pass
    exact = dataclasses.replace(folded, regularizer=dreg_jax.RegularizerConfig(dreg_scope="layer",
                                                                               layer_estimator="exact"))
    assert loss_branches(exact)[0] == ("none", "weight_decay", "dreg")


def test_fold_refuses_what_cannot_share_a_program():
    with pytest.raises(ValueError, match="cannot share a program"):
        dataclasses.replace(BASE, fold=Fold((), ("none", "spectral_norm"))).validate()
    with pytest.raises(ValueError, match="must be < 2"):
        RunHParams.stack([_hp(0, "none", 2, 0)]).check_fold(dataclasses.replace(BASE, fold=Fold(ACTS, ())))


COUNTS = {(a, k): 30 for a in ("relu", "gelu", "tanh", "chainzrule")
          for k in ("none", "weight_decay", "spectral_norm", "igpen", "jacobian", "dreg")}


def test_cost_model_folds_everything_foldable_on_a_gpu_and_the_cheap_part_on_a_cpu():
    config = fold_config(BASE, Fold(("gelu",), ("none",)))
    gpu = plan_folds(config, COUNTS, 1260, "auto", "gpu")
    assert [f.regularizers for f in gpu] == [("none", "weight_decay", "igpen", "jacobian", "dreg"), ("spectral_norm",)]
    assert all(len(f.activations) == 4 for f in gpu)
    cpu = plan_folds(config, COUNTS, 1260, "auto", "cpu")  # a study-sized dataset
    assert ("none", "weight_decay", "dreg") in [f.regularizers for f in cpu]
    assert not any("igpen" in f.regularizers and "none" in f.regularizers for f in cpu)
    tiny = plan_folds(config, COUNTS, 20, "auto", "cpu")  # few steps: compiling dominates, fold it all
    assert len(tiny) == 2
    # a compute-bound model (a transformer's 7e8 forward FLOPs per batch): the activations stay apart
    heavy_cpu = plan_folds(config, COUNTS, 1260, "auto", "cpu", flops=7e8)
    assert all(len(f.activations) == 1 for f in heavy_cpu) and len(heavy_cpu) > len(cpu)
    unfolded = plan_folds(config, COUNTS, 1260, "none", "cpu")
    assert len(unfolded) == 24 and all(len(f.activations) == len(f.regularizers) == 1 for f in unfolded)
    for plan in (gpu, cpu, tiny, unfolded):  # every pair in exactly one program
        pairs = [(a, k) for f in plan for a in f.activations for k in f.regularizers]
        assert sorted(pairs) == sorted(COUNTS)
    assert BACKEND_COSTS["cpu"].step_seconds > 100 * BACKEND_COSTS["gpu"].step_seconds


@pytest.mark.slow  # the default suite's time budget; `make test-slow` runs it
def test_quick_study_compiles_at_most_12_programs_on_a_cpu(load_experiment):
    study = load_experiment("dreg_study")
    specs, _ = study.study_specs(study.PROFILES["quick"])
    assert len(specs) == 684  # 2 activations x 7 arms (+ strength grid) x 3 datasets x 3 seeds x 2 fractions
    # one program per activation x arm x dataset unfolded (strengths are traced per run)
    assert len(plan_programs(specs, EngineOptions(fold="none", shape_buckets="none"), backend="cpu")) == 42
    programs = plan_programs(specs, EngineOptions(), backend="cpu")
    assert len(programs) <= 12
    assert any(len(p.runs) > 1 for p in programs)  # datasets share a program (same shapes or a bucket)
    assert sorted(s.run_id for p in programs for s in p.specs) == sorted(s.run_id for s in specs)
    # per dataset on a GPU: the activation-scope kinds folded, SN, and DREG-layer (its own scope)
    assert len(plan_programs(specs, EngineOptions(shape_buckets="none"), backend="gpu")) == 9
    # with shape buckets the three datasets share each of those programs
    gpu = plan_programs(specs, EngineOptions(), backend="gpu")
    assert len(gpu) == 4 and sum(len(p.runs) == 3 for p in gpu) == 2  # JacReg keeps its classes exact


def test_sweep_records_do_not_depend_on_the_grouping(tmp_path, capsys):
    specs = [RunSpec("pima", _config(a, k), seed=s) for a in ACTS for k in ("none", "dreg") for s in (0, 1)]
    folded = run_sweep(specs, tmp_path / "folded.jsonl", options=dataclasses.replace(OPTS, fold="all"), progress=False)
    assert "compiled programs: 1," in capsys.readouterr().out
    for spec, record in zip(specs, folded):
        assert ("strength_multiplier" in record["curves"]) == (spec.config.regularizer.kind == "dreg")
        assert set(record["hparams"]) == {"seed", "learning_rate", "strength", "data_fraction", "label_noise",
                                          "input_noise"}
    # resuming with another grouping finds every run done
    again = run_sweep(specs, tmp_path / "folded.jsonl", options=dataclasses.replace(OPTS, fold="none"), progress=False)
    assert "compiled programs: 0," in capsys.readouterr().out
    assert [r["run_id"] for r in again] == [r["run_id"] for r in folded]


@pytest.mark.slow  # the default suite's time budget; `make test-slow` runs it
def test_user_module_folds_weight_decay_and_dreg(pima):
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(dreg_jax.Activation(nn.gelu)(nn.Dense(8)(x)))

    data, classes = pima
    base = dreg_jax.TrainConfig(model=dreg_jax.ModelConfig(module=Net(), activation="custom"), epochs=1, batch_size=64)
    kinds = ("none", "weight_decay", "dreg")
    folded = dataclasses.replace(base, fold=Fold((), kinds))
    assert loss_branches(folded) == (("none", "weight_decay"), ("dreg",))  # DREG runs its own pass
    hps = RunHParams.stack([_hp(0, k, 0, i) for i, k in enumerate(kinds)])
    final, _ = train_many(hps, data, folded, classes, OPTS)
    for i, kind in enumerate(kinds):
        alone, _ = train_many(RunHParams.stack([_hp(0, kind)]), data,
                              dataclasses.replace(base, regularizer=dreg_jax.RegularizerConfig(kind=kind)), classes, OPTS)
        np.testing.assert_array_equal(final["test_accuracy"][i], alone["test_accuracy"][0])
        np.testing.assert_allclose(final["test_loss"][i], alone["test_loss"][0], rtol=4e-6)
