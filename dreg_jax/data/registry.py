"""Dataset registry used by the engine and the CLI.

Every dataset resolves to a :class:`Dataset`: standardized float32 features, int32 labels,
a fixed train/test split, and ``robust`` test sets (perturbed copies of the test inputs with
the same labels) used for noise-robustness accuracy.

Robust sets for the vector datasets: additive Gaussian noise on the standardized test
features at 5 severities, std = 0.2, 0.4, 0.6, 0.8, 1.0 (fixed noise seed 1234).
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from dreg_jax._checks import check_choice
from dreg_jax.data.sklearn_sets import SKLEARN_DATASETS, load_sklearn_dataset

GAUSSIAN_SEVERITIES = (0.2, 0.4, 0.6, 0.8, 1.0)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    kind: str  # "tabular" | "image" | "text"
    robust: dict  # set name -> (m, d) perturbed x_test

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])


def gaussian_robust_sets(x_test: np.ndarray, seed: int = 1234) -> dict:
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(x_test.shape).astype(np.float32)
    return {f"gaussian_{i + 1}": (x_test + s * noise).astype(np.float32)
            for i, s in enumerate(GAUSSIAN_SEVERITIES)}


KINDS = {"digits": "image", "breast_cancer": "tabular", "wine": "tabular", "iris": "tabular"}
DATASETS = SKLEARN_DATASETS


def check_dataset(name: str) -> str:
    return check_choice("dataset", name, DATASETS)


@functools.lru_cache(maxsize=32)
def load_dataset(name: str) -> Dataset:
    """Loads (and caches in memory) a registered dataset by name."""
    check_dataset(name)
    split = load_sklearn_dataset(name)
    return Dataset(name, split.x_train, split.y_train.astype(np.int32), split.x_test,
                   split.y_test.astype(np.int32), split.num_classes, KINDS[name],
                   gaussian_robust_sets(split.x_test))
