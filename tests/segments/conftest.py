"""Fixtures of the segment tests: ``segsvc``, a segment service over a migrated database on SQLite and
PostgreSQL (``database_url`` of ``tests/conftest.py``) with the demo program as version 1 and a fixed clock
(``helpers.segments.NOW``). Row builders are in ``helpers/segments.py``."""
from __future__ import annotations

import pytest
from sqlalchemy import insert

from helpers.segments import DEMO_PROGRAM, NOW
from loyalty.server import db
from loyalty.server.models import program_versions


@pytest.fixture
def segsvc(database_url):
    from loyalty.server.segments.service import SegmentService

    db.upgrade(database_url)
    svc = SegmentService.open(database_url, clock=lambda: NOW)
    with svc.db.engine.begin() as conn:
        conn.execute(insert(program_versions).values(version=1, name="demo", yaml=DEMO_PROGRAM, checksum="x",
                                                     published_at=NOW, comment=""))
    try:
        yield svc
    finally:
        svc.close()
