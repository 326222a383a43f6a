"""The light core: without the study extra, the penalties, layers and train step still work."""
import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent('''
    import sys
    from dreg_jax._extras import STUDY_MODULES

    class Absent:
        """Acts as if the study extra were not installed."""
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in STUDY_MODULES and name.split(".")[0] != "yaml":  # flax needs PyYAML
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    for name in list(sys.modules):
        if name.split(".")[0] in STUDY_MODULES and name.split(".")[0] != "yaml":
            del sys.modules[name]
    sys.meta_path.insert(0, Absent())
''')


def run(code):
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=300)


def test_core_works_without_the_study_extra():
    done = run('''
        import jax, jax.numpy as jnp, flax.linen as nn
        import dreg_jax
        assert "tqdm" not in sys.modules and "tensorflow_datasets" not in sys.modules
        class Net(nn.Module):
            @nn.compact
            def __call__(self, x):
                return nn.Dense(3)(dreg_jax.Activation(nn.gelu, name="act")(nn.Dense(8)(x)))
        model, x = Net(), jnp.ones((4, 5))
        variables = model.init(jax.random.key(0), x)
        out, terms = dreg_jax.jacobian_terms(model, variables, x, scope="activation")
        print("penalty", float(dreg_jax.dreg_penalty(terms)))
        config = dreg_jax.TrainConfig(model=dreg_jax.ModelConfig(hidden=(8,)), regularizer=dreg_jax.RegularizerConfig(kind="dreg"))
        state = dreg_jax.create_train_state(config, jax.random.key(0), 5, 3)
        state, metrics = dreg_jax.train_step(state, {"x": x, "y": jnp.arange(4) % 3}, jax.random.key(1), config)
        print("loss", float(metrics["loss"]))
        try:
            import dreg_jax.data
        except ImportError as err:
            print("data:", err)
        from dreg_jax.cli import main
        print("cli rc", main(["data", "list"]))
    ''')
    assert done.returncode == 0, done.stderr[-3000:]
    assert "penalty" in done.stdout and "loss" in done.stdout
    assert "data: dreg_jax.data (datasets, engine sweeps, the CLI and the studies) needs the study extra" in done.stdout
    assert "pip install 'dreg_jax[study]'" in done.stdout
    assert "cli rc 2" in done.stdout and "needs the study extra" in done.stderr


def test_models_bert_and_train_many_without_the_study_extra(tmp_path):
    """`[encoder]` (safetensors, tokenizers) is enough for load_bert; arrays are enough for train_many."""
    import pytest

    pytest.importorskip("safetensors")
    pytest.importorskip("tokenizers")
    from test_bert import TINY, _write_checkpoint

    _write_checkpoint(tmp_path, TINY)
    done = run(f'''
        import jax, jax.numpy as jnp, numpy as np
        import dreg_jax.models
        from dreg_jax.models import load_bert
        encoder, variables, tokenizer = load_bert({str(tmp_path)!r})
        batch = tokenizer(["good movie", "bad plot"], max_length=8, pad_to_max_length=True)
        hidden = encoder.apply(variables, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]))
        print("bert", hidden.shape)
        import dreg_jax
        from dreg_jax.engine import EngineData, EngineOptions, RunHParams, train_many
        rng = np.random.default_rng(0)
        x = rng.normal(size=(40, 5)).astype(np.float32)
        y = (x[:, 0] > 0).astype(np.int32)
        data = EngineData(x[:30], y[:30], x[30:], y[30:])
        config = dreg_jax.TrainConfig(model=dreg_jax.ModelConfig(hidden=(8,)), epochs=2, batch_size=10)
        runs = RunHParams.stack([RunHParams(seed=s, learning_rate=1e-2, strength=0.0, data_fraction=1.0,
                                            label_noise=0.0, input_noise=0.0) for s in range(2)])
        final, _ = train_many(runs, data, config, 2, EngineOptions(per_epoch_diagnostics=False))
        print("accuracy", np.asarray(final["test_accuracy"]).shape)
        assert "tqdm" not in sys.modules and "tensorflow_datasets" not in sys.modules and "pandas" not in sys.modules
        try:
            from dreg_jax.engine import run_sweep
        except ImportError as err:
            print("sweep:", err)
    ''')
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bert (2, 8, 16)" in done.stdout and "accuracy (2,)" in done.stdout
    assert "sweep: dreg_jax.engine.run_sweep (sweeps over datasets) needs the study extra" in done.stdout
