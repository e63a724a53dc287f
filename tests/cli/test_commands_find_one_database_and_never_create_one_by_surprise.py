"""Where a command works: a running server (``--server``), a database named by ``--database-url``, or the one
default database of ``loyalty serve`` (``loyalty.db`` in ``LOYALTY_HOME`` / the user data dir). Only
``serve``, ``worker``, ``db upgrade`` and ``demo seed`` create or migrate one; every other command refuses,
in one line that says what to run, a database that is missing, empty or behind."""
from __future__ import annotations

import json
import os
import pathlib
import re

import pytest

from serverutil import cli

NOT_AT_HEAD = "run `loyalty db upgrade`"


def one_error_line(result, code: int) -> str:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_a_command_from_another_directory_does_not_create_an_empty_database(home, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = cli("segments", "list", env=home, cwd=elsewhere)
    line = one_error_line(result, 1)
    default_db = pathlib.Path(home["LOYALTY_HOME"]) / "loyalty.db"
    assert line.startswith(f"error: no database at {default_db}:")
    assert "loyalty db upgrade" in line
    assert not default_db.exists() and list(elsewhere.iterdir()) == []      # nothing created anywhere


def test_every_command_uses_the_one_default_database_wherever_it_runs(home, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    made = cli("db", "upgrade", "--json", env=home, cwd=tmp_path / "a")
    assert made.returncode == 0, made.stderr
    default_db = pathlib.Path(home["LOYALTY_HOME"]) / "loyalty.db"
    assert json.loads(made.stdout) == {"database": f"sqlite:///{default_db}", "schema": "head"}
    seeded = cli("demo", "seed", "--json", env=home, cwd=tmp_path / "b")
    assert seeded.returncode == 0, seeded.stderr
    assert json.loads(seeded.stdout) == {"program_version": 1, "members_created": [
        "7000001", "7000002", "7000003", "7000004", "7000005"]}
    listed = cli("program", "versions", "--json", "--database-url", f"sqlite:///{default_db}", env=home,
                 cwd=tmp_path)
    assert [v["version"] for v in json.loads(listed.stdout)["versions"]] == [1]
    assert list((tmp_path / "a").iterdir()) == [] and list((tmp_path / "b").iterdir()) == []


def test_the_default_data_dir_is_the_platforms_user_data_dir(monkeypatch):
    import platformdirs

    from loyalty.server.db import default_data_dir, default_url
    monkeypatch.delenv("LOYALTY_DATA_DIR", raising=False)
    monkeypatch.delenv("LOYALTY_HOME", raising=False)
    expected = pathlib.Path(platformdirs.user_data_dir("loyalty", appauthor=False))
    assert default_data_dir() == expected
    assert default_url() == f"sqlite:///{expected / 'loyalty.db'}"
    monkeypatch.setenv("LOYALTY_HOME", "/srv/loyalty")
    assert default_data_dir() == pathlib.Path("/srv/loyalty")
    monkeypatch.setenv("LOYALTY_DATA_DIR", "/data")                  # serve's --data-dir variable wins
    assert default_data_dir() == pathlib.Path("/data")


def test_a_database_behind_the_code_says_to_upgrade(home, tmp_path):
    from loyalty.server import db
    url = f"sqlite:///{tmp_path / 'old.db'}"
    db.upgrade(url, "0005")
    line = one_error_line(cli("ledger", "check", "--database-url", url, env=home), 1)
    assert "is at revision 0005, not at head" in line and line.endswith(NOT_AT_HEAD)
    assert cli("db", "upgrade", "--database-url", url, env=home).returncode == 0
    assert cli("ledger", "check", "--database-url", url, env=home).returncode == 0


@pytest.mark.postgres
def test_an_empty_postgresql_database_says_to_upgrade_not_missing_table(home, pg_url_empty):
    line = one_error_line(cli("segments", "list", "--database-url", pg_url_empty, env=home), 1)
    assert "is empty (no schema)" in line and line.endswith(NOT_AT_HEAD)
    assert "UndefinedTable" not in line and "does not exist" not in line


@pytest.mark.parametrize("url", ["mysql://user@db/loyalty", "foo", "oracle://db/x"])
def test_an_unsupported_database_url_is_one_line_not_a_missing_driver(home, url):
    for command in (("segments", "list"), ("db", "upgrade"), ("serve", "--port", "0")):
        line = one_error_line(cli(*command, "--database-url", url, env=home), 2)
        assert line == f"error: database_url: expected sqlite:///PATH or postgresql+psycopg://USER@HOST:PORT/DB, " \
                       f"got {url!r}"


def test_the_database_url_comes_from_the_environment_too(home, tmp_path):
    url = f"sqlite:///{tmp_path / 'env.db'}"
    assert cli("db", "upgrade", env={**home, "LOYALTY_DATABASE_URL": url}).returncode == 0
    assert (tmp_path / "env.db").exists()
    assert not (pathlib.Path(home["LOYALTY_HOME"]) / "loyalty.db").exists()


def test_a_named_data_dir_is_the_database_of_every_command_that_could_go_to_a_server(home, tmp_path):
    """``--data-dir`` / ``LOYALTY_DATA_DIR`` name a database as ``--database-url`` does: program, audit, limits
    and member erase / export read it with no server running (none listens on the default port here)."""
    data = tmp_path / "d"
    assert cli("demo", "seed", "--data-dir", str(data), env=home).returncode == 0
    versions = cli("program", "versions", "--data-dir", str(data), "--json", env=home)
    assert versions.returncode == 0, versions.stderr
    assert [v["version"] for v in json.loads(versions.stdout)["versions"]] == [1]
    audit = cli("audit", "list", "--json", env={**home, "LOYALTY_DATA_DIR": str(data)})
    assert audit.returncode == 0, audit.stderr
    entries = json.loads(audit.stdout)
    assert entries and all(type(e["id"]) is int for e in entries)        # int64 as numbers
    assert {"PublishProgram", "AdjustPoints"} <= {e["rpc"] for e in entries}
    # made on the database, each row still carries its request's digest, as one made through a server
    assert cli("keys", "create", "--name", "till-d", "--scope", "pos", "--data-dir", str(data), env=home).returncode == 0
    entries = json.loads(cli("audit", "list", "--json", "--data-dir", str(data), env=home).stdout)
    assert "CreateKey" in {e["rpc"] for e in entries}
    assert all(re.fullmatch(r"[0-9a-f]{64}", e["digest"]) for e in entries), entries
    limits = cli("limits", "list", "--data-dir", str(data), "--json", env=home)
    assert limits.returncode == 0, limits.stderr
    exported = cli("member", "export", "7000001", "--data-dir", str(data), env=home)
    assert exported.returncode == 0, exported.stderr
    document = json.loads(exported.stdout)
    moments = [c["status_changed_at"] for c in document["cards"]] + [e["created_at"] for e in document["ledger"]]
    assert moments and all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", m) for m in moments), moments


def test_a_data_dir_that_cannot_be_one_is_one_line_naming_it(home, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    for data_dir, reason in ((afile / "sub", "Not a directory"), (tmp_path / "ro" / "x", "Permission denied")):
        if reason == "Permission denied":
            (tmp_path / "ro").mkdir(mode=0o500)
            if os.geteuid() == 0:        # root writes anywhere: a folder under a file is what it cannot make
                continue
        line = one_error_line(cli("db", "upgrade", "--data-dir", str(data_dir), env=home), 2)
        assert reason in line and str(data_dir) in line, line


@pytest.mark.parametrize("server", ["127.0.0.1:99999", "127.0.0.1:0", "127.0.0.1", "127.0.0.1:port"])
def test_a_server_address_without_a_usable_port_is_a_usage_error(home, server):
    line = one_error_line(cli("member", "get", "7000001", "--server", server, env=home), 2)
    assert "--server" in line and "1 to 65535" in line and server in line, line
