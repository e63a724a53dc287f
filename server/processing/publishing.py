"""Program publishing: validate, store a new version (with the program's segments and scenarios), switch
every process to it."""
from __future__ import annotations

from typing import Callable, Sequence

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from loyalty.core import ProgramError, load_program_text
from loyalty.v1 import admin_pb2

from ..convert import iso
from ..errors import InvalidArgument, NotFound
from ..members import check_text
from ..models import promotion_budgets
from ..paging import page_of, paged
from ..runtime import Runtime


def canonical(yaml_text: str) -> str:
    """The program text as a version keeps it, less what an editor or a transfer changes without anyone
    meaning to: line endings, spaces at line ends, blank lines at the end. A file whose canonical text is the
    live version's publishes nothing. Comments and layout count: they are part of what ``program show``
    gives back, so changing them is a new version."""
    lines = [line.rstrip() for line in yaml_text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return "\n".join(lines).rstrip("\n")


def _version_message(row: dict) -> admin_pb2.ProgramVersion:
    return admin_pb2.ProgramVersion(version=row["version"], program=row["name"], yaml=row.get("yaml", ""),
                                    published_at=iso(row["published_at"]), comment=row.get("comment") or "",
                                    current=bool(row.get("current")), checksum=row["checksum"],
                                    unchanged=bool(row.get("unchanged")))


ProgramPart = Callable[[dict], None]
"""A module that keeps a part of the program file (segments and audiences; scenarios): given the file's parsed
source before the version is stored, it checks its part and makes it ready (a bad part raises
``InvalidArgument`` naming it, and nothing is published)."""


class Publishing:
    """Program versions: validate, store, switch every process; the modules that keep parts of the program file
    are told through ``parts`` (``ProgramPart``), in order, before the version is stored."""

    def __init__(self, rt: Runtime, parts: Sequence[ProgramPart] = ()):
        self.rt = rt
        self.parts = tuple(parts)

    # ---- Admin service ------------------------------------------------------------------------------------

    def publish_program(self, request) -> admin_pb2.ProgramVersion:
        """Validate ``request.yaml`` (``InvalidArgument`` with the program path, e.g.
        ``promotions[3].effect``), store it as the next immutable version and switch every process to it.
        The file's ``segments:`` and ``audiences:`` are defined (and calculated) first, so a promotion of the
        new version never names an audience that does not exist yet; a bad segment publishes nothing. A file
        whose ``canonical`` text is the live version's publishes nothing either: the live version comes back
        ``unchanged``."""
        check_text("yaml", request.yaml)
        check_text("comment", request.comment)
        try:
            source = load_program_text(request.yaml).source if request.yaml.strip() else None
        except ProgramError:
            source = None     # programs.publish reports it with its path
        live = self._live_version()
        if source is not None and live is not None and canonical(live["yaml"]) == canonical(request.yaml):
            return _version_message(dict(live, unchanged=True))
        if source:
            for prepare in self.parts:
                prepare(source)
        # Every process loads the memberships before it serves the version (ProgramRegistry.memberships),
        # and cached contexts of older versions are not used (their stamps).
        row = self.rt.programs.publish(request.yaml, request.comment)
        budgeted = [p.id for p in self.rt.programs.current().program.promotions
                    if p.limits.discount_budget is not None or p.limits.points_budget is not None]
        if budgeted:
            def seed(conn):
                have = set(conn.execute(select(promotion_budgets.c.promotion)
                                        .where(promotion_budgets.c.promotion.in_(budgeted))).scalars())
                missing = [{"promotion": p, "spent": 0} for p in budgeted if p not in have]
                if missing:
                    conn.execute(insert(promotion_budgets), missing)
            try:
                self.rt.db.run_write(seed)
            except IntegrityError:   # another process seeded them at the same moment
                pass
        return _version_message(dict(row, current=True))

    def _live_version(self) -> dict | None:
        """The live version's row with its YAML, None when nothing is published."""
        try:
            return self.rt.programs.get(0)
        except NotFound:
            return None

    def get_program(self, request) -> admin_pb2.ProgramVersion:
        """Version ``request.version`` (0: the current one) with its YAML; ``NotFound`` when absent."""
        if request.version < 0:
            raise InvalidArgument("version", f"must be 0 (the current one) or a version number, got {request.version}")
        return _version_message(self.rt.programs.get(request.version))

    def list_program_versions(self, request) -> admin_pb2.ListProgramVersionsResponse:
        """The versions, newest first, without the YAML text, a page at a time (``loyalty.server.paging``)."""
        rows, token = paged(self.rt.programs.versions(), page_of(request, "program_versions", (int,)),
                            key=lambda r: (-r["version"],))
        return admin_pb2.ListProgramVersionsResponse(versions=[_version_message(r) for r in rows],
                                                     next_page_token=token)
