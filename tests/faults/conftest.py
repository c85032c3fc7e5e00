"""The fault suite: real worker and beat processes, real Redis and PostgreSQL, lying upstreams.

Every test under ``tests/faults/`` is marked ``faults`` (``pytest -m faults`` runs the suite on its
own) and needs PostgreSQL: the faults it injects (killed processes, terminated connections, races
between processes) are PostgreSQL's to survive, and SQLite's file locks would only test SQLite.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from django.db import connection

from tests.integration.conftest import start_workers  # noqa: F401 - the fixture

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.faults)
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _postgresql_only() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("the fault suite runs on PostgreSQL (DATABASE_URL=postgres://...)")
