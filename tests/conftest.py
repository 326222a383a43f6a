import jax
import pytest


@pytest.fixture
def x64():
    """Double precision for finite-difference checks, restored afterwards."""
    with jax.enable_x64(True):
        yield
