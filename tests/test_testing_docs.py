"""What aiodagger.testing tells users about its fixtures matches what they do."""

from __future__ import annotations

import aiodagger.testing as testing


def test_process_fixture_docs_describe_a_working_cluster():
    # pytest --fixtures shows the fixture's own doc; the module doc is the reference.
    for doc in (testing.__doc__, testing.dagger_process_cluster.__doc__):
        assert doc is not None and "processes=2" in doc
        assert "NotImplementedError" not in doc, doc
