"""Fixtures of the operator tests: an in-process service to put a ``LoyaltyServer`` around."""
from __future__ import annotations

import pytest

from helpers.storage import DEMO_PROGRAM
from loyalty.server import db
from loyalty.server.processing import ProcessingService
from loyalty.v1 import admin_pb2


@pytest.fixture
def sqlite_service(sqlite_url):
    """``(service, url)``: a processing service on a fresh SQLite database with the demo program published."""
    db.upgrade(sqlite_url)
    service = ProcessingService.open(sqlite_url)
    service.publish_program(admin_pb2.PublishProgramRequest(yaml=DEMO_PROGRAM, comment="ops tests"))
    try:
        yield service, sqlite_url
    finally:
        service.close()
