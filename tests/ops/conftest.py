"""Fixtures of the operator tests: an in-process service to put a ``LoyaltyServer`` around."""
from __future__ import annotations

import pytest

from helpers.storage import DEMO_PROGRAM
from loyalty.server import db
from loyalty.server.processing import ProcessingService
from loyalty.v1 import admin_pb2


def _demo_service(url: str):
    db.upgrade(url)
    service = ProcessingService.open(url)
    service.publish_program(admin_pb2.PublishProgramRequest(yaml=DEMO_PROGRAM, comment="ops tests"))
    try:
        yield service, url
    finally:
        service.close()


@pytest.fixture
def sqlite_service(sqlite_url):
    """``(service, url)``: a processing service on a fresh SQLite database with the demo program published."""
    yield from _demo_service(sqlite_url)


@pytest.fixture
def postgres_service(pg_url):
    """The same on a fresh PostgreSQL database: confirms go through group commit, as served by default."""
    yield from _demo_service(pg_url)
