"""The session fixture of tests/mergekit_reference.py, a plugin (`pytest_plugins`) of the modules comparing with
mergekit; apart from the helpers they import, since pytest warns of a plugin already imported when it loads it."""

import pytest

from tests.mergekit_reference import Reference, merge_with_mergekit


@pytest.fixture(scope="session")
def mergekit(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """Every registered case merged by mergekit, once per session."""
    return merge_with_mergekit(tmp_path_factory.mktemp("mergekit"))
