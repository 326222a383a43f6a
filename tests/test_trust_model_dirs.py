"""A saved model is whole or refused: every damaged, tampered or half-written model directory is
refused by load_model in one line naming the file and the field; a save killed at any point
leaves the old model or the new one, never a mix; two savers give one model and one message; a
full disk keeps the old model; nothing is written through a link."""
import errno
import hashlib
import json
import os
import shutil
import signal
import warnings

import jax
import numpy as np
import pytest
from flax import serialization

import dreg_jax
from dreg_jax import saved_model
from dreg_jax.data import from_arrays
from dreg_jax.training.train import build_model

from conftest import file_snapshot

CONFIG = dreg_jax.TrainConfig(model=dreg_jax.ModelConfig(hidden=(8, 8, 8)), epochs=1, batch_size=16)


def _variables(seed, hidden=(8, 8, 8), num_features=4):
    config = dreg_jax.TrainConfig(model=dreg_jax.ModelConfig(hidden=hidden))
    v = build_model(config, 3).init(jax.random.key(seed), np.zeros((1, num_features), np.float32))
    return jax.tree_util.tree_map(np.array, {"params": v["params"], "batch_stats": v.get("batch_stats", {})})


@pytest.fixture(scope="module")
def preprocessing():
    rng = np.random.default_rng(0)
    ds = from_arrays(rng.normal(size=(60, 4)), rng.integers(0, 3, 60), validation_fraction=0.0,
                     label_names=["a", "b", "c"])
    return ds.preprocessing


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, preprocessing):
    d = tmp_path_factory.mktemp("models") / "m"
    dreg_jax.save_model(d, _variables(0), CONFIG, 3, 4, preprocessing=preprocessing, run={"seed": 0})
    return d


def _x(n=5):
    return np.random.default_rng(1).normal(size=(n, 4)).astype(np.float32)


def _record(d):
    return json.loads((d / "model.json").read_text())


def _write_record(d, record):
    (d / "model.json").write_text(json.dumps(record))


def _set(path, value):
    def mutate(record):
        node = record
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return mutate


def _delete(path):
    def mutate(record):
        node = record
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return mutate


def _rehash(d):
    """Recompute the recorded checksum and size (a tamperer who knows the format)."""
    payload = (d / "variables.msgpack").read_bytes()
    record = _record(d)
    record["variables"].update(bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest())
    _write_record(d, record)


