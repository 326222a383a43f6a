"""Data layer: offline TFDS builders, splits, transforms, public names, bad input."""

import numpy as np
import pytest
from scipy import ndimage

from dreg_jax.data import (
    OFFLINE,
    STUDY_DATASETS,
    DatasetUnavailableError,
    builders,
    load_dataset,
    registry,
    sources,
    transforms,
)


@pytest.mark.parametrize("name", list(OFFLINE))
def test_offline_dataset_builds_and_loads_from_temp_dir(name, tmp_path):
    ds = load_dataset(name, data_dir=tmp_path)
    info = OFFLINE[name]
    assert (tmp_path / f"dreg_{name}" / builders.VERSION / "dataset_info.json").exists()
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.x_train.shape[1] == ds.x_test.shape[1] and np.isfinite(ds.x_train).all()
    assert set(np.unique(ds.y_train)) == set(range(info.num_classes))
    # standardized with training statistics only (images: one scalar mean / std)
    if info.image_shape is None:
        np.testing.assert_allclose(ds.x_train.mean(0), 0, atol=1e-4)
        std = ds.x_train.std(0)
        assert np.all((np.abs(std - 1) < 1e-3) | (std < 1e-6))
    else:
        assert abs(ds.x_train.mean()) < 1e-4 and abs(ds.x_train.std() - 1) < 1e-3
    assert ds.robust and all(v.shape == ds.x_test.shape for v in ds.robust.values())
    # the raw test inputs and the train inputs do not share rows (splits don't overlap)
    raw = sources.SOURCES[name]()
    if info.kind == "text":
        assert not set(raw["train"]["text"]) & set(raw["test"]["text"])
    else:
        train_rows = {r.tobytes() for r in raw["train"]["features"]}
        shared = sum(r.tobytes() in train_rows for r in raw["test"]["features"])
        every = np.concatenate([raw["train"]["features"], raw["test"]["features"]])
        duplicates_in_source = len(every) - len(np.unique(every, axis=0))  # e.g. iris has one
        assert shared <= duplicates_in_source, f"{shared} test rows also in train"
    assert len(ds.y_train) == len(raw["train"]["label"]) and len(ds.y_test) == len(raw["test"]["label"])


def test_study_has_eight_datasets_covering_every_kind():
    assert len(STUDY_DATASETS) == 8
    kinds = {(OFFLINE[n].kind, OFFLINE[n].messy) for n in STUDY_DATASETS}
    assert {("tabular", False), ("vision", False), ("vision", True), ("text", False), ("text", True)} <= kinds


def test_same_seed_same_data_in_two_data_dirs(tmp_path):
    registry._load.cache_clear()
    a = load_dataset("digits_corrupted", data_dir=tmp_path / "a")
    b = load_dataset("digits_corrupted", data_dir=tmp_path / "b")
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.robust["pixelate_5"], b.robust["pixelate_5"])
    clean = load_dataset("digits", data_dir=tmp_path / "a")
    np.testing.assert_array_equal(a.y_train, clean.y_train)  # corruption keeps labels
    assert not np.allclose(a.x_train, clean.x_train)


def test_corrupt_or_partial_data_dir_is_rebuilt(tmp_path):
    registry._load.cache_clear()
    good = load_dataset("wine", data_dir=tmp_path)
    version_dir = tmp_path / "dreg_wine" / builders.VERSION
    for record in version_dir.glob("*train.array_record*"):
        record.write_bytes(record.read_bytes()[:40])  # truncated file
    registry._load.cache_clear()
    again = load_dataset("wine", data_dir=tmp_path)
    np.testing.assert_array_equal(np.sort(good.x_train, 0), np.sort(again.x_train, 0))
    (version_dir / "dataset_info.json").unlink()  # partial: metadata missing
    registry._load.cache_clear()
    assert load_dataset("wine", data_dir=tmp_path).x_train.shape == good.x_train.shape


def test_nan_in_features_is_refused_naming_dataset_and_column(tmp_path, monkeypatch):
    original = sources.SOURCES["iris"]

    def with_nan():
        data = original()
        data["train"]["features"][3, 2] = np.nan
        return data

    monkeypatch.setitem(sources.SOURCES, "iris", with_nan)
    registry._load.cache_clear()
    with pytest.raises(ValueError, match=r"dataset 'iris' \(train\): feature column\(s\) \[2\]"):
        load_dataset("iris", data_dir=tmp_path / "nan")
    registry._load.cache_clear()


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="offline: pima, breast_cancer, digits"):
        load_dataset("mnist2")
    with pytest.raises(ValueError, match="hashed, minilm"):
        load_dataset("reviews", featurizer="bert")


# --- transforms: documented amounts ----------------------------------------------------------
IMAGES = np.random.default_rng(0).random((400, 8, 8)) * 0.4 + 0.3  # in [0.3, 0.7]: no clipping


