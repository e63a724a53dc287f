"""``ListDeadLetters`` a page at a time: dead messages newest first, then failed runs newest first, each once,
across the boundary between the two kinds; on SQLite and PostgreSQL."""
from __future__ import annotations

from helpers.scenarios import enroll
from loyalty.server.scenarios.grpc_service import ScenariosServicer
from loyalty.v1 import scenarios_pb2


def _walk(servicer, page_size: int) -> list[tuple[str, int]]:
    seen, token = [], ""
    while True:
        page = servicer.list_dead_letters(scenarios_pb2.ListDeadLettersRequest(page_size=page_size, page_token=token))
        assert len(page.dead_letters) <= page_size
        seen += [(d.kind, d.id) for d in page.dead_letters]
        token = page.next_page_token
        if not token:
            return seen


def test_dead_letters_page_across_both_kinds(scn, http_sink, clock):
    service, sc, worker = scn
    http_sink.status = 404                                  # a client error: dead at once
    sc.define({"id": "hook", "triggers": ["member_registered"],
               "steps": [{"id": "call", "webhook": {"url": http_sink.url}}]})
    sc.define({"id": "codes", "triggers": ["member_registered"], "steps": [{"id": "code", "issue_promo_code": "none"}]})
    for card in ("7000201", "7000202", "7000203"):
        enroll(service, card)
    for _ in range(6):                                      # the empty pool fails each run after its retries
        worker.run_until_idle()
        clock.advance(hours=1)
    every = sc.dead_letters(100)
    kinds = [d["kind"] for d in every]
    assert kinds == ["message"] * 3 + ["run"] * 3
    for kind in ("message", "run"):                         # newest first within each kind
        ids = [d["id"] for d in every if d["kind"] == kind]
        assert ids == sorted(ids, reverse=True)
    servicer = ScenariosServicer(sc)
    expected = [(d["kind"], d["id"]) for d in every]
    for page_size in (1, 2, 3, 4, 6, 100):
        assert _walk(servicer, page_size) == expected, page_size
