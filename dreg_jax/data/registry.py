"""Dataset registry: offline TFDS builders and public TFDS names behind one ``load_dataset``.

Every dataset resolves to a :class:`Dataset`: float32 features standardized with the training
split's statistics only (per column, constant columns get std 1; images with one mean and std
over all pixels), int32 labels, a fixed train/test split
and ``robust`` test sets (perturbed copies of the test inputs, same labels) for noise-robustness
accuracy:

* images with a known shape (digits*): the 7 CIFAR-10-C style corruptions x 5 severities of
  :mod:`dreg_jax.data.transforms`, applied to the raw [0, 1] test images;
* other vectors (tabular, MNIST-1D): Gaussian noise, std 0.2, 0.4, 0.6, 0.8, 1.0, and feature
  dropout, rate 0.1 ... 0.5, in standardized units (seed 1234);
* text: text noise at rate 0.05, 0.1, 0.2, 0.3, 0.4 on the raw test reviews, then featurized.

``featurizer`` for text: ``"word_ids"`` / ``"minilm_tokens"`` give token ids and masks for
transformers (``data.text.token_features``, not standardized); ``"hashed"`` (default, hashed n-grams) or ``"minilm"`` (frozen
sentence encoder, optional extra).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import pathlib
import socket

import numpy as np

from dreg_jax.preprocessing import apply_standardization, standardization
from dreg_jax._checks import check_choice
from dreg_jax.data import builders
from dreg_jax.data.text import hashed_ngram_features, minilm_token_features, sentence_embeddings, word_id_features
from dreg_jax.data.transforms import (
    IMAGE_CORRUPTIONS,
    SEVERITIES,
    corrupt_images,
    feature_dropout,
    gaussian_noise,
    text_noise,
)

VECTOR_NOISE_STDS = (0.2, 0.4, 0.6, 0.8, 1.0)
VECTOR_DROPOUT_RATES = (0.1, 0.2, 0.3, 0.4, 0.5)
TEXT_NOISE_RATES = (0.05, 0.1, 0.2, 0.3, 0.4)
ROBUST_SEED = 1234
FEATURIZERS = ("hashed", "minilm", "word_ids", "minilm_tokens")
#: Featurizers whose features are token ids and masks (not standardized; see data.text).
TOKEN_FEATURIZERS = ("word_ids", "minilm_tokens")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str
    kind: str  # "tabular" | "vision" | "text"
    num_classes: int
    source: str  # "offline" | "download"
    num_features: int | None = None  # None for text (featurized at load)
    image_shape: tuple[int, ...] | None = None
    messy: bool = False
    train_size: int | None = None  # for download datasets (TFDS catalog)
    test_size: int | None = None
    tfds_name: str | None = None


OFFLINE = {
    "pima": DatasetInfo("pima", "tabular", 2, "offline", 7),
    "breast_cancer": DatasetInfo("breast_cancer", "tabular", 2, "offline", 30),
    "digits": DatasetInfo("digits", "vision", 10, "offline", 64, (8, 8)),
    "digits_corrupted": DatasetInfo("digits_corrupted", "vision", 10, "offline", 64, (8, 8), messy=True),
    "mnist1d": DatasetInfo("mnist1d", "vision", 10, "offline", 40),
    "mnist1d_noisy": DatasetInfo("mnist1d_noisy", "vision", 10, "offline", 40, messy=True),
    "reviews": DatasetInfo("reviews", "text", 2, "offline"),
    "reviews_noisy": DatasetInfo("reviews_noisy", "text", 2, "offline", messy=True),
    "wine": DatasetInfo("wine", "tabular", 3, "offline", 13),
    "iris": DatasetInfo("iris", "tabular", 3, "offline", 4),
    "glass": DatasetInfo("glass", "tabular", 6, "offline", 9),
    "oj": DatasetInfo("oj", "tabular", 2, "offline", 17),
    "crabs": DatasetInfo("crabs", "tabular", 2, "offline", 6),
    "swiss_labor": DatasetInfo("swiss_labor", "tabular", 2, "offline", 6),
    "birthwt": DatasetInfo("birthwt", "tabular", 2, "offline", 10),
}
#: The eight datasets of the DREG study (tabular, vision, messy vision, NLP, messy NLP).
STUDY_DATASETS = ("pima", "breast_cancer", "digits", "digits_corrupted", "mnist1d",
                  "mnist1d_noisy", "reviews", "reviews_noisy")

PUBLIC = {
    "mnist": DatasetInfo("mnist", "vision", 10, "download", 784, (28, 28), train_size=60000, test_size=10000),
    "fashion_mnist": DatasetInfo("fashion_mnist", "vision", 10, "download", 784, (28, 28), train_size=60000, test_size=10000),
    "cifar10": DatasetInfo("cifar10", "vision", 10, "download", 3072, (32, 32, 3), train_size=50000, test_size=10000),
    "imdb_reviews": DatasetInfo("imdb_reviews", "text", 2, "download", train_size=25000, test_size=25000),
    "glue/sst2": DatasetInfo("glue/sst2", "text", 2, "download", train_size=67349, test_size=872),
    "yelp_polarity_reviews": DatasetInfo("yelp_polarity_reviews", "text", 2, "download", train_size=560000, test_size=38000),
    "ag_news_subset": DatasetInfo("ag_news_subset", "text", 4, "download", train_size=120000, test_size=7600),
}
for _corruption in ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
                    "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
                    "elastic", "pixelate", "jpeg_compression", "speckle_noise", "gaussian_blur",
                    "spatter", "saturate"):
    for _sev in SEVERITIES:
        _name = f"cifar10_corrupted/{_corruption}_{_sev}"
        PUBLIC[_name] = DatasetInfo(_name, "vision", 10, "download", 3072, (32, 32, 3),
                                    train_size=0, test_size=10000)

REGISTRY = {**OFFLINE, **PUBLIC}
DATASETS = tuple(REGISTRY)
#: Datasets registered in this process by ``dreg_jax.data.register_dataset`` (name -> Dataset).
USER_DATASETS: dict = {}


class DatasetUnavailableError(RuntimeError):
    """A public dataset that is not prepared locally and cannot be downloaded."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    kind: str
    robust: dict  # set name -> (m, d) perturbed, standardized x_test
    info: DatasetInfo | None = None
    raw_test: object = None  # raw test images ([0, 1]) or texts, for plots
    x_val: np.ndarray | None = None  # validation split (user data: carved from training)
    y_val: np.ndarray | None = None
    label_names: tuple | None = None  # class index -> original label (user data)
    feature_names: tuple | None = None  # column names, one-hot columns as "column=value"
    # how raw rows became x (user data): dreg_jax.data.preprocessing.Preprocessing
    preprocessing: object = None
    # "classification" (y: class indices, num_classes classes) or "regression" (y: the target,
    # standardized with the training rows' mean and deviation; num_classes 1, the one output)
    task: str = "classification"

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])


