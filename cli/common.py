"""What every group of `loyalty` commands shares.

One rule for where a command works: through a running server (``--server`` / ``LOYALTY_SERVER``), or on a
database named by ``--database-url`` / ``LOYALTY_DATABASE_URL`` or by its data dir (``loyalty.db`` in
``--data-dir`` / ``LOYALTY_DATA_DIR`` / ``LOYALTY_HOME``), or else on the one default database that
``loyalty serve`` also uses (in the platform's user data dir); the commands a till's day needs (members,
points, programs, the audit log) go to the default server (127.0.0.1:50051) when nothing is named. Only
``serve``, ``worker``, ``db upgrade`` and
``demo seed`` create or migrate a database (``migrate=True``); every other command refuses one that does not
exist or whose schema is not at head, in one line that says to run ``loyalty db upgrade``, instead of
creating an empty database or failing on a missing table.

Options get their environment variables from the command class (``EnvCommand``): every option of a
service command (``serve``, ``worker``, ``jobs run``) reads ``LOYALTY_<OPTION>``, and every command's
``--help`` lists the variables it reads, so options added later get both for free.

Any failure is one line with a non-zero exit (2 for bad input, 1 for the rest), never a traceback
(``LOYALTY_TRACEBACK=1`` shows it for debugging).
"""
from __future__ import annotations

import os
import pathlib
import sys

import click

from loyalty.cli.output import error_exit

__all__ = ["DEFAULT_SERVER", "EnvCommand", "EnvGroup", "LoyaltyGroup", "ServiceCommand", "ToolCommand",
           "call", "data_dir_named", "data_dir_option", "database_url_option", "demo_summary", "display_url", "fail",
           "json_option", "quiet_option", "check_server", "resolve_url", "seed_demo", "server_option"]

DEFAULT_SERVER = "127.0.0.1:50051"
ENV_PREFIX = "LOYALTY_"
SUPPORTED_SCHEMES = ("sqlite", "postgresql")


class EnvCommand(click.Command):
    """A command whose ``--help`` shows the environment variable of every option that has one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            if isinstance(param, click.Option):
                self.give_envvar(param)
                param.show_envvar = bool(param.envvar)

    def give_envvar(self, option: click.Option) -> None:
        """Only the options that name their own variable (``--server``, ``--database-url``) read one."""


class ServiceCommand(EnvCommand):
    """A long-running command (``serve``, ``worker``, ``jobs run``): every option without a variable of its
    own reads ``LOYALTY_<OPTION>`` (``--metrics-port``: ``LOYALTY_METRICS_PORT``), as containers and
    service managers configure programs."""

    def give_envvar(self, option: click.Option) -> None:
        if not option.envvar and option.name:
            option.envvar = ENV_PREFIX + option.name.upper()


class EnvGroup(click.Group):
    """A group whose commands and subgroups are ``EnvCommand`` / ``EnvGroup`` unless they choose a class."""

    command_class = EnvCommand
    group_class = type      # subgroups are EnvGroups too


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())     # click >= 8.2


class CommandLineRules:
    """What the ``loyalty`` group and ``loyalty-pos`` do the same way, whatever the command: a bad option or
    argument (click's usage errors) is one line and exit 2, like every other bad input; a reader that stops
    reading (``loyalty ... | head -1``) ends the command with exit 0 and no traceback, as ``cat`` does."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:             # a caller that handles click's exceptions itself
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)   # ctx.exit(n) (--help: 0) returns n
        except _NO_ARGS_IS_HELP as exc:      # `loyalty` alone: the help, as click prints it
            exc.show()
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            error_exit(exc.format_message(), code=exc.exit_code)
        except click.Abort:
            error_exit("aborted", code=1)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            _quiet_closed_stdout()
            sys.exit(0)


def _quiet_closed_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush of what the closed pipe refused is silent."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


class LoyaltyGroup(CommandLineRules, EnvGroup):
    """The ``loyalty`` group."""


class ToolCommand(CommandLineRules, EnvCommand):
    """A stand-alone command (``loyalty-pos``) with the ``loyalty`` group's rules."""


def data_dir_named() -> bool:
    """Whether a data dir was named (``--data-dir``, ``LOYALTY_DATA_DIR`` or ``LOYALTY_HOME``): a command that
    goes to the default server unless told otherwise then works on that data dir's database instead."""
    return bool(os.environ.get("LOYALTY_DATA_DIR") or os.environ.get("LOYALTY_HOME"))


def _set_data_dir(ctx, param, value):
    if value:
        os.environ["LOYALTY_DATA_DIR"] = value
    return value


data_dir_option = click.option(
    "--data-dir", envvar=["LOYALTY_DATA_DIR", "LOYALTY_HOME"], metavar="DIR", expose_value=False,
    type=click.Path(file_okay=False), callback=_set_data_dir, is_eager=True,
    help="Where the default SQLite database (loyalty.db) lives [default: the user data dir, "
         "e.g. ~/.local/share/loyalty].")


def database_url_option(fn):
    """``--database-url`` (passed to the command as ``database_url``) and ``--data-dir`` (where the default
    SQLite database lives; it only sets the environment that ``loyalty.server.db.default_url`` reads)."""
    fn = data_dir_option(fn)
    return click.option("--database-url", envvar="LOYALTY_DATABASE_URL", metavar="URL",
                        help="sqlite:///PATH or postgresql+psycopg://USER@HOST:PORT/DB "
                             "[default: loyalty.db in the data dir].")(fn)


def check_server(ctx, param, value):
    """A ``--server`` value: ``HOST:PORT`` with a port gRPC can dial (it would wrap 99999 round to 34463), or
    a gRPC target with its scheme (``unix:/run/loyalty.sock``)."""
    if value and not value.startswith(("unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:")):
        _host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise click.BadParameter(f"expected HOST:PORT with a port from 1 to 65535, got {value!r}")
    return value


