"""Program versions: publish validates and stores immutable versions; every process switches within a
second (by polling without Redis, by pub/sub with it)."""
from __future__ import annotations

import time

import pytest

from helpers.storage import DEMO_PROGRAM, REDIS_URL, require_redis
from loyalty.server.errors import InvalidArgument, NotFound
from loyalty.server.processing import ProcessingService
from loyalty.v1 import admin_pb2



def test_publish_rejects_a_bad_program_with_its_path(service):
    bad = DEMO_PROGRAM.replace("max_percent: 20 ", "max_percent: 120 ", 1)
    with pytest.raises(InvalidArgument) as e:
        service.publish_program(admin_pb2.PublishProgramRequest(yaml=bad))
    assert e.value.path == "redeem.max_percent"
    assert [v.version for v in service.list_program_versions(admin_pb2.ListProgramVersionsRequest()).versions] == [1]


def test_versions_are_immutable_and_listed_newest_first(service):
    v2 = service.publish_program(admin_pb2.PublishProgramRequest(yaml=DEMO_PROGRAM.replace("program: demo",
                                                                                          "program: demo2"),
                                                                 comment="rename"))
    assert (v2.version, v2.program, v2.current) == (2, "demo2", True)
    listed = service.list_program_versions(admin_pb2.ListProgramVersionsRequest()).versions
    assert [(v.version, v.current, v.yaml) for v in listed] == [(2, True, ""), (1, False, "")]
    one = service.get_program(admin_pb2.GetProgramRequest(version=1))
    assert one.yaml == DEMO_PROGRAM and not one.current and len(one.checksum) == 64
    with pytest.raises(NotFound):
        service.get_program(admin_pb2.GetProgramRequest(version=9))


def _wait_for_version(svc, version, limit=1.0):
    start = time.monotonic()
    while time.monotonic() - start < limit + 0.5:
        try:
            if svc.programs.current().version == version:
                return time.monotonic() - start
        except Exception:  # noqa: BLE001
            pass
        time.sleep(0.05)
    raise AssertionError(f"version {version} did not arrive")


def test_another_process_switches_within_a_second_by_polling(service, database_url, clock):
    other = ProcessingService.open(database_url, clock=clock)
    try:
        assert other.programs.current().version == 1
        service.publish_program(admin_pb2.PublishProgramRequest(yaml=DEMO_PROGRAM + "\n# v2\n"))
        assert _wait_for_version(other, 2) < 1.0
    finally:
        other.close()


@pytest.mark.redis
def test_another_process_switches_at_once_with_redis(sqlite_url, clock):
    require_redis()
    from loyalty.server import db
    db.upgrade(sqlite_url)
    a = ProcessingService.open(sqlite_url, redis_url=REDIS_URL, clock=clock)
    b = ProcessingService.open(sqlite_url, redis_url=REDIS_URL, clock=clock)
    try:
        a.publish_program(admin_pb2.PublishProgramRequest(yaml=DEMO_PROGRAM))
        b.programs.current()
        time.sleep(0.3)          # b's listener is subscribed
        a.publish_program(admin_pb2.PublishProgramRequest(yaml=DEMO_PROGRAM + "\n# v2\n"))
        # Redis mode polls only every 5 s: arriving well under that proves the message did it.
        assert _wait_for_version(b, 2, limit=1.0) < 1.0
    finally:
        a.close()
        b.close()
