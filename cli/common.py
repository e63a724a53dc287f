"""What every group of `loyalty` commands shares: the database options, and turning any failure into one
line with a non-zero exit (2 for bad input, 1 for the rest), never a traceback
(``LOYALTY_TRACEBACK=1`` shows it for debugging)."""
from __future__ import annotations

import os

import click

from loyalty.cli.output import error_exit

__all__ = ["database_url_option", "json_option", "quiet_option", "resolve_url", "fail", "call"]


def _set_data_dir(ctx, param, value):
    if value:
        os.environ["LOYALTY_DATA_DIR"] = value
    return value


def database_url_option(fn):
    """``--database-url`` (passed to the command) and ``--data-dir`` (where the embedded SQLite lives; it
    only sets the environment that ``loyalty.server.db.default_url`` reads)."""
    fn = click.option("--data-dir", envvar="LOYALTY_DATA_DIR", metavar="DIR", expose_value=False,
                      type=click.Path(file_okay=False), callback=_set_data_dir,
                      help="Where the embedded SQLite database lives [default: ./.loyalty; env LOYALTY_DATA_DIR]")(fn)
    return click.option("--database-url", envvar="LOYALTY_DATABASE_URL", metavar="URL",
                        help="sqlite:///PATH or postgresql+psycopg://USER@HOST:PORT/DB "
                             "[default: SQLite in the data dir; env LOYALTY_DATABASE_URL]")(fn)


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON only (for scripts).")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bar.")


def resolve_url(database_url: str | None) -> str:
    if database_url:
        return database_url
    from loyalty.server.db import default_url
    return default_url()


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