server_option = click.option("--server", envvar="LOYALTY_SERVER", metavar="HOST:PORT", callback=check_server,
                             help=f"A running loyalty server [default: {DEFAULT_SERVER}].")
json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print JSON only (for scripts): numbers as numbers, times in RFC 3339 UTC "
                                "(2026-03-02T09:30:00Z).")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bar.")


def resolve_url(database_url: str | None, *, migrate: bool = False) -> str:
    """The database URL a command works on: ``database_url`` or the default one; an unsupported URL is one
    line (exit 2). With ``migrate`` the schema is brought to head (creating the database); without, a
    database that does not exist or is not at head is one line saying what to run (exit 1)."""
    from loyalty.server.db import default_url
    url = database_url or default_url()
    _check_supported(url)
    if migrate:
        call(_upgrade_quietly, url)
    else:
        call(_require_head, url)
    return url


def _check_supported(url: str) -> None:
    """SQLite or PostgreSQL, before any driver is looked for (``mysql://`` is not a ModuleNotFoundError)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from loyalty.server.db import BAD_URL
    try:
        backend = make_url(url).get_backend_name()
    except ArgumentError:
        backend = None
    if backend not in SUPPORTED_SCHEMES:
        error_exit(f"database_url: {BAD_URL}, got {display_url(url)!r}")


def _upgrade_quietly(url: str) -> None:
    """``alembic upgrade head`` without Alembic's INFO lines (they are not the command's output)."""
    import logging

    from loyalty.server.db import upgrade
    logging.getLogger("alembic").setLevel(logging.WARNING)
    upgrade(url)


def _require_head(url: str) -> None:
    """Refuse, in one line, a SQLite file that does not exist or a schema behind (or ahead of) the code."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import InterfaceError, OperationalError
    from sqlalchemy.pool import NullPool

    from loyalty.server.errors import Unavailable
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:") \
            and not pathlib.Path(parsed.database).exists():
        error_exit(f"no database at {parsed.database}: start `loyalty serve` or run `loyalty db upgrade` "
                   f"there, or name another with --database-url", code=1)
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            current, head = _revisions(url, conn)
    except (OperationalError, InterfaceError) as exc:
        raise Unavailable(f"cannot reach the database: {type(exc.orig).__name__}: "
                          f"{str(exc.orig).strip().splitlines()[0] if exc.orig else exc}") from None
    finally:
        engine.dispose()
    if current != head:
        at = f"at revision {', '.join(sorted(current))}" if current else "empty (no schema)"
        error_exit(f"database {display_url(url)} is {at}, not at head {', '.join(sorted(head))}: "
                   f"run `loyalty db upgrade`", code=1)


def _revisions(url: str, conn) -> tuple[set[str], set[str]]:
    """``(the revisions the database is at, the code's heads)``."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from loyalty.server.db import alembic_config
    heads = set(ScriptDirectory.from_config(alembic_config(url)).get_heads())
    return set(MigrationContext.configure(conn).get_current_heads()), heads


def seed_demo(url: str) -> dict:
    """The demo program (unless it is live) and the five demo members on the database at ``url``
    (``loyalty.server.demo.seed_demo``): what ``serve --demo`` and ``demo seed`` do. Returns what was done."""
    from loyalty.server.demo import seed_demo as seed
    from loyalty.server.processing import ProcessingService

    def run():
        service = ProcessingService.open(url)
        try:
            return seed(service)
        finally:
            service.close()
    return call(run)


def demo_summary(seeded: dict) -> str:
    """One line of what ``seed_demo`` did."""
    version, live = seeded.get("program_version"), seeded.get("program_live")
    created = seeded.get("members_created") or []
    program = (f"program published as version {version}" if version else
               f"program not published (version {live}, another program, is live)" if live else "program already live")
    return (f"demo: {program}, "
            f"{len(created)} member(s) created (cards 7000001-7000005)")


def display_url(url: str) -> str:
    """The URL without its password, for printing."""
    from sqlalchemy.engine import make_url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL at all: print it as given
        return url


def fail(exc: BaseException):
    """One line for a failure of the library, of an RPC or of the input; never a traceback."""
    from google.protobuf.json_format import ParseError

    from loyalty.clients import LoyaltyError
    from loyalty.core import LoyaltyError as CoreError
    from loyalty.server.errors import ServiceError

    if isinstance(exc, LoyaltyError):
        if exc.code.name == "UNAVAILABLE" and not exc.reason:
            error_exit(f"UNAVAILABLE: cannot reach the server ({exc.message})", code=1)
        error_exit(exc.one_line(), code=2 if exc.code.name == "INVALID_ARGUMENT" else 1)
    if isinstance(exc, ServiceError):
        error_exit(exc.message if exc.code == "INVALID_ARGUMENT" else f"{exc.code}: {exc.message}",
                   code=2 if exc.code == "INVALID_ARGUMENT" else 1)
    if isinstance(exc, (CoreError, ParseError, UnicodeDecodeError)):
        error_exit(str(exc), code=2)
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        # a path the user gave (a data dir under a file, a folder not there, not theirs): say which
        error_exit(f"{exc.strerror or type(exc).__name__}: {exc.filename}" if exc.filename else str(exc), code=2)
    if os.environ.get("LOYALTY_TRACEBACK"):
        raise exc
    error_exit(f"internal error: {type(exc).__name__}: {exc} (LOYALTY_TRACEBACK=1 shows where)", code=1)


def call(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, any failure reported by ``fail``."""
    try:
        return fn(*args, **kwargs)
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback
        fail(exc)
