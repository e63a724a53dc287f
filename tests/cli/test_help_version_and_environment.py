"""``loyalty --version``; an example in the help of every command; every ``serve`` option settable by
``LOYALTY_<OPTION>`` and listed so in ``--help``; the port-in-use message once, before any database work."""
from __future__ import annotations

import importlib.metadata
import pathlib
import socket

import click
import pytest
from click.testing import CliRunner

from loyalty.cli.main import main
from serverutil import cli, pos


def every_command(group: click.Group, path=()):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from every_command(command, (*path, name))
        else:
            yield (*path, name)


COMMANDS = sorted(every_command(main))


def test_version_is_the_installed_packages():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"loyalty {importlib.metadata.version('loyalty-server')}\n"
    assert pos("--version").stdout == f"loyalty-pos {importlib.metadata.version('loyalty-server')}\n"


def test_there_are_commands_to_check():
    assert {("serve",), ("program", "publish"), ("demo", "seed"), ("worker",), ("segments", "list")} <= set(COMMANDS)


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_command_has_help_with_an_example(path):
    result = CliRunner().invoke(main, [*path, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    usage, _, rest = result.output.partition("\n\n")
    description = rest.split("Options:")[0].strip()
    assert description, f"{' '.join(path)}: no description"
    example = result.output.split("Example:\n", 1)
    assert len(example) == 2, f"{' '.join(path)}: no example"
    first = example[1].splitlines()[0].strip()
    assert first.startswith(f"loyalty {' '.join(path)}") or f"loyalty {' '.join(path)}" in example[1], first


def test_loyalty_pos_help_has_an_example():
    shown = pos("--help").stdout
    assert shown.startswith("Usage: loyalty-pos [OPTIONS]")
    assert "Example:\n    loyalty-pos --card 7000001\n" in shown


def serve_options():
    command = main.commands["serve"]
    return [p for p in command.params if isinstance(p, click.Option)]


@pytest.mark.parametrize("option", serve_options(), ids=lambda o: o.opts[0])
def test_every_serve_option_has_its_loyalty_variable_listed_in_help(option):
    expected = "LOYALTY_" + option.opts[0].lstrip("-").replace("-", "_").upper()
    envvars = [option.envvar] if isinstance(option.envvar, str) else list(option.envvar)
    assert envvars[0] == expected
    _names, text = option.get_help_record(click.Context(main.commands["serve"], info_name="serve"))
    assert f"env var: {', '.join(envvars)}" in text
    shown = " ".join(CliRunner().invoke(main, ["serve", "--help"]).output.split())
    assert " ".join(text.split()) in shown


def taken_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_a_taken_port_is_one_line_before_any_database_is_made(home, tmp_path):
    with taken_port() as sock:
        port = sock.getsockname()[1]
        data = tmp_path / "data"
        result = cli("serve", "--port", str(port), "--data-dir", str(data), env=home)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use (is another server there?)"]
    assert result.stdout == "" and not data.exists()


def test_serve_reads_its_options_from_the_environment(home, tmp_path):
    """LOYALTY_PORT and LOYALTY_DATA_DIR set, no options: the taken port from the environment is refused."""
    with taken_port() as sock:
        port = sock.getsockname()[1]
        result = cli("serve", env={**home, "LOYALTY_PORT": str(port), "LOYALTY_DATA_DIR": str(tmp_path / "d"),
                                   "LOYALTY_HOST": "127.0.0.1"})
    assert result.stderr.strip() == (f"error: cannot listen on 127.0.0.1:{port}: Address already in use "
                                     f"(is another server there?)")
    bad = cli("serve", env={**home, "LOYALTY_WORKERS": "many"})
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [
        "error: Invalid value for '--workers' (env var: 'LOYALTY_WORKERS'): 'many' is not a valid integer."]
    assert not pathlib.Path(home["LOYALTY_HOME"]).exists()


@pytest.mark.parametrize("args, message", [
    (("member", "adjust", "7000001", "--kind", "gift", "--points", "5", "--reason", "x"),
     "error: Invalid value for '--kind': 'gift' is not one of 'credit', 'debit', 'top_up'."),
    (("program", "publsh", "p.yaml"), "error: No such command 'publsh'. Did you mean 'publish'?"),
    (("segments", "count"), "error: Missing argument 'ID'."),
])
def test_a_bad_command_line_is_one_line_and_exit_2(home, args, message):
    result = cli(*args, env=home)
    assert (result.returncode, result.stdout, result.stderr.splitlines()) == (2, "", [message])


def test_loyalty_pos_bad_option_is_one_line():
    result = pos("--redeem", "-1")
    assert (result.returncode, result.stderr.splitlines()) == (
        2, ["error: Invalid value for '--redeem': -1 is not in the range x>=0."])


# Commands that print no data of their own: the server's log, CSV (its own format), the engine's JSON answer.
# serve prints no data; segments export writes CSV; calc, member export and schema always print JSON (or the
# reference page)
NO_JSON = {("serve",), ("segments", "export"), ("calc",), ("member", "export"), ("schema",)}


@pytest.mark.parametrize("path", [p for p in COMMANDS if p not in NO_JSON], ids=" ".join)
def test_every_command_that_prints_data_has_json(path):
    command = main
    for name in path:
        command = command.commands[name]
    assert "--json" in [opt for p in command.params for opt in getattr(p, "opts", ())]
