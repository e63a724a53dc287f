"""Scenarios: durable event-driven automation (definitions, runs, outbox, batch points actions).

The few names others use: ``ScenarioService`` (definitions, reports, batches), ``Worker`` (``loyalty
worker``), ``Channels`` (message adapters) and ``add_scenarios_service`` (gRPC, in ``grpc_service``)."""
from .outbox import Channels
from .service import ScenarioService
from .worker import Worker

__all__ = ["ScenarioService", "Worker", "Channels"]
