r"""Messy-data transforms: pure, seeded (``numpy.random.Generator`` seeds), documented amounts.

Image corruptions follow CIFAR-10-C (Hendrycks & Dietterich 2019) on images in [0, 1], with
their severity parameters ``c[s-1]`` for severity ``s`` in 1..5 (outputs clipped to [0, 1]):

=================  =========================================  ==============================
corruption         operation                                  c (severity 1..5)
=================  =========================================  ==============================
gaussian_noise     x + N(0, c^2)                              0.04, 0.06, 0.08, 0.09, 0.10
shot_noise         Poisson(x c) / c                           500, 250, 100, 75, 50
impulse_noise      a fraction c of pixels set to 0 or 1       0.01, 0.02, 0.03, 0.05, 0.07
gaussian_blur      Gaussian filter, sigma = c pixels          0.4, 0.6, 0.7, 0.8, 1.0
contrast           (x - mean(x)) c + mean(x)                  0.75, 0.5, 0.4, 0.3, 0.15
brightness         x + c                                      0.05, 0.1, 0.15, 0.2, 0.3
pixelate           box-downsample to round(c H) then nearest  0.95, 0.9, 0.85, 0.75, 0.65
=================  =========================================  ==============================

Vectors (standardized features): Gaussian noise ``x + N(0, std^2)`` and feature dropout (each
entry zeroed with probability ``rate``, i.e. set to the training mean).

Labels: ``symmetric`` noise replaces a label, with probability ``rate``, by a uniformly drawn
other class; ``pair`` (class-dependent) noise moves class ``c`` to ``(c + 1) mod C``.

Text: per word, with probability ``rate``: a typo (adjacent-key substitution), a swap of two
adjacent characters, a character deletion, or dropping the word (each 1/4).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from dreg_jax._checks import check_choice

SEVERITIES = (1, 2, 3, 4, 5)
IMAGE_CORRUPTION_PARAMS = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
}
IMAGE_CORRUPTIONS = tuple(IMAGE_CORRUPTION_PARAMS)
LABEL_NOISE_KINDS = ("symmetric", "pair")


def _severity_param(name, severity):
    check_choice("corruption", name, IMAGE_CORRUPTIONS)
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    return IMAGE_CORRUPTION_PARAMS[name][severity - 1]


def _pixelate(images, c):
    n, h, w = images.shape
    small = max(1, int(round(c * h)))
    # box-average into small x small cells, then nearest-neighbour back to h x w
    rows = np.minimum((np.arange(h) * small) // h, small - 1)
    cols = np.minimum((np.arange(w) * small) // w, small - 1)
    out = np.zeros((n, small, small))
    counts = np.zeros((small, small))
    np.add.at(counts, (rows[:, None], cols[None, :]), 1)
    for i in range(h):
        for j in range(w):
            out[:, rows[i], cols[j]] += images[:, i, j]
    out /= counts
    return out[:, rows][:, :, cols]


def corrupt_images(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """CIFAR-10-C style corruption of ``(n, H, W)`` images in [0, 1]; see the module table."""
    images = np.asarray(images, np.float64)
    if images.ndim != 3:
        raise ValueError(f"images must be (n, H, W), got shape {images.shape}")
    c = _severity_param(name, severity)
    rng = np.random.default_rng(seed)
    if name == "gaussian_noise":
        out = images + rng.normal(0.0, c, images.shape)
    elif name == "shot_noise":
        out = rng.poisson(images * c) / c
    elif name == "impulse_noise":
        out = images.copy()
        hit = rng.random(images.shape) < c
        out[hit] = rng.integers(0, 2, hit.sum())
    elif name == "gaussian_blur":
        out = ndimage.gaussian_filter(images, sigma=(0, c, c), mode="nearest")
    elif name == "contrast":
        mean = images.mean(axis=(1, 2), keepdims=True)
        out = (images - mean) * c + mean
    elif name == "brightness":
        out = images + c
    else:  # pixelate
        out = _pixelate(images, c)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def random_corruptions(images: np.ndarray, seed: int) -> np.ndarray:
    """Each image gets one uniformly drawn corruption at a uniformly drawn severity ("messy")."""
    rng = np.random.default_rng(seed)
    kinds = rng.integers(0, len(IMAGE_CORRUPTIONS), len(images))
    sevs = rng.integers(1, 6, len(images))
    out = np.empty_like(images, dtype=np.float32)
    for k in range(len(IMAGE_CORRUPTIONS)):
        for s in SEVERITIES:
            idx = np.flatnonzero((kinds == k) & (sevs == s))
            if idx.size:
                out[idx] = corrupt_images(images[idx], IMAGE_CORRUPTIONS[k], s, seed=seed + 7 * k + s)
    return out


def gaussian_noise(x: np.ndarray, std: float, seed: int = 0) -> np.ndarray:
    """``x + N(0, std^2)`` elementwise."""
    if std < 0:
        raise ValueError(f"std must be >= 0, got {std}")
    return (x + np.random.default_rng(seed).normal(0.0, std, x.shape)).astype(np.float32)


def feature_dropout(x: np.ndarray, rate: float, seed: int = 0) -> np.ndarray:
    """Each entry set to 0 (the training mean after standardization) with probability ``rate``."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be in [0, 1), got {rate}")
    keep = np.random.default_rng(seed).random(x.shape) >= rate
    return (x * keep).astype(np.float32)


def label_noise(labels: np.ndarray, rate: float, num_classes: int, kind: str = "symmetric",
                seed: int = 0) -> np.ndarray:
    """Noisy copy of ``labels``: ``symmetric`` or class-dependent ``pair`` flips at ``rate``."""
    check_choice("label noise kind", kind, LABEL_NOISE_KINDS)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be in [0, 1), got {rate}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    flip = rng.random(labels.shape) < rate
    if kind == "symmetric":
        target = (labels + rng.integers(1, max(num_classes, 2), labels.shape)) % num_classes
    else:
        target = (labels + 1) % num_classes
    return np.where(flip, target, labels).astype(labels.dtype)


_KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_NEIGHBOURS = {}
for _row in _KEYBOARD_ROWS:
    for _i, _ch in enumerate(_row):
        _NEIGHBOURS[_ch] = (_row[_i - 1] if _i else "") + (_row[_i + 1] if _i + 1 < len(_row) else "")


def text_noise(texts, rate: float, seed: int = 0) -> list[str]:
    """Per word with probability ``rate``: typo, adjacent swap, deletion or word dropout."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    rng = np.random.default_rng(seed)
    out = []
    for text in texts:
        words = []
        for word in text.split():
            if rng.random() >= rate:
                words.append(word)
                continue
            op = rng.integers(4)
            if op == 3 or len(word) < 2:  # word dropout
                continue
            i = int(rng.integers(len(word) - 1))
            if op == 0:  # typo: adjacent-key substitution
                ch = word[i].lower()
                sub = _NEIGHBOURS.get(ch) or "e"
                word = word[:i] + sub[int(rng.integers(len(sub)))] + word[i + 1:]
            elif op == 1:  # swap adjacent characters
                word = word[:i] + word[i + 1] + word[i] + word[i + 2:]
            else:  # delete a character
                word = word[:i] + word[i + 1:]
            words.append(word)
        out.append(" ".join(words))
    return out
