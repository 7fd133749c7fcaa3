"""Runs last (file order): the whole suite left the working tree as it found it."""

from __future__ import annotations

import pytest
from test_clean_tree import tree_files


def test_the_suite_left_the_working_tree_as_it_was(request):
    before = getattr(request.config, "green_tree_before", None)
    if before is None:
        pytest.skip("the session's first listing is missing")
    created = sorted(tree_files() - before)
    assert not created, f"tests wrote into the working tree: {created[:20]}"
