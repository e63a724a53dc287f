"""JSON Schemas of what people write by hand, generated from the validators' own tables, and the reference
page generated from the same schemas (``docs/REFERENCE.md``; a test keeps the committed page equal to it).

- ``program``: the program file, from ``loyalty.core.program_fields`` (the table ``core/program.py``
  validates by: keys, kinds, bounds, defaults, meanings);
- ``segment``: a segment's conditions tree, from ``segments/conditions.py``'s tables (leaves, operators,
  windows, bounds);
- ``scenario``: one scenario (the program file's ``scenarios:`` holds a list of them), from
  ``scenarios/vocabulary.py``'s tables (triggers and their options, steps and their arguments, conditions).

A schema says what can be checked one value at a time (a key's existence, type, bounds, choices); the
validators also check the rules between values (tiers exclude ``accrual.percent``, a goto's target exists,
no loop without a wait) and stay the authority: a file the schema accepts may still be refused, with the
path of the problem. YAML dates are written as strings here (``2026-01-31``), as editors read them.
"""
from __future__ import annotations

import json
from typing import Any

from loyalty.core import program_fields as pf
from loyalty.core.model import EFFECTS
from loyalty.server.models import CHANNELS
from loyalty.server.scenarios import vocabulary as sd
from loyalty.server.segments import conditions as sc
from loyalty.server.segments.models import MESSAGE_KINDS

__all__ = ["SCHEMAS", "schema", "reference_markdown", "DRAFT"]

DRAFT = "https://json-schema.org/draft/2020-12/schema"
_NON_BLANK = r"\S"
_DATE = r"^\d{4}-\d{2}-\d{2}$"
_DATE_OR_TIME = r"^\d{4}-\d{2}-\d{2}([ T]\d{2}:\d{2}(:\d{2})?)?$"
_HOURS = r"^\d{2}:\d{2}-\d{2}:\d{2}$"
_NAME = r"^[A-Za-z0-9_.\-]{1,100}$"
_DURATION = r"^\s*\d+\s*[smhdw]\s*$"


def _obj(properties: dict, doc: str = "", required=(), **extra) -> dict:
    out: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        out["required"] = list(required)
    if doc:
        out["description"] = doc
    return {**out, **extra}


def _described(schema: dict, doc: str) -> dict:
    return {**schema, "description": doc} if doc else schema


def _int(lo: int | None, hi: int | None) -> dict:
    out: dict[str, Any] = {"type": "integer"}
    if lo is not None:
        out["minimum"] = lo
    if hi is not None:
        out["maximum"] = hi
    return out


# ---- the program file (core/program_fields.py) ------------------------------------------------------------

