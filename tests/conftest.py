import os
import tempfile

# Offline datasets are built into a fresh TFDS data dir for the test session (and its
# subprocesses), so a stale ~/.cache cannot hide a broken builder.
os.environ.setdefault("DREG_JAX_DATA_DIR", tempfile.mkdtemp(prefix="dreg_jax_tfds_"))
os.environ.setdefault("DREG_JAX_CACHE", tempfile.mkdtemp(prefix="dreg_jax_cache_"))

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Double precision for finite-difference checks, restored afterwards."""
    with jax.enable_x64(True):
        yield
