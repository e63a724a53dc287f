"""Scenario definitions: validation errors name the path (unknown step, unreachable step, a loop with no wait,
more than 10 triggers...), several triggers of one type, and the re-entry policies."""
from __future__ import annotations

import pytest

from helpers.scenarios import WELCOME, enroll, runs
from loyalty.server.errors import InvalidArgument
from loyalty.server.scenarios.definitions import parse_scenario, parse_scenarios

import yaml


def base(**kw):
    d = {"id": "s", "triggers": ["purchase_confirmed"], "steps": [{"id": "a", "award_points": 10}]}
    d.update(kw)
    return d


def error(raw) -> tuple[str, str]:
    with pytest.raises(InvalidArgument) as exc:
        parse_scenario(raw, "scenarios[0]")
    return exc.value.path, exc.value.reason


def test_welcome_example_is_valid_and_has_five_registration_triggers():
    d = parse_scenario(yaml.safe_load(WELCOME.read_text(encoding="utf-8")))
    assert [t["source"] for t in d["triggers"]] == ["form", "api", "pos", "import", "manual"]
    assert d["reentry"] == "never"
    assert [s["id"] for s in d["steps"]][:3] == ["welcome_email", "pause", "confirmed"]


def test_more_than_ten_triggers_is_refused():
    path, reason = error(base(triggers=["purchase_confirmed"] * 11))
    assert path == "scenarios[0].triggers" and "at most 10" in reason
    assert len(parse_scenario(base(triggers=[{"member_registered": {"source": "pos"}}] * 10))["triggers"]) == 10


def test_unknown_step_type_names_the_step():
    path, reason = error(base(steps=[{"id": "a", "award_points": 1}, {"id": "b", "teleport": {}}]))
    assert path == "scenarios[0].steps[1]" and "unknown step type 'teleport'" in reason


def test_unknown_reference_names_the_key():
    path, reason = error(base(steps=[{"id": "a", "award_points": 1, "next": "nowhere"}]))
    assert path == "scenarios[0].steps[0].next" and "no step 'nowhere'" in reason


def test_unreachable_step_is_refused():
    path, reason = error(base(steps=[{"id": "a", "award_points": 1, "next": "end"}, {"id": "b", "award_points": 2}]))
    assert path == "scenarios[0].steps[1]" and "unreachable" in reason


def test_loop_without_wait_is_refused_and_with_a_wait_accepted():
    loop = [{"id": "a", "condition": {"tag": "vip"}, "yes": "end", "no": "b"},
            {"id": "b", "send_sms": {"body": "hi"}}, {"id": "c", "goto": "a"}]
    path, reason = error(base(steps=loop))
    assert path.startswith("scenarios[0].steps[") and "a -> b -> c -> a" in reason and "no wait" in reason
    loop.insert(2, {"id": "w", "wait": "1d"})
    assert len(parse_scenario(base(steps=loop))["steps"]) == 4


def test_goto_must_go_back_and_templates_know_their_placeholders():
    path, _ = error(base(steps=[{"id": "a", "goto": "b"}, {"id": "b", "award_points": 1}]))
    assert path == "scenarios[0].steps[0].goto"
    path, reason = error(base(steps=[{"id": "a", "send_email": {"body": "hi {nickname}"}}]))
    assert path == "scenarios[0].steps[0].send_email.body" and "{nickname}" in reason


def test_bad_trigger_option_and_duplicate_ids_in_the_program_list():
    path, _ = error(base(triggers=[{"member_registered": {"source": "fax"}}]))
    assert path == "scenarios[0].triggers[0].source"
    with pytest.raises(InvalidArgument) as exc:
        parse_scenarios([base(), base()])
    assert exc.value.path == "scenarios[1].id"


# ---- triggers and re-entry, against a database ----------------------------------------------------------------

def _scenario(sc, reentry, triggers=("purchase_confirmed",)):
    sc.define({"id": "r", "reentry": reentry, "triggers": list(triggers),
               "steps": [{"id": "w", "wait": "1d"}, {"id": "done", "add_tag": "seen"}]})


_seq = iter(range(10**6))


def _events(service, member_id, n, kind="purchase_confirmed"):
    from loyalty.server.models import events
    with service.db.write() as conn:
        for _ in range(n):
            conn.execute(events.insert().values(kind=kind, key=f"test:{next(_seq)}", member_id=member_id,
                                                payload={"payable": 1000}, created_at=service.clock()))


@pytest.mark.parametrize("reentry, expected", [("never", 1), ("always", 2)])
def test_reentry_never_and_always(scn, reentry, expected):
    service, sc, worker = scn
    _scenario(sc, reentry)
    m = enroll(service, "7000002")
    _events(service, m, 2)
    worker.run_until_idle()
    assert len(runs(service.db, "r")) == expected


def test_reentry_after_exit_waits_for_the_run_to_end(scn, clock):
    service, sc, worker = scn
    _scenario(sc, "after_exit")
    m = enroll(service, "7000003")
    _events(service, m, 1)
    worker.run_until_idle()
    _events(service, m, 1)             # still inside (waiting a day): refused
    worker.run_until_idle()
    assert len(runs(service.db, "r")) == 1
    clock.advance(days=1)
    worker.run_until_idle()            # the first run ends
    _events(service, m, 1)
    worker.run_until_idle()
    assert [r["state"] for r in runs(service.db, "r")] == ["done", "active"]


def test_several_triggers_of_one_type_select_the_sources(scn):
    service, sc, worker = scn
    _scenario(sc, "never", [{"member_registered": {"source": "form"}}, {"member_registered": {"source": "pos"}}])
    enroll(service, "7000010", source="api")
    enroll(service, "7000011", source="form")
    enroll(service, "7000012", source="pos")
    worker.run_until_idle()
    assert sorted(r["trigger"] for r in runs(service.db, "r")) == ["triggers[0]", "triggers[1]"]
