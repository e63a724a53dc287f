"""``loyalty schema program|segment|scenario`` and docs/REFERENCE.md: JSON Schemas made from the validators'
own tables. The demo program, the seeds' segment (seeds/004) and scenario (seeds/002, ``welcome.yaml``) pass
them; wrong files fail at the same field path as the validator's error; the committed reference page is
exactly what is generated; every leaf, trigger, step and condition the validators know has a schema."""
from __future__ import annotations

import datetime as dt
import json
import pathlib

import jsonschema
import pytest
import yaml

from helpers.segments import DEMO_PROGRAM
from loyalty.core import ProgramError, load_program_text
from loyalty.server.errors import InvalidArgument
from loyalty.server.scenarios import definitions
from loyalty.server.scenarios.definitions import parse_scenario
from loyalty.server.schemas import reference_markdown, schema
from loyalty.server.segments import conditions
from serverutil import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]
WELCOME = pathlib.Path(definitions.__file__).parent / "examples" / "welcome.yaml"
# seeds/004: women whose last receipt is between 1 January and 1 April, subscribed to e-mail, more than 1000
# points accrued
SEED_SEGMENT = {"all": [{"gender": "female"}, {"purchases": {"last_date": {"between": ["2026-01-01", "2026-04-01"]}}},
                        {"subscribed": "email"}, {"points": {"accrued_total": {"gt": 1000}}}]}


def _as_editors_read(node):
    """YAML as a YAML 1.2 editor reads it: dates stay text, ``yes:`` / ``no:`` stay words."""
    if isinstance(node, dict):
        return {({True: "yes", False: "no"}.get(k, k) if isinstance(k, bool) else k): _as_editors_read(v)
                for k, v in node.items()}
    if isinstance(node, list):
        return [_as_editors_read(v) for v in node]
    if isinstance(node, (dt.date, dt.datetime)):
        return node.isoformat(sep=" ") if isinstance(node, dt.datetime) else node.isoformat()
    return node


def _path(parts) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _deepest(error: jsonschema.ValidationError) -> jsonschema.ValidationError:
    """Among the alternatives an anyOf / oneOf tried, the one that got furthest into the value."""
    if not error.context:
        return error
    return max((_deepest(e) for e in error.context), key=lambda e: len(e.absolute_path))


def schema_error_path(name: str, document) -> str | None:
    """Where the schema refuses ``document`` (an unknown key: the key itself, as the validators say)."""
    errors = sorted(jsonschema.Draft202012Validator(schema(name)).iter_errors(document),
                    key=lambda e: -len(_deepest(e).absolute_path))
    if not errors:
        return None
    error = _deepest(errors[0])
    parts = list(error.absolute_path)
    if error.validator == "additionalProperties":
        parts.append(sorted(set(error.instance) - set(error.schema.get("properties", {})))[0])
    return _path(parts)


@pytest.mark.parametrize("name", ["program", "segment", "scenario"])
def test_the_cli_prints_a_valid_json_schema(name):
    done = cli("schema", name)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    jsonschema.Draft202012Validator.check_schema(printed)
    assert printed == schema(name)


def test_the_committed_reference_page_is_the_generated_one():
    committed = (ROOT / "docs" / "REFERENCE.md").read_text(encoding="utf-8")
    assert committed == reference_markdown() + "\n", "run: loyalty schema --markdown > docs/REFERENCE.md"
    assert cli("schema", "--markdown").stdout == committed


def test_the_demo_program_the_seed_segment_and_the_welcome_scenario_pass():
    program = _as_editors_read(yaml.safe_load(DEMO_PROGRAM))
    assert schema_error_path("program", program) is None
    load_program_text(DEMO_PROGRAM)                                           # the validator agrees
    assert schema_error_path("segment", SEED_SEGMENT) is None
    conditions.validate(SEED_SEGMENT)
    welcome = yaml.safe_load(WELCOME.read_text(encoding="utf-8"))
    assert schema_error_path("scenario", _as_editors_read(welcome)) is None
    parse_scenario(welcome)


def _with(document: dict, path: list, value) -> dict:
    """A deep copy of ``document`` with the value at ``path`` replaced (a missing last key added)."""
    copy = json.loads(json.dumps(document))
    node = copy
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return copy


DEMO = _as_editors_read(yaml.safe_load(DEMO_PROGRAM))


@pytest.mark.parametrize("where, value, path", [
    (["accrual", "bogus"], 1, "accrual.bogus"),
    (["stacking"], "random", "stacking"),
    (["point_value"], 0, "point_value"),
    (["promotions", 0, "priority"], "high", "promotions[0].priority"),
    (["promotions", 1, "limits", "period"], "fortnight", "promotions[1].limits.period"),
    (["promotions", 0, "effect"], {"percent_off": 150}, "promotions[0].effect.percent_off"),
])
def test_a_wrong_program_fails_at_the_validators_path(where, value, path):
    document = _with(DEMO, where, value)
    with pytest.raises(ProgramError) as err:
        load_program_text(yaml.safe_dump(document))
    assert err.value.path == path
    assert schema_error_path("program", document) == path


@pytest.mark.parametrize("tree, path", [
    ({"all": [{"points": {"active": {"gte": "lots"}}}]}, "all[0].points.active.gte"),
    ({"purchases": {"window_days": 0, "count": {"gte": 1}}}, "purchases.window_days"),
    ({"colour": "red"}, "colour"),
    ({"any": [{"gender": "female"}, {"age": {"between": [20]}}]}, "any[1].age.between"),
])
def test_a_wrong_segment_fails_at_the_validators_path(tree, path):
    with pytest.raises(InvalidArgument) as err:
        conditions.validate(tree)
    assert err.value.path == f"conditions.{path}"
    assert schema_error_path("segment", tree) == path


WELCOME_DOC = _as_editors_read(yaml.safe_load(WELCOME.read_text(encoding="utf-8")))


@pytest.mark.parametrize("where, value, path", [
    (["reentry"], "sometimes", "reentry"),
    (["colour"], "red", "colour"),
    (["triggers", 0], "sunrise", "triggers[0]"),
    (["steps", 1, "wait"], "soon", "steps[1].wait"),
    (["steps", 3, "award_points", "points"], 0, "steps[3].award_points.points"),
])
def test_a_wrong_scenario_fails_at_the_validators_path(where, value, path):
    document = _with(WELCOME_DOC, where, value)
    with pytest.raises(InvalidArgument) as err:
        parse_scenario(document)
    assert err.value.path == f"scenario.{path}"
    assert schema_error_path("scenario", document) == path


def test_every_part_the_validators_know_has_a_schema():
    condition = schema("segment")["$defs"]["condition"]["properties"]
    assert set(condition) == set(conditions.LEAVES) | {"all", "any", "not"}
    scenario = schema("scenario")
    assert tuple(scenario["properties"]) == definitions.SCENARIO_KEYS
    step_types = {k for form in scenario["properties"]["steps"]["items"]["oneOf"] for k in form["required"]}
    assert step_types == set(definitions.STEP_TYPES) | set(definitions.SEND_SHORTHANDS)
    assert set(scenario["$defs"]["condition"]["properties"]) == set(definitions.CONDITION_KINDS)
    triggers = scenario["properties"]["triggers"]["items"]["anyOf"]
    assert triggers[0]["enum"] == list(definitions.TRIGGER_TYPES)
    assert {k for form in triggers[1:] for k in form["required"]} == set(definitions.TRIGGER_TYPES)