# name: (mutation of model.json as a dict, words the one-line error holds)
RECORD_CASES = {
    "format missing": (_delete(["format"]), ["model.json", "not a dreg_jax model"]),
    "format other": (_set(["format"], "keras"), ["model.json", "'keras'"]),
    "version 99": (_set(["format_version"], 99), ["model.json", "format version 99"]),
    "version string": (_set(["format_version"], "2"), ["model.json", "format version '2'"]),
    "num_classes missing": (_delete(["num_classes"]), ["model.json", "'num_classes'"]),
    "num_classes bool": (_set(["num_classes"], True), ["model.json", "'num_classes'"]),
    "num_classes 1": (_set(["num_classes"], 1), ["model.json", "'num_classes'", "2..100000"]),
    "num_classes huge": (_set(["num_classes"], 10 ** 9), ["model.json", "'num_classes'"]),
    "num_classes 4 for 3 labels": (_set(["num_classes"], 4), ["model.json", "label_names", "4"]),
    "num_classes float": (_set(["num_classes"], 3.0), ["model.json", "'num_classes'", "int"]),
    "num_features missing": (_delete(["num_features"]), ["model.json", "'num_features'"]),
    "num_features 0": (_set(["num_features"], 0), ["model.json", "'num_features'"]),
    "num_features text": (_set(["num_features"], "4"), ["model.json", "'num_features'"]),
    "num_features 3": (_set(["num_features"], 3), ["model.json", "num_features"]),
    "config missing": (_delete(["config"]), ["model.json", "'config'"]),
    "config list": (_set(["config"], []), ["model.json", "'config'"]),
    "config.model missing": (_delete(["config", "model"]), ["model.json", "'model'"]),
    "config.optimizer missing": (_delete(["config", "optimizer"]), ["model.json", "'optimizer'"]),
    "config.regularizer text": (_set(["config", "regularizer"], "dreg"), ["model.json", "'regularizer'"]),
    "config.epochs missing": (_delete(["config", "epochs"]), ["model.json", "config cannot be read", "epochs"]),
    "config unknown field": (_set(["config", "model", "depth"], 3), ["model.json", "config cannot be read", "depth"]),
    "activation unknown": (_set(["config", "model", "activation"], "swishy"), ["model.json", "swishy"]),
    "hidden drops a layer": (_set(["config", "model", "hidden"], [8, 8]), ["model.json", "variables.leaves",
                                                                            "dense_2"]),
    "hidden wider": (_set(["config", "model", "hidden"], [8, 16, 8]), ["model.json", "variables.leaves"]),
    "hidden huge": (_set(["config", "model", "hidden"], [200000] * 3), ["model.json", "hidden", "1..65536"]),
    "hidden empty": (_set(["config", "model", "hidden"], []), ["model.json", "hidden"]),
    "hidden text": (_set(["config", "model", "hidden"], ["8"]), ["model.json", "hidden"]),
    "hidden bool": (_set(["config", "model", "hidden"], [True]), ["model.json", "hidden"]),
    "hidden negative": (_set(["config", "model", "hidden"], [-8, 8, 8]), ["model.json", "hidden"]),
    "preprocessing missing": (_delete(["preprocessing"]), ["model.json", "'preprocessing'"]),
    "preprocessing list": (_set(["preprocessing"], []), ["model.json", "'preprocessing'"]),
    "label names short": (_set(["preprocessing", "label_names"], ["a", "b"]), ["model.json", "label_names", "2"]),
    "label names text": (_set(["preprocessing", "label_names"], "abc"), ["model.json", "label_names"]),
    "mean NaN": (_set(["preprocessing", "mean"], [float("nan")] * 4), ["model.json", "preprocessing.mean"]),
    "mean short": (_set(["preprocessing", "mean"], [0.0] * 3), ["model.json", "preprocessing.mean"]),
    "std zero": (_set(["preprocessing", "std"], [0.0] * 4), ["model.json", "positive"]),
    "scale text": (_set(["preprocessing", "scale"], ["1"] * 4), ["model.json", "preprocessing.scale"]),
    "preprocessing version": (_set(["preprocessing", "version"], 7), ["model.json", "preprocessing", "version 7"]),
    "columns missing": (_delete(["preprocessing", "columns"]), ["model.json", "preprocessing cannot be read"]),
    "run list": (_set(["run"], [1]), ["model.json", "'run'"]),
    "run missing": (_delete(["run"]), ["model.json", "'run'"]),
    "variables missing": (_delete(["variables"]), ["model.json", "'variables'"]),
    "sha256 missing": (_delete(["variables", "sha256"]), ["model.json", "'sha256'"]),
    "sha256 short": (_set(["variables", "sha256"], "abc"), ["model.json", "SHA-256"]),
    "sha256 other": (_set(["variables", "sha256"], "0" * 64), ["variables.msgpack", "SHA-256"]),
    "bytes missing": (_delete(["variables", "bytes"]), ["model.json", "'bytes'"]),
    "bytes smaller": (lambda r: r["variables"].update(bytes=r["variables"]["bytes"] - 1),
                      ["variables.msgpack", "bytes"]),
    "bytes larger": (lambda r: r["variables"].update(bytes=r["variables"]["bytes"] + 1),
                     ["variables.msgpack", "bytes"]),
    "leaves missing": (_delete(["variables", "leaves"]), ["model.json", "'leaves'"]),
    "leaf shape": (lambda r: r["variables"]["leaves"]["params/dense_0/kernel"].update(shape=[4, 9]),
                   ["model.json", "variables.leaves", "dense_0/kernel"]),
    "leaf dtype": (lambda r: r["variables"]["leaves"]["params/dense_0/kernel"].update(dtype="float16"),
                   ["model.json", "variables.leaves", "float16"]),
    "leaf extra": (lambda r: r["variables"]["leaves"].update({"params/Dense_9/kernel": {"shape": [1], "dtype": "float32"}}),
                   ["model.json", "Dense_9"]),
}