@pytest.mark.parametrize("severity", transforms.SEVERITIES)
def test_image_corruptions_change_inputs_by_documented_amount(severity):
    p = {k: v[severity - 1] for k, v in transforms.IMAGE_CORRUPTION_PARAMS.items()}
    out = {c: transforms.corrupt_images(IMAGES, c, severity, seed=1) for c in transforms.IMAGE_CORRUPTIONS}
    for c, img in out.items():
        assert img.shape == IMAGES.shape and img.min() >= 0 and img.max() <= 1, c
    assert abs((out["gaussian_noise"] - IMAGES).std() - p["gaussian_noise"]) < 0.1 * p["gaussian_noise"]
    resid = (out["shot_noise"] - IMAGES)
    np.testing.assert_allclose(resid.var(), (IMAGES / p["shot_noise"]).mean(), rtol=0.15)
    changed = (out["impulse_noise"] != IMAGES.astype(np.float32)).mean()
    assert abs(changed - p["impulse_noise"]) < 0.25 * p["impulse_noise"] + 0.002
    np.testing.assert_allclose(out["brightness"] - IMAGES, p["brightness"], atol=1e-6)
    ratio = out["contrast"].std(axis=(1, 2)) / IMAGES.std(axis=(1, 2))
    np.testing.assert_allclose(ratio, p["contrast"], rtol=1e-4)
    np.testing.assert_allclose(out["gaussian_blur"],
                               ndimage.gaussian_filter(IMAGES, (0, p["gaussian_blur"],) * 1 + (p["gaussian_blur"],), mode="nearest"),
                               atol=1e-6)
    cells = max(1, round(p["pixelate"] * 8))
    assert len(np.unique(out["pixelate"][0])) <= cells * cells


def test_corruption_bad_input():
    with pytest.raises(ValueError, match="gaussian_noise, shot_noise"):
        transforms.corrupt_images(IMAGES, "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        transforms.corrupt_images(IMAGES, "contrast", 6)
    with pytest.raises(ValueError, match=r"\(n, H, W\)"):
        transforms.corrupt_images(IMAGES.reshape(400, 64), "contrast", 1)


@pytest.mark.parametrize("kind", transforms.LABEL_NOISE_KINDS)
@pytest.mark.parametrize("rate", [0.1, 0.4])
def test_label_noise_hits_rate(kind, rate):
    y = np.arange(30000) % 5
    noisy = transforms.label_noise(y, rate, 5, kind, seed=3)
    assert abs((noisy != y).mean() - rate) < 0.01
    if kind == "pair":
        flipped = noisy != y
        np.testing.assert_array_equal(noisy[flipped], (y[flipped] + 1) % 5)
    np.testing.assert_array_equal(noisy, transforms.label_noise(y, rate, 5, kind, seed=3))


def test_vector_noise_amounts():
    x = np.zeros((20000, 4), np.float32)
    assert abs(transforms.gaussian_noise(x, 0.5, 1).std() - 0.5) < 0.01
    ones = np.ones((20000, 4), np.float32)
    assert abs((transforms.feature_dropout(ones, 0.3, 1) == 0).mean() - 0.3) < 0.01


def test_text_noise_rate_and_determinism():
    texts = ["the quick brown fox jumps over the lazy dog"] * 500
    noisy = transforms.text_noise(texts, 0.2, seed=5)
    words = sum(len(t.split()) for t in texts)
    kept_same = sum(a == b for t, n in zip(texts, noisy) for a, b in zip(t.split(), n.split()))
    changed = 1 - kept_same / words  # dropped words shift alignment: an upper bound of the rate
    assert 0.15 < changed < 0.5
    assert transforms.text_noise(texts, 0.2, seed=5) == noisy
    assert transforms.text_noise(texts, 0.0, seed=5) == texts


# --- public TFDS names ------------------------------------------------------------------------
def test_public_names_resolve_through_tfds_mock(tmp_path):
    import tensorflow_datasets as tfds

    registry._load.cache_clear()
    with tfds.testing.mock_data(num_examples=12):
        ds = load_dataset("mnist", data_dir=tmp_path)
        assert ds.x_train.shape == (12, 784) and ds.num_classes == 10
        text = load_dataset("imdb_reviews", data_dir=tmp_path)
        assert text.x_train.shape[0] == 12 and text.kind == "text"
        corrupted = load_dataset("cifar10_corrupted/gaussian_noise_3", data_dir=tmp_path)
        assert corrupted.x_test.shape == (12, 3072) and corrupted.x_train.shape[0] == 0
    registry._load.cache_clear()


def test_public_dataset_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DREG_JAX_OFFLINE", "1")
    registry._load.cache_clear()
    with pytest.raises(DatasetUnavailableError, match="cannot be downloaded \\(no network\\)"):
        load_dataset("fashion_mnist", data_dir=tmp_path)


def test_three_processes_building_one_dataset_at_once(tmp_path):
    """First use of a dataset by three processes at the same moment: one builds, the others wait
    for it and read the same arrays (no 'Cannot rename', no rebuild of a half-built dir)."""
    import os
    import subprocess
    import sys

    code = ("import hashlib, sys\n"
            "from dreg_jax.data import load_dataset\n"
            "ds = load_dataset('iris')\n"
            "print(hashlib.sha256(ds.x_train.tobytes() + ds.y_test.tobytes()).hexdigest())\n")
    env = {**os.environ, "DREG_JAX_DATA_DIR": str(tmp_path / "tfds"), "DREG_JAX_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert "damaged" not in err
    digests = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(digests) == 1
