import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: learning checks of several minutes, run with `pytest -m slow`")


def pytest_collection_modifyitems(config, items):
    """Slow learning checks are deselected (and counted as such) unless asked for with -m slow."""
    if "slow" not in (config.getoption("-m") or ""):
        slow = [item for item in items if "slow" in item.keywords]
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if "slow" not in item.keywords]


@pytest.fixture(scope="session")
def painter():
    from common import load_model_and_tokenizer
    return load_model_and_tokenizer()