@pytest.mark.parametrize("case", sorted(RECORD_CASES))
def test_tampered_model_json_is_refused_by_name(case, model_dir, tmp_path):
    mutate, words = RECORD_CASES[case]
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    record = _record(d)
    mutate(record)
    _write_record(d, record)
    before = file_snapshot(tmp_path)
    with pytest.raises(ValueError) as err:
        dreg_jax.load_model(d)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)
    assert file_snapshot(tmp_path) == before  # a reader never writes


def _variables_file_cases():
    def truncate(d):
        p = d / "variables.msgpack"
        p.write_bytes(p.read_bytes()[:-10])

    def flip(d):
        p = d / "variables.msgpack"
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 1
        p.write_bytes(bytes(data))

    def other_model(d):  # same shapes and size, another model's weights
        (d / "variables.msgpack").write_bytes(serialization.msgpack_serialize(_variables(7)))

    def nan_rehashed(d):
        v = _variables(0)
        v["params"]["dense_1"]["kernel"][0, 0] = np.nan
        (d / "variables.msgpack").write_bytes(serialization.msgpack_serialize(v))
        _rehash(d)

    def extra_layer_rehashed(d):
        v = _variables(0)
        v["params"]["Dense_9"] = {"kernel": np.zeros((2, 2), np.float32)}
        (d / "variables.msgpack").write_bytes(serialization.msgpack_serialize(v))
        _rehash(d)

    def missing_layer_rehashed(d):
        v = _variables(0)
        del v["params"]["dense_2"]
        (d / "variables.msgpack").write_bytes(serialization.msgpack_serialize(v))
        _rehash(d)

    def garbage_rehashed(d):
        (d / "variables.msgpack").write_bytes(b"\xc1" * 100)
        _rehash(d)

    def link_dev_zero(d):
        (d / "variables.msgpack").unlink()
        (d / "variables.msgpack").symlink_to("/dev/zero")

    def removed(d):
        (d / "variables.msgpack").unlink()

    def directory(d):
        (d / "variables.msgpack").unlink()
        (d / "variables.msgpack").mkdir()

    def json_link(d):
        (d.parent / "notes.txt").write_text((d / "model.json").read_text())
        (d / "model.json").unlink()
        (d / "model.json").symlink_to("../notes.txt")

    def json_empty_list(d):
        (d / "model.json").write_text("[]")

    def json_torn(d):
        p = d / "model.json"
        p.write_text(p.read_text()[:50])

    def json_binary(d):
        (d / "model.json").write_bytes(b"\xff\xfe" * 10)

    def json_deep(d):
        (d / "model.json").write_text("[" * 100000 + "]" * 100000)

    return {
        "variables truncated": (truncate, ["variables.msgpack", "bytes"]),
        "variables bit flipped": (flip, ["variables.msgpack", "SHA-256"]),
        "another model's weights": (other_model, ["variables.msgpack", "SHA-256"]),
        "NaN weights with a recomputed checksum": (nan_rehashed, ["variables.msgpack", "NaN", "dense_1"]),
        "extra layer with a recomputed checksum": (extra_layer_rehashed, ["variables.msgpack", "Dense_9"]),
        "missing layer with a recomputed checksum": (missing_layer_rehashed, ["variables.msgpack", "dense_2"]),
        "garbage with a recomputed checksum": (garbage_rehashed, ["variables.msgpack", "cannot be read"]),
        "variables link to /dev/zero": (link_dev_zero, ["variables.msgpack", "symbolic link"]),
        "variables removed": (removed, ["variables.msgpack", "missing"]),
        "variables a directory": (directory, ["variables.msgpack", "not a regular file"]),
        "model.json a link": (json_link, ["model.json", "symbolic link"]),
        "model.json []": (json_empty_list, ["model.json", "list"]),
        "model.json torn": (json_torn, ["model.json", "not valid JSON"]),
        "model.json binary": (json_binary, ["model.json", "not valid JSON"]),
        "model.json nested deep": (json_deep, ["model.json"]),
    }


