import importlib.util
import os
import pathlib
import sys
import tempfile

# Offline datasets are built into a fresh TFDS data dir for the test session (and its
# subprocesses), so a stale ~/.cache cannot hide a broken builder.
os.environ.setdefault("DREG_JAX_DATA_DIR", tempfile.mkdtemp(prefix="dreg_jax_tfds_"))
os.environ.setdefault("DREG_JAX_CACHE", tempfile.mkdtemp(prefix="dreg_jax_cache_"))
# The suite's programs are small and many: XLA's CPU backend spends most of their time compiling.
# Its optimization level 0 halves the compile seconds (a 3-layer MLP's train program: 12.1 s ->
# 6.7 s on 2 cores) for runs of milliseconds. Results compared in a test are computed under the
# same flags on both sides; studies and users keep XLA's default. A user's own XLA_FLAGS win.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

# the study code (experiments/: report logic, classical baselines) is importable by its tests
EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"
if str(EXPERIMENTS) not in sys.path:
    sys.path.insert(0, str(EXPERIMENTS))

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Double precision for finite-difference checks, restored afterwards."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def load_experiment():
    """Imports ``experiments/<name>.py`` as a module (the scripts are not a package)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    if str(root / "experiments") not in sys.path:  # the scripts import their shared _common
        sys.path.insert(0, str(root / "experiments"))

    def load(name):
        spec = importlib.util.spec_from_file_location(name, root / "experiments" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses in the script look their module up here
        spec.loader.exec_module(module)
        return module

    return load


def file_snapshot(root) -> dict:
    """``relative path -> bytes`` of every file under ``root`` (links recorded by their target):
    what the trust tests compare before and after a command."""
    root = pathlib.Path(root)
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            out[str(path.relative_to(root))] = ("link", os.readlink(path))
        elif path.is_file():
            out[str(path.relative_to(root))] = path.read_bytes()
    return out


def one_line_refusal(capsys, code, *words):
    """Asserts a one-line exit-2 error (no traceback) holding every one of ``words``."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert str(word) in err, (word, err)
    return err


def write_csv(path, header, rows):
    """A CSV file with a header row (the tests' tables)."""
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path