def dataset_task(name: str) -> str:
    """``"classification"`` or ``"regression"``: what the dataset's target is (built-in sets
    classify; your own table says, :func:`dreg_jax.data.from_csv` ``task=``)."""
    return USER_DATASETS[name].task if name in USER_DATASETS else "classification"


def check_dataset(name: str) -> str:
    if name not in REGISTRY and name not in USER_DATASETS:
        offline = ", ".join(OFFLINE)
        public = ", ".join(n for n in PUBLIC if "/" not in n or n == "glue/sst2")
        close = difflib.get_close_matches(str(name), DATASETS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown dataset {name!r}{hint}; offline: {offline}; download (tensorflow-datasets): "
            f"{public}, cifar10_corrupted/<corruption>_<1..5>"
        )
    return name


def standardize(x_train, *others, per_feature: bool = True):
    """Subtract the training mean and divide by the training std (per column, or one scalar),
    with the scaling of :func:`dreg_jax.preprocessing.standardization` for huge magnitudes."""
    stats = standardization(x_train, per_feature)
    return tuple(apply_standardization(x, stats) for x in (np.asarray(x_train), *others))


def check_finite(name: str, split: str, x: np.ndarray):
    bad = np.flatnonzero(~np.isfinite(x).all(axis=0))
    if bad.size:
        raise ValueError(
            f"dataset {name!r} ({split}): feature column(s) {bad.tolist()[:10]} contain NaN/inf; "
            "impute or drop them before training"
        )