FILE_CASES = _variables_file_cases()


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_damaged_model_files_are_refused_by_name(case, model_dir, tmp_path):
    damage, words = FILE_CASES[case]
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    damage(d)
    with pytest.raises(ValueError) as err:
        dreg_jax.load_model(d)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_a_saved_model_round_trips_and_records_its_variables(model_dir, preprocessing):
    model = dreg_jax.load_model(model_dir)
    record = _record(model_dir)
    assert record["format_version"] == 2
    payload = (model_dir / "variables.msgpack").read_bytes()
    assert record["variables"]["sha256"] == hashlib.sha256(payload).hexdigest()
    assert record["variables"]["leaves"]["params/dense_0/kernel"] == {"shape": [4, 8], "dtype": "float32"}
    chex_equal = jax.tree_util.tree_map(np.array_equal, model.variables, _variables(0))
    assert all(jax.tree_util.tree_leaves(chex_equal))
    assert sorted(p.name for p in model_dir.iterdir()) == ["model.json", "variables.msgpack"]


def test_a_format_1_model_still_loads_with_its_tree_checked(model_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    record = _record(d)
    del record["variables"]
    record["format_version"] = 1
    _write_record(d, record)
    np.testing.assert_array_equal(dreg_jax.load_model(d).logits(_x()), dreg_jax.load_model(model_dir).logits(_x()))
    record["config"]["model"]["hidden"] = [8, 8]  # the silent layer drop of format 1 is now refused
    _write_record(d, record)
    with pytest.raises(ValueError, match="variables.msgpack does not fit .*dense_2"):
        dreg_jax.load_model(d)


@pytest.mark.parametrize("case", ["missing directory", "a file", "empty directory"])
def test_not_a_model_directory(case, tmp_path):
    d = tmp_path / "m"
    if case == "a file":
        d.write_text("x")
    elif case == "empty directory":
        d.mkdir()
    with pytest.raises(ValueError, match="is not a saved model"):
        dreg_jax.load_model(d)


# -- saving: refusals before anything is written --------------------------------------------

def _save(d, variables=None, **kwargs):
    return dreg_jax.save_model(d, _variables(0) if variables is None else variables, CONFIG, 3, 4, **kwargs)


def _planted_link(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    (d / "model.json").symlink_to("../notes.txt")
    return d


def _link_dir(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "m").symlink_to("elsewhere")
    return tmp_path / "m"


def _read_only(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    return parent / "m"


def _under_file(tmp_path):
    (tmp_path / "run.json").write_text("{}")
    return tmp_path / "run.json" / "m"


def _lock_link(tmp_path):
    (tmp_path / "victim.txt").write_text("keep me")
    (tmp_path / ".m.lock").symlink_to("victim.txt")
    return tmp_path / "m"


SAVE_REFUSALS = {
    "a file": (lambda t: (t / "m").write_text("x") and t / "m", "is a file"),
    "other files": (lambda t: ((t / "m").mkdir(), (t / "m" / "notes.txt").write_text("x"), t / "m")[-1], "holds other files"),
    "model.json planted link": (_planted_link, "is a link"),
    "directory is a link": (_link_dir, "symbolic link"),
    "read-only parent": (_read_only, "read-only"),
    "under a file": (_under_file, "which is a file"),
    "lock file a link": (_lock_link, "symbolic link"),
}


@pytest.mark.parametrize("case", sorted(SAVE_REFUSALS))
def test_save_refusals_write_nothing(case, tmp_path):
    make, words = SAVE_REFUSALS[case]
    d = make(tmp_path)
    before = file_snapshot(tmp_path)
    try:
        with pytest.raises((ValueError, OSError), match=words):
            _save(d)
    finally:
        for p in tmp_path.iterdir():
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)
    assert file_snapshot(tmp_path) == before


def test_nonfinite_variables_are_never_saved(tmp_path):
    v = _variables(0)
    v["params"]["dense_2"]["bias"][1] = np.inf
    with pytest.raises(ValueError, match="diverged.*nothing was saved"):
        _save(tmp_path / "m", v)
    assert not (tmp_path / "m").exists()


def test_label_count_must_match_classes(tmp_path, preprocessing):
    with pytest.raises(ValueError, match="3 labels for 4 classes"):
        dreg_jax.save_model(tmp_path / "m", _variables(0), CONFIG, 4, 4, preprocessing=preprocessing)


# -- kills, full disks, two savers -----------------------------------------------------------

KILL_POINTS = ["save:start", "save:variables.msgpack:half", "save:variables.msgpack:written", "save:model.json:half",
               "save:model.json:written", "save:before-rename", "save:after-rename"]
# (point, an old model there, exchange rename available); the fallback path adds its own point
KILLS = ([(p, old, True) for p in KILL_POINTS for old in (False, True)]
         + [(p, True, False) for p in ("save:before-rename", "save:between-renames", "save:after-rename")]
         + [("save:model.json:half", True, False), ("save:variables.msgpack:half", True, False),
            ("save:start", True, False)])


def _killed_save(d, point, exchange):
    """Forks a child that saves model seed 1 into ``d`` and SIGKILLs itself at ``point`` (the
    variables are made before the fork: the child runs no JAX, only file writes)."""
    variables = _variables(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # JAX warns about fork; the child only writes files
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.environ["DREG_JAX_FAULT"] = f"{point}:kill"
            if not exchange:
                saved_model._renameat2_exchange = lambda: None
            _save(d, variables)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return status


@pytest.mark.parametrize("point,old,exchange", KILLS, ids=[f"{p}-{'replace' if o else 'new'}-{'exchange' if e else 'two-renames'}"
                                                           for p, o, e in KILLS])
def test_a_killed_save_leaves_the_old_model_or_the_new_one(point, old, exchange, tmp_path):
    d = tmp_path / "m"
    if old:
        _save(d, _variables(0))
    want = {0: dreg_jax.TrainedModel(CONFIG, _variables(0), 3, 4).logits(_x()),
            1: dreg_jax.TrainedModel(CONFIG, _variables(1), 3, 4).logits(_x())}
    status = _killed_save(d, point, exchange)
    fired = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert fired, status
    if not old and not d.exists():
        assert point not in ("save:after-rename",)  # only a kill before the rename leaves nothing
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logits = dreg_jax.load_model(d).logits(_x())
    whole = [seed for seed, w in want.items() if np.array_equal(logits, w)]
    assert len(whole) == 1
    if point in ("save:after-rename",):
        assert whole == [1]
    elif old and point != "save:after-rename":
        assert whole == [0]
    # the next save completes and clears what the killed one left
    _save(d, _variables(1))
    np.testing.assert_array_equal(dreg_jax.load_model(d).logits(_x()), want[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("point", ["save:variables.msgpack:half", "save:model.json:half", "save:before-rename"])
def test_a_full_disk_keeps_the_old_model(point, tmp_path, monkeypatch):
    d = tmp_path / "m"
    _save(d, _variables(0))
    before = file_snapshot(d)
    monkeypatch.setenv("DREG_JAX_FAULT", f"{point}:enospc")
    with pytest.raises(OSError) as err:
        _save(d, _variables(1))
    assert err.value.errno == errno.ENOSPC
    monkeypatch.delenv("DREG_JAX_FAULT")
    assert file_snapshot(d) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary left


def test_two_savers_give_one_model_and_one_message(tmp_path):
    d = tmp_path / "m"
    read_end, write_end = os.pipe()
    go_read, go_write = os.pipe()
    first, second = _variables(0), _variables(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the first saver holds the lock while the second tries
        try:
            with saved_model.model_directory_lock(d):
                os.write(write_end, b"1")
                os.read(go_read, 1)
                _save(d, first)
        finally:
            os._exit(0)
    assert os.read(read_end, 1) == b"1"
    with pytest.raises(RuntimeError, match="another process is saving a model to .*m") as err:
        _save(d, second)
    assert "\n" not in str(err.value)
    os.write(go_write, b"1")
    os.waitpid(pid, 0)
    np.testing.assert_array_equal(dreg_jax.load_model(d).logits(_x()),
                                  dreg_jax.TrainedModel(CONFIG, _variables(0), 3, 4).logits(_x()))


def test_a_save_inside_its_own_lock_is_allowed(tmp_path):
    with saved_model.model_directory_lock(tmp_path / "m"):
        _save(tmp_path / "m")
        _save(tmp_path / "m", _variables(1))
    assert dreg_jax.load_model(tmp_path / "m").num_classes == 3

