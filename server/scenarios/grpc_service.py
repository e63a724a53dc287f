"""``loyalty.v1.Scenarios`` over gRPC: each method turns the request message into one ``ScenarioService`` call
and its result into the response message. Errors stay ``loyalty.server.errors`` types, so the server maps
them to status codes and rich details exactly as for the other services.

``add_scenarios_service(server, module)`` is what the gRPC server calls (the lead wires it into
``grpc_server.py``, next to ``add_segments_service``): ``server`` is the transport's ``LoyaltyServer`` (its
raw-bytes handlers, error mapping, metrics and I/O pool are reused) or a plain ``grpc.Server``; ``module``
is the process's ``Runtime`` (its database and clock are shared) or a ``ScenarioService``.
"""
from __future__ import annotations

import json

from loyalty.server.grpc_register import register_servicer
from loyalty.server.paging import page_of, paged
from loyalty.server.runtime import Runtime
from loyalty.server.timeutil import iso
from loyalty.v1 import scenarios_pb2

from .service import ScenarioService

__all__ = ["ScenariosServicer", "add_scenarios_service", "SERVICE_NAME"]

SERVICE_NAME = "loyalty.v1.Scenarios"
_EVENT_FIELDS = tuple(f.name for f in scenarios_pb2.MessageEvent.DESCRIPTOR.fields)


def _scenario(d: dict) -> scenarios_pb2.Scenario:
    return scenarios_pb2.Scenario(id=d["id"], title=d["title"], version=d["version"], enabled=d["enabled"],
                                  origin=d["origin"], triggers=d["triggers"], steps=d["steps"],
                                  definition_json=json.dumps(d["definition"], ensure_ascii=False),
                                  updated_at=iso(d["updated_at"]))


def _batch(b: dict) -> scenarios_pb2.BatchProgress:
    return scenarios_pb2.BatchProgress(batch_id=b["id"], kind=b["kind"], points=b["points"], state=b["state"],
                                       total=b["total"], processed=b["processed"], written=b["written"],
                                       points_moved=b["points_moved"], created_at=iso(b["created_at"]),
                                       finished_at=iso(b["finished_at"]))


class ScenariosServicer:
    """The methods of ``loyalty.v1.Scenarios`` as plain sync functions: request message in, response out."""

    def __init__(self, scenarios: ScenarioService):
        self.scenarios = scenarios

    def create_scenario(self, request):
        return _scenario(self.scenarios.define(request.yaml, mode="create", path="scenario"))

    def update_scenario(self, request):
        return _scenario(self.scenarios.define(request.yaml, mode="update", path="scenario"))

    def list_scenarios(self, request):
        rows, token = paged(self.scenarios.list(), page_of(request, "scenarios", (str,)), key=lambda d: (d["id"],))
        return scenarios_pb2.ListScenariosResponse(scenarios=[_scenario(d) for d in rows], next_page_token=token)

    def get_scenario_stats(self, request):
        s = self.scenarios.stats(request.id)
        return scenarios_pb2.ScenarioStats(
            scenario_id=s["scenario_id"], version=s["version"],
            triggers=[scenarios_pb2.TriggerStats(**t) for t in s["triggers"]],
            steps=[scenarios_pb2.StepStats(**x) for x in s["steps"]],
            runs_active=s["runs"]["active"], runs_done=s["runs"]["done"], runs_failed=s["runs"]["failed"])

    def get_funnel(self, request):
        f = self.scenarios.funnel(request.id, goal=request.goal or None, within=request.within or None)
        return scenarios_pb2.Funnel(scenario_id=f["scenario_id"], goal=f["goal"], within_seconds=f["within_seconds"],
                                    stages=[scenarios_pb2.FunnelStage(**s) for s in f["stages"]])

    def list_dead_letters(self, request):
        page = page_of(request, "dead_letters", (str, int))
        rows = self.scenarios.dead_letters(page.size + 1, after=page.after)
        token = page.token(rows, key=lambda r: (r["kind"], r["id"]))
        return scenarios_pb2.ListDeadLettersResponse(next_page_token=token, dead_letters=[
            scenarios_pb2.DeadLetter(kind=r["kind"], id=r["id"], key=r["key"], scenario_id=r["scenario_id"] or "",
                                     step=r["step"] or "", member_id=r["member_id"] or 0, channel=r["channel"],
                                     attempts=r["attempts"], error=r["error"] or "", at=iso(r["at"]))
            for r in rows[:page.size]])

    def retry_dead_letter(self, request):
        return scenarios_pb2.RetryDeadLetterResponse(
            retried=self.scenarios.retry_dead_letter(request.kind, request.id)["retried"])

    def start_batch(self, request):
        return _batch(self.scenarios.start_batch(
            request.batch_id, request.kind, request.points, reason=request.reason,
            expiry_days=request.expiry_days if request.HasField("expiry_days") else None,
            segment=request.segment or None, members=list(request.members) or None,
            all_members=request.all_members))

    def get_batch_progress(self, request):
        return _batch(self.scenarios.batch_progress(request.batch_id))

    def record_message_events(self, request):
        out = self.scenarios.record_message_events([{f: getattr(e, f) for f in _EVENT_FIELDS}
                                                    for e in request.events])
        return scenarios_pb2.RecordMessageEventsResponse(
            recorded=out["recorded"], duplicates=out["duplicates"], duplicate_indexes=out["duplicate_indexes"],
            rejected=[scenarios_pb2.RejectedMessageEvent(**r) for r in out["rejected"]],
            subscriptions_changed=out["subscriptions_changed"])


def add_scenarios_service(server, module: ScenarioService | Runtime) -> ScenariosServicer:
    """Register ``loyalty.v1.Scenarios`` on ``server`` (a ``LoyaltyServer`` or a plain ``grpc.Server``):
    the module given, or one over the process's ``Runtime``."""
    if not isinstance(module, ScenarioService):
        module = ScenarioService(module.db, clock=module.clock)
    servicer = ScenariosServicer(module)
    register_servicer(server, scenarios_pb2, "Scenarios", servicer)
    return servicer

