import pytest


@pytest.fixture(autouse=True)
def _every_test_compiles_fresh(fresh_compile):
    """Every test here compiles from scratch (tests/conftest.py's fresh_compile)."""
    yield
