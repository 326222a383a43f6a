"""Small tabular/image datasets shipped inside scikit-learn (no network needed).

Split: stratified, 25% test, fixed ``split_seed`` (default 0); features standardized with
the training split's mean and standard deviation only (constant columns get std 1).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dreg_jax._checks import check_choice

SKLEARN_DATASETS = ("digits", "breast_cancer", "wine", "iris")


class Split(NamedTuple):
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int


def standardize(x_train, x_test):
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32)


def load_sklearn_dataset(name: str, split_seed: int = 0, test_fraction: float = 0.25) -> Split:
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    check_choice("dataset", name, SKLEARN_DATASETS)
    bunch = getattr(datasets, f"load_{name}")()
    x, y = bunch.data.astype(np.float64), bunch.target.astype(np.int32)
    for j in np.flatnonzero(~np.isfinite(x).all(axis=0)):
        raise ValueError(f"dataset {name!r}: feature column {j} contains NaN/inf")
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=split_seed
    )
    x_tr, x_te = standardize(x_tr, x_te)
    return Split(x_tr, y_tr, x_te, y_te, int(y.max()) + 1)