def _featurize(texts, featurizer, data_dir):
    if featurizer == "hashed":
        return hashed_ngram_features(texts)
    if featurizer == "word_ids":
        return word_id_features(texts)
    if featurizer == "minilm_tokens":
        return minilm_token_features(texts)
    return sentence_embeddings(texts, pathlib.Path(data_dir or builders.default_data_dir()) / "embeddings")


def _vector_robust_sets(x_test_std):
    sets = {f"gaussian_{i + 1}": gaussian_noise(x_test_std, s, ROBUST_SEED + i)
            for i, s in enumerate(VECTOR_NOISE_STDS)}
    sets.update({f"dropout_{i + 1}": feature_dropout(x_test_std, r, ROBUST_SEED + 10 + i)
                 for i, r in enumerate(VECTOR_DROPOUT_RATES)})
    return sets


def _assemble(info: DatasetInfo, train, test, featurizer, data_dir) -> Dataset:
    (x_tr, y_tr), (x_te, y_te) = train, test
    raw_test = x_te
    robust_raw = {}
    if info.kind == "text":
        robust_raw = {f"text_noise_{i + 1}": _featurize(text_noise(x_te, r, ROBUST_SEED + i), featurizer, data_dir)
                      for i, r in enumerate(TEXT_NOISE_RATES)}
        x_tr, x_te = _featurize(x_tr, featurizer, data_dir), _featurize(x_te, featurizer, data_dir)
    elif info.image_shape is not None and len(info.image_shape) == 2:
        images = x_te.reshape((-1,) + info.image_shape)
        robust_raw = {f"{c}_{s}": corrupt_images(images, c, s, ROBUST_SEED + 7 * k + s).reshape(len(x_te), -1)
                      for k, c in enumerate(IMAGE_CORRUPTIONS) for s in SEVERITIES}
    check_finite(info.name, "train", x_tr)
    check_finite(info.name, "test", x_te)
    names = list(robust_raw)
    # images: one scalar mean/std over all training pixels; per-pixel statistics would turn
    # noise on the near-constant border pixels into huge standardized values
    if featurizer in TOKEN_FEATURIZERS and info.kind == "text":  # ids stay ids
        robust = list(robust_raw.values())
    else:
        x_tr, x_te, *robust = standardize(x_tr, x_te, *robust_raw.values(),
                                          per_feature=info.image_shape is None)
    robust = dict(zip(names, robust)) if names else _vector_robust_sets(x_te)
    return Dataset(info.name, x_tr, y_tr.astype(np.int32), x_te, y_te.astype(np.int32),
                   info.num_classes, info.kind, robust, info, raw_test)


def _offline_host_reachable(host="storage.googleapis.com", timeout=2.0) -> bool:
    if os.environ.get("DREG_JAX_OFFLINE") == "1":
        return False
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(old)


def _public_split(info: DatasetInfo, split: str, data_dir):
    tfds = builders._quiet_tfds()
    kwargs = dict(data_dir=str(data_dir), builder_kwargs={"file_format": "array_record"})
    try:  # prepared locally (or mocked by tfds.testing.mock_data)?
        source = tfds.data_source(info.name, split=split, download=False, **kwargs)
    except Exception as local_err:  # noqa: BLE001
        if not _offline_host_reachable():
            raise DatasetUnavailableError(
                f"dataset {info.name!r} is not prepared in {data_dir} and cannot be downloaded "
                "(no network). On a machine with a network run it once (it downloads on first "
                f"use) and copy {data_dir} here, or pass --data-dir to a prepared copy; the "
                f"offline datasets are: {', '.join(OFFLINE)}"
            ) from local_err
        source = tfds.data_source(info.name, split=split, download=True, **kwargs)
    items = builders.read_all(source)
    labels = np.array([ex["label"] for ex in items], np.int32)
    if info.kind == "text":
        field = next(k for k in ("text", "sentence", "description") if k in items[0])
        values = [ex[field].decode() if isinstance(ex[field], bytes) else str(ex[field]) for ex in items]
    else:
        values = np.stack([np.asarray(ex["image"], np.float32).reshape(-1) / 255.0 for ex in items])
    return values, labels


