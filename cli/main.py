"""The ``loyalty`` command. Commands are thin: parse the files, call the library, print through
``loyalty.cli.output``. This module holds the group and ``calc`` (the offline calculator of SPEC section 4);
other modules add their commands through ``register(main)`` (see the end of this file).

The group decides what every command shares: ``--version``; the environment variables of options and a
closed pipe (``loyalty ... | head -1``) ending the command quietly with exit 0, as ``cat`` does
(``loyalty.cli.common.LoyaltyGroup``); an example in every command's help (``loyalty.cli.examples``).
"""
from __future__ import annotations

import json
import os
import pathlib

import click

from loyalty.cli.common import LoyaltyGroup
from loyalty.cli.output import emit_json, error_exit

CALC_FILE_KEYS = ("member", "receipt", "budgets_used")


@click.group(name="loyalty", cls=LoyaltyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="loyalty-server", prog_name="loyalty",
                      message="%(prog)s %(version)s")
def main():
    """Loyalty processing: exact receipt pricing, points, segments and scenarios.

    Every command works through a running server (--server / LOYALTY_SERVER), or on a database named by
    --database-url / LOYALTY_DATABASE_URL, or else on the default database `loyalty serve` uses (loyalty.db in
    --data-dir / LOYALTY_HOME, by default the user data dir).
    """


def _read_calc_file(path: str) -> dict:
    p = pathlib.Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        error_exit(f"{p}: file not found")
    except IsADirectoryError:
        error_exit(f"{p}: is a directory, not a receipt file")
    except UnicodeDecodeError as exc:
        error_exit(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})")
    except OSError as exc:
        error_exit(f"{p}: {exc.strerror or exc}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        error_exit(f"{p}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")
    except RecursionError:
        error_exit(f"{p}: JSON nested too deeply")
    if not isinstance(data, dict):
        error_exit(f"{p}: expected a JSON object with \"receipt\" and optional \"member\", \"budgets_used\"")
    for key in data:
        if key not in CALC_FILE_KEYS:
            error_exit(f"{key}: unknown key (expected {', '.join(CALC_FILE_KEYS)})")
    if "receipt" not in data:
        error_exit("receipt: required")
    return data


@main.command()
@click.option("--program", "program_path", required=True, metavar="PROGRAM.yaml", help="The program file.")
@click.option("--receipt", "receipt_path", required=True, metavar="RECEIPT.json",
              help='{"member": {...} or null, "receipt": {...}, "budgets_used": {...}}')
@click.option("--reference", is_flag=True, help="Use the pure-Python reference engine instead of the core.")
@click.option("--pretty", is_flag=True, help="Indent the JSON answer.")
def calc(program_path: str, receipt_path: str, reference: bool, pretty: bool):
    """Answer one receipt offline: discounts, write-off and points, as one JSON object."""
    from loyalty.core import Engine, LoyaltyError, ReferenceEngine, load_program
    from loyalty.core.inputs import parse_budgets_used, parse_request

    try:
        program = load_program(program_path)
        data = _read_calc_file(receipt_path)
        # Validated here too, so a bad file gets the same one-line error whichever engine runs.
        parse_request(data["receipt"], data.get("member"), program)
        budgets = parse_budgets_used(data.get("budgets_used"))
        engine = (ReferenceEngine if reference else Engine)(program)
        answer = engine.calculate(data["receipt"], data.get("member"), budgets)
    except LoyaltyError as exc:
        error_exit(f"{exc.path}: {exc.reason}" if exc.path else exc.reason)
    except Exception as exc:  # a bug, not bad input: still one line, unless asked for the traceback
        if os.environ.get("LOYALTY_TRACEBACK"):
            raise
        error_exit(f"internal error: {type(exc).__name__}: {exc} (LOYALTY_TRACEBACK=1 shows where)", code=1)
    emit_json(answer, pretty=pretty)


def _register_optional_commands():
    import importlib

    from loyalty.cli.examples import add_examples
    for name in ("loyalty.cli.server_commands", "loyalty.cli.segment_commands", "loyalty.cli.scenario_commands",
                 "loyalty.cli.message_commands", "loyalty.cli.security_commands",
                 "loyalty.cli.audit_commands", "loyalty.cli.schema_commands"):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(main)
    add_examples(main)


_register_optional_commands()
