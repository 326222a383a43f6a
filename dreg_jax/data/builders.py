"""TFDS builders for the offline datasets, prepared as array_record and read back with
``tfds.data_source`` (no TensorFlow needed).

Each offline dataset ``NAME`` has a ``GeneratorBasedBuilder`` registered as ``dreg_NAME``
whose examples come from :mod:`dreg_jax.data.sources`. :func:`read_offline` prepares it once
into ``data_dir`` and reads both splits into numpy. A partial or corrupt prepared directory
(missing files, truncated records, wrong counts) is detected, deleted and rebuilt once.
"""
from __future__ import annotations

import logging
import os
import pathlib
import shutil
import sys

import numpy as np

from dreg_jax._files import exclusive_lock

from dreg_jax.data.sources import SOURCES

DATA_DIR_ENV = "DREG_JAX_DATA_DIR"
VERSION = "1.0.0"


def default_data_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get(DATA_DIR_ENV, pathlib.Path.home() / ".cache" / "dreg_jax" / "tfds"))


_BUILDERS: dict = {}


def _quiet_tfds():
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    logging.getLogger("absl").setLevel(logging.ERROR)
    return tfds


def builder_class(name: str, num_classes: int, num_features: int | None):
    """The (cached) builder class for ``name``: text if ``num_features`` is None."""
    if name in _BUILDERS:
        return _BUILDERS[name]
    tfds = _quiet_tfds()

    def _info(self):
        features = {"label": tfds.features.ClassLabel(num_classes=num_classes)}
        if num_features is None:
            features["text"] = tfds.features.Text()
        else:
            features["features"] = tfds.features.Tensor(shape=(num_features,), dtype=np.float32)
        return tfds.core.DatasetInfo(builder=self, description=f"dreg_jax offline dataset {name}",
                                     features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        data = SOURCES[name]()
        return {split: self._generate_examples(columns) for split, columns in data.items()}

    def _generate_examples(self, columns):
        for i, label in enumerate(columns["label"]):
            example = {"label": int(label)}
            if "text" in columns:
                example["text"] = columns["text"][i]
            else:
                example["features"] = columns["features"][i]
            yield i, example

    camel = "Dreg" + "".join(part.capitalize() for part in name.split("_"))
    cls = type(camel, (tfds.core.GeneratorBasedBuilder,), {
        "VERSION": tfds.core.Version(VERSION), "_info": _info,
        "_split_generators": _split_generators, "_generate_examples": _generate_examples,
        "__module__": __name__,
    })
    _BUILDERS[name] = cls
    return cls


def read_all(source) -> list:
    """Every record of a TFDS data source (batched read; per-item where batching is missing)."""
    keys = list(range(len(source)))
    if not keys:
        return []
    try:
        return source.__getitems__(keys)
    except TypeError:  # e.g. tfds.testing.mock_data sources
        return [source[i] for i in keys]


def _read_split(source, text: bool):
    items = read_all(source)
    labels = np.array([ex["label"] for ex in items], np.int32)
    if text:
        values = [ex["text"].decode() if isinstance(ex["text"], bytes) else ex["text"] for ex in items]
    else:
        values = np.stack([ex["features"] for ex in items]).astype(np.float32)
    return values, labels


def _records_on_disk(builder, split: str) -> int:
    """Records actually stored in the split's array_record shards (independent of the metadata)."""
    from array_record.python.array_record_module import ArrayRecordReader

    total = 0
    for shard in sorted(pathlib.Path(builder.data_dir).glob(f"*-{split}.array_record-*")):
        reader = ArrayRecordReader(str(shard))
        try:
            total += reader.num_records()
        finally:
            reader.close()
    return total


def _read(builder, text: bool):
    out = {}
    for split in ("train", "test"):
        expected = builder.info.splits[split].num_examples
        stored = _records_on_disk(builder, split)
        if stored != expected:
            raise OSError(f"{split}: shards hold {stored} records, the metadata says {expected}")
        values, labels = _read_split(builder.as_data_source(split=split), text)
        if len(labels) != expected or expected == 0:
            raise OSError(f"{split}: read {len(labels)} examples, expected {expected}")
        out[split] = (values, labels)
    return out


def read_offline(name: str, num_classes: int, num_features: int | None, data_dir=None):
    """Prepares (once) and reads ``name``: ``{"train": (x or texts, y), "test": (...)}``.

    Processes that use the same dataset for the first time at once take turns: an exclusive
    lock on ``<data_dir>/<builder>.lock`` covers the build, the check and the read, so one
    builds while the others wait and then read (none sees a half-built directory as damaged).
    """
    data_dir = pathlib.Path(data_dir or default_data_dir())
    cls = builder_class(name, num_classes, num_features)
    data_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(data_dir / f"{cls.name}.lock", holder="another process is building the dataset", wait=True):
        return _prepare_and_read(cls, name, num_features, data_dir)


def _prepare_and_read(cls, name, num_features, data_dir):
    prepared_dir = data_dir / cls.name / VERSION
    for attempt in (0, 1):
        try:  # the builder reads dataset_info.json when made: a damaged one fails here
            builder = cls(data_dir=str(data_dir), file_format="array_record")
            builder.download_and_prepare()
            return _read(builder, num_features is None)
        except Exception as err:  # noqa: BLE001 - any failure to read means a bad directory
            if attempt:
                raise OSError(f"dataset {name!r} could not be built in {data_dir}: {err}") from err
            reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            print(f"dreg_jax: prepared dataset {name!r} in {prepared_dir} is damaged ({reason}); "
                  "rebuilding it", file=sys.stderr)
            shutil.rmtree(prepared_dir, ignore_errors=True)
            for partial in (data_dir / cls.name).glob("incomplete*"):
                shutil.rmtree(partial, ignore_errors=True)