def _program_field(f: pf.Field) -> dict:
    """The schema of one entry of the program table."""
    kind = f.kind
    if kind in ("int", "money"):
        out = _int(f.lo, f.hi)
    elif kind == "percent":
        out = {"type": "number", "minimum": 0, "maximum": f.hi, "$comment": "at most two decimals"}
    elif kind == "hundredths":
        out = {"type": "number", "minimum": f.lo // 100, "maximum": f.hi // 100, "$comment": "at most two decimals"}
    elif kind == "bool":
        out = {"type": "boolean"}
    elif kind == "str":
        out = {"type": "string", **({} if f.allow_empty else {"pattern": _NON_BLANK})}
        if f.pattern:
            out["pattern"] = f.pattern
    elif kind == "choice":
        out = {"enum": list(f.choices)}
    elif kind in ("str_list", "int_list"):
        item = {"type": "string", "pattern": _NON_BLANK} if kind == "str_list" else _int(f.lo, f.hi)
        out = {"type": "array", "items": item, **({} if f.allow_empty else {"minItems": 1})}
    elif kind == "date":
        out = {"type": "string", "pattern": _DATE_OR_TIME}
    elif kind == "hours":
        window = {"type": "string", "pattern": _HOURS}
        out = {"anyOf": [window, {"type": "array", "items": window, "minItems": 1}]}
    elif kind == "section":
        out = _program_section(f)
    elif kind == "list":
        out = {"type": "array", "items": _program_section(f), **({"minItems": 1} if f.required else {})}
    elif kind == "map":
        out = {"type": "object", "additionalProperties": _program_section(f)}
    elif kind == "scope":
        out = {"anyOf": [{"const": "all"}, _program_section(f)]}
    elif kind == "effect":
        out = {**_program_section(f), "oneOf": [{"required": [k]} for k in EFFECTS]}
    else:   # passthrough: owned by the segment and scenario modules
        out = {"type": ["object", "array", "null"]}
    if f.default is not None and kind not in ("map", "list"):
        out["default"] = f.default
    return _described(out, f.doc)


def _program_section(f: pf.Field) -> dict:
    keys = f.keys or {}
    return _obj({k: _program_field(v) for k, v in keys.items()}, required=[k for k, v in keys.items() if v.required])


def program_schema() -> dict:
    return {"$schema": DRAFT, "$id": "loyalty:program", "title": "Loyalty program file",
            **_program_field(pf.PROGRAM)}


# ---- segment conditions (segments/conditions.py) ------------------------------------------------------------

_SCALARS = {"str": {"type": "string", "maxLength": sc.MAX_TEXT}, "int": {"type": "integer"},
            "date": {"type": "string", "pattern": _DATE}}


def _comparison(kind: str, nullable: bool = False) -> dict:
    """A scalar (equality) or a mapping of operators, all of which must hold."""
    scalar = _SCALARS[kind]
    listed = {"type": "array", "items": scalar, "minItems": 1, "maxItems": sc.MAX_LIST}
    ops: dict[str, Any] = {}
    for op in (sc.STR_OPS if kind == "str" else sc.ORDER_OPS):
        ops[op] = listed if op in ("in", "not_in") else (
            {"type": "array", "items": scalar, "minItems": 2, "maxItems": 2} if op == "between" else scalar)
    if nullable:
        ops["exists"] = {"type": "boolean"}
    return {"anyOf": [scalar, _obj(ops, minProperties=1)]}


def _window(keys: tuple[str, ...]) -> dict:
    lo, hi = sc.WINDOW_DAYS
    window = {"window_days": _int(lo, hi), "from": _SCALARS["date"], "to": _SCALARS["date"]}
    return {k: window[k] for k in keys if k in window}


def _leaves() -> dict:
    leaves: dict[str, Any] = {name: _comparison(*spec) for name, spec in sc.COMPARISON_LEAVES.items()}
    lo, hi = sc.AGE_RANGE
    leaves["age"]["anyOf"][0] = _int(lo, hi)
    leaves["custom"] = {"type": "object", "minProperties": 1, "propertyNames": {"pattern": _NAME},
                        "additionalProperties": _comparison("str", True)}
    leaves["subscribed"] = {"type": "string", "minLength": 1, "maxLength": 32, "description": "A channel."}
    leaves["tag"] = {"anyOf": [_SCALARS["str"], _obj({"eq": _SCALARS["str"], "in": _comparison("str")["anyOf"][1]
                                                      ["properties"]["in"]}, minProperties=1)]}
    leaves["points"] = _obj({k: _comparison("int") for k in sc.POINT_FIELDS}, minProperties=1)
    bought = _obj({"group": _SCALARS["str"], "sku": _SCALARS["str"],
                   "skus": {"type": "array", "items": _SCALARS["str"], "minItems": 1}}, minProperties=1,
                  maxProperties=1)
    leaves["purchases"] = _obj({**_window(sc.PURCHASE_KEYS), **{k: _comparison("int") for k in ("count", "sum", "average")},
                                **{k: _comparison("date") for k in ("first_date", "last_date")}, "bought": bought})
    leaves["messages"] = _obj({**_window(sc.MESSAGE_KEYS), "kind": {"enum": list(MESSAGE_KINDS)},
                               "channel": _SCALARS["str"], "count": _comparison("int")}, required=["kind"])
    leaves["segment"] = {"type": "string", "pattern": _NAME, "description": "Membership of another segment."}
    return leaves


def segment_schema() -> dict:
    node = {"$ref": "#/$defs/condition"}
    condition = _obj({"all": {"type": "array", "items": node, "minItems": 1},
                      "any": {"type": "array", "items": node, "minItems": 1}, "not": node, **_leaves()},
                     "all / any / not over leaves; a mapping with exactly one key.", minProperties=1, maxProperties=1)
    return {"$schema": DRAFT, "$id": "loyalty:segment", "title": "Segment conditions", "$ref": "#/$defs/condition",
            "$defs": {"condition": condition}}


# ---- scenarios (scenarios/vocabulary.py) --------------------------------------------------------------------

_TEXT = {"type": "string"}
_NAMED = {"type": "string", "pattern": _NAME}
_REF = {"anyOf": [{"const": "end"}, _NAMED]}
_WITHIN = {"type": "string", "pattern": _DURATION, "description": "A duration: 30m, 12h, 7d, 2w."}
_TRIGGER_VALUES = {"source": {"enum": list(sd.SOURCES)}, "min_payable": _int(0, 10**15), "to": _TEXT,
                   "from": _TEXT, "min_points": _int(0, 10**12), "days_before": _int(0, 30), "segment": _NAMED}
_STEP_VALUES = {
    "field": _TEXT, "set": {"type": ["string", "integer", "boolean"]}, "increment": _int(-10**12, 10**12),
    "points": _int(1, 10**9), "reason": _TEXT, "expiry_days": _int(1, 36500), "pool": _NAMED,
    "channel": {"enum": list(CHANNELS)}, "subject": _TEXT, "body": {}, "transactional": {"type": "boolean"},
    "url": {"type": "string", "pattern": "^https?://"}, "method": {"enum": list(sd.WEBHOOK_METHODS)},
    "headers": {"type": "object", "additionalProperties": _TEXT}, "tag": _NAMED, "segment": _NAMED,
}


def _trigger() -> dict:
    forms: list[dict] = [{"enum": list(sd.TRIGGER_TYPES)}]
    for kind in sd.TRIGGER_TYPES:
        options = _obj({k: _TRIGGER_VALUES[k] for k in sd.TRIGGER_OPTIONS.get(kind, ())})
        forms.append(_obj({kind: {"anyOf": [options, {"type": "null"}]}}, required=[kind]))
    return {"anyOf": forms, "description": "A trigger name, or {name: options}."}


def _scenario_condition() -> dict:
    node = {"$ref": "#/$defs/condition"}
    history = {
        "message": {"channel": {"enum": list(CHANNELS)}, "kind": {"enum": list(MESSAGE_KINDS)}, "within": _WITHIN},
        "event": {"kind": {"enum": list(sd.EVENT_KINDS)}, "within": _WITHIN},
        "visited": {"step": _NAMED, "times": _int(1, 10000)},
    }
    member = {"type": "object", "required": ["field"], "minProperties": 2, "maxProperties": 2,
              "properties": {"field": _TEXT}, "propertyNames": {"enum": ["field", *sd.OPERATORS]},
              "description": f"A member field ({', '.join(sd.MEMBER_FIELDS)}, custom.<name>, subscribed.<channel>) "
                             "and one operator."}
    kinds: dict[str, Any] = {"all": {"type": "array", "items": node, "minItems": 1},
                             "any": {"type": "array", "items": node, "minItems": 1}, "not": node, "member": member,
                             "tag": _NAMED, "segment": _NAMED}
    for kind in sd.HISTORY_CONDITION_KEYS:
        options = _obj({k: history[kind][k] for k in sd.HISTORY_CONDITION_KEYS[kind]})
        kinds[kind] = options if kind == "message" else {"anyOf": [history[kind][sd.HISTORY_CONDITION_KEYS[kind][0]],
                                                                   options]}
    return _obj(kinds, minProperties=1, maxProperties=1)


def _step() -> dict:
    common = {"id": _NAMED, "title": _TEXT, "next": _REF}
    wait = {"anyOf": [_WITHIN, _obj({"duration": _WITHIN}), _obj({"until": _TEXT, "timezone": {
        "type": "string", "pattern": r"^[+-]\d{2}:\d{2}$"}}, required=["until"])]}
    arguments = {kind: _obj({k: _STEP_VALUES[k] for k in keys}) for kind, keys in sd.STEP_ARGUMENTS.items()}
    for kind, short in (("award_points", _int(1, 10**9)), ("deduct_points", _int(1, 10**9)),
                        ("issue_promo_code", _NAMED), ("webhook", _STEP_VALUES["url"]), ("add_tag", _NAMED),
                        ("add_to_segment", _NAMED)):
        arguments[kind] = {"anyOf": [short, arguments[kind]]}
    send = {k: _STEP_VALUES[k] for k in sd.STEP_ARGUMENTS["send"] if k != "channel"}
    forms = {"wait": wait, "condition": {"$ref": "#/$defs/condition"}, "goto": _REF, **arguments,
             **{short: _obj(send) for short in sd.SEND_SHORTHANDS}}
    steps = []
    for kind, argument in forms.items():
        branches = {b: _REF for b in sd.BRANCH_KEYS} if kind == "condition" else {}
        steps.append(_obj({**common, **branches, kind: argument}, required=[kind]))
    return {"oneOf": steps, "description": "An id and exactly one step type."}


def scenario_schema() -> dict:
    goal = {"anyOf": [{"enum": list(sd.EVENT_KINDS)}, _obj({"event": {"enum": list(sd.EVENT_KINDS)},
                                                           "within": _WITHIN}, required=["event"])]}
    properties = {
        "id": _NAMED, "title": _TEXT, "enabled": {"type": "boolean", "default": True},
        "reentry": {"enum": [*sd.REENTRY, True, False], "default": "never"}, "goal": goal,
        "triggers": {"type": "array", "items": _trigger(), "minItems": 1, "maxItems": sd.MAX_TRIGGERS},
        "steps": {"type": "array", "items": _step(), "minItems": 1, "maxItems": sd.MAX_STEPS},
    }
    return {"$schema": DRAFT, "$id": "loyalty:scenario", "title": "Scenario",
            **_obj(properties, "One scenario.", required=["id", "triggers", "steps"]),
            "$defs": {"condition": _scenario_condition()}}


SCHEMAS = {"program": program_schema, "segment": segment_schema, "scenario": scenario_schema}


def schema(name: str) -> dict:
    """The JSON Schema called ``name`` (``program``, ``segment``, ``scenario``)."""
    return SCHEMAS[name]()


# ---- the reference page ---------------------------------------------------------------------------------------

def _kind_of(s: dict) -> str:
    if s.get("type") == "object":
        return "mapping"
    if "enum" in s:
        return "one of " + ", ".join(f"`{v}`" for v in s["enum"])
    if "const" in s:
        return f"`{s['const']}`"
    if "anyOf" in s or "oneOf" in s:
        return " or ".join(_kind_of(x) for x in s.get("anyOf") or s["oneOf"])
    if "$ref" in s:
        return "a condition"
    kind = s.get("type", "any value")
    kind = " / ".join(kind) if isinstance(kind, list) else kind
    if kind == "array":
        return f"list of {_kind_of(s.get('items', {}))}"
    bounds = [f"{s['minimum']}..{s['maximum']}"] if "minimum" in s and "maximum" in s else []
    return " ".join([kind, *bounds])


def _objects(s: dict):
    """``s`` and the mappings among its alternatives (``anyOf`` / ``oneOf``)."""
    yield s
    for form in [*s.get("anyOf", ()), *s.get("oneOf", ())]:
        if isinstance(form, dict):
            yield from _objects(form)


def _rows(s: dict, path: str, out: dict[str, str]) -> None:
    """One table row per key path (first seen wins), depth first."""
    for form in _objects(s):
        for key, sub in form.get("properties", {}).items():
            where = f"{path}.{key}" if path else key
            if where in out:
                continue
            required = "yes" if key in form.get("required", ()) else ""
            default = json.dumps(sub["default"]) if "default" in sub else ""
            doc = sub.get("description", "").replace("|", "\\|")
            out[where] = f"| `{where}` | {_kind_of(sub)} | {required} | {default} | {doc} |"
            _rows(sub, where, out)
            if isinstance(sub.get("items"), dict):
                _rows(sub["items"], f"{where}[]", out)
            if isinstance(sub.get("additionalProperties"), dict):
                _rows(sub["additionalProperties"], f"{where}.<name>", out)


def reference_markdown() -> str:
    """docs/REFERENCE.md: one table per schema, generated (``loyalty schema --markdown``)."""
    lines = ["# Reference: the program file, segment conditions, scenarios", "",
             "Generated from the validators' own tables by `loyalty.server.schemas` (`loyalty schema "
             "--markdown`); do not edit by hand, a test keeps this page equal to what is generated. "
             "`loyalty schema program|segment|scenario` prints each JSON Schema (for editors: point the "
             "YAML language server at it). The validators stay the authority: they also check the rules "
             "between keys and answer with the path of a problem.", ""]
    for name in SCHEMAS:
        s = schema(name)
        lines += [f"## {s['title']} (`loyalty schema {name}`)", ""]
        if s.get("description"):
            lines += [s["description"], ""]
        rows: dict[str, str] = {}
        _rows(s, "", rows)
        for sub_name, sub in s.get("$defs", {}).items():
            _rows(sub, f"<{sub_name}>", rows)
        lines += ["| key | value | required | default | meaning |", "| --- | --- | --- | --- | --- |",
                  *rows.values(), ""]
    return "\n".join(lines)
