"""``loyalty segments ...`` and ``loyalty demo seed`` on an embedded SQLite database: thin commands, JSON for
scripts, one-line errors with the field path and exit code 2 for bad input."""
from __future__ import annotations

import json

from click.testing import CliRunner

from loyalty.cli.main import main


def run(*args):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_seed_define_recalculate_and_inspect(tmp_path):
    url = ["--database-url", f"sqlite:///{tmp_path / 'cli.db'}"]
    code, out = run("demo", "seed", "--members", "300", "--purchases", "3000", "--json", *url)
    seeded = json.loads(out)
    assert code == 0 and (seeded["members"], seeded["purchases"]) == (300, 3000)
    code, out = run("segments", "create", "everyone", "--type", "updatable",
                    "--conditions", "{purchases: {count: {gte: 0}}}", *url)
    assert code == 0
    code, out = run("segments", "recalc", "everyone", "--json", *url)
    run1 = json.loads(out)
    assert (run1["member_count"], run1["added"], run1["removed"]) == (300, 300, 0)   # count >= 0 holds for all
    code, out = run("segments", "count", "everyone", "--json", *url)
    assert json.loads(out) == {"id": "everyone", "count": 300}
    code, out = run("segments", "preview", "everyone", "--columns", "member_id", "--limit", "2", "--json", *url)
    assert json.loads(out) == [{"member_id": 1}, {"member_id": 2}]
    code, out = run("segments", "create", "bad", "--type", "dynamic",
                    "--conditions", "{all: [{gender: female}, {purchases: {window_days: 0, count: 1}}]}", *url)
    assert code == 2


def test_bad_condition_is_one_line_with_the_path(tmp_path):
    url = ["--database-url", f"sqlite:///{tmp_path / 'cli.db'}"]
    result = CliRunner().invoke(main, ["segments", "create", "x", "--type", "dynamic",
                                                       "--conditions", "{age: {gte: old}}", *url])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: conditions.age.gte: expected a whole number, got 'old'"