@functools.lru_cache(maxsize=32)
def _load(name: str, data_dir, featurizer: str) -> Dataset:
    info = REGISTRY[name]
    if info.source == "offline":
        splits = builders.read_offline(name, info.num_classes, info.num_features, data_dir)
        return _assemble(info, splits["train"], splits["test"], featurizer, data_dir)
    data_dir = data_dir or builders.default_data_dir()
    test = _public_split(info, "test", data_dir)
    if info.name.startswith("cifar10_corrupted/"):  # test-only robustness set
        x = test[0] if info.kind != "text" else _featurize(test[0], featurizer, data_dir)
        empty = np.zeros((0, x.shape[1]), np.float32)
        return Dataset(name, empty, np.zeros(0, np.int32), x.astype(np.float32), test[1],
                       info.num_classes, info.kind, {}, info, test[0])
    train = _public_split(info, "train", data_dir)
    return _assemble(info, train, test, featurizer, data_dir)


def stratified_holdout(y: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of a stratified ``fraction`` of rows: ``round(fraction n_c)`` per class,
    at least one of a class with >= 2 rows, never all of a class."""
    held = np.zeros(len(y), bool)
    if fraction <= 0:
        return held
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        k = min(max(int(round(fraction * len(rows))), 1 if len(rows) >= 2 else 0), len(rows) - 1)
        held[rng.permutation(rows)[:k]] = True
    return held


VALIDATION_SEED = 20240  # the built-in sets' validation rows are the same for every run


def carve_validation(ds: Dataset, fraction: float, seed: int = VALIDATION_SEED) -> Dataset:
    """``ds`` with a stratified ``fraction`` of its training rows moved to ``x_val``/``y_val``.

    Deterministic (``seed``). The features keep the standardization computed on the whole
    training split (feature statistics only; no label reaches the training side).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return ds
    held = stratified_holdout(ds.y_train, fraction, np.random.default_rng(seed))
    return dataclasses.replace(ds, x_train=ds.x_train[~held], y_train=ds.y_train[~held],
                               x_val=ds.x_train[held], y_val=ds.y_train[held])


def load_dataset(name: str, data_dir=None, featurizer: str = "hashed",
                 validation_fraction: float = 0.0) -> Dataset:
    """Loads a registered dataset (offline: built once into ``data_dir``, then cached).

    Args:
      name: a name from ``dreg_jax.data.DATASETS`` (``dreg-jax data list``), or one registered
        by ``register_dataset``.
      data_dir: the TFDS data directory; default ``$DREG_JAX_DATA_DIR`` or
        ``~/.cache/dreg_jax/tfds``.
      featurizer: text datasets: ``"hashed"``, ``"minilm"`` (embeddings), ``"word_ids"`` or
        ``"minilm_tokens"`` (token ids and masks for transformers).
      validation_fraction: a stratified share of the training split held out as the validation
        split (deterministic, :func:`carve_validation`); 0 keeps the published splits as they are.
        Your own datasets carry the validation split ``from_arrays`` made.
    """
    check_dataset(name)
    check_choice("featurizer", featurizer, FEATURIZERS)
    if name in USER_DATASETS:
        if validation_fraction:
            raise ValueError(f"{name!r} is your own dataset: its validation split was made by "
                             "from_arrays/from_csv (validation_fraction there)")
        return USER_DATASETS[name]
    ds = _load(name, None if data_dir is None else str(data_dir), featurizer)
    return carve_validation(ds, validation_fraction)
