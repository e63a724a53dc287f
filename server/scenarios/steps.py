"""Scenario steps and the conditions of ``condition`` steps, validated into the normalized dicts the engine
runs: one step's type, arguments, branches and references (paths like ``scenarios[0].steps[3].send.body``);
the graph over all steps is checked by ``definitions``."""
from __future__ import annotations

import datetime as dt

from loyalty.server.models import CHANNELS
from loyalty.server.segments.models import MESSAGE_KINDS

from .vocabulary import (
    _TIME_RE, _TZ_RE, BRANCH_KEYS, EVENT_KINDS, HISTORY_CONDITION_KEYS, MEMBER_FIELDS, OPERATORS, PROFILE_FIELDS,
    SEND_SHORTHANDS, STEP_ARGUMENTS, STEP_COMMON_KEYS, STEP_TYPES, WAIT_UNTIL_KEYS, WEBHOOK_METHODS, _fail, _int,
    _keys, _name, _template, _text, parse_duration,
)


# ---- conditions -------------------------------------------------------------------------------------------

def _condition(raw, path: str) -> dict:
    if not isinstance(raw, dict) or len(raw) != 1:
        _fail(path, "a condition is one of all / any / not / member / message / event / tag / segment")
    (kind, arg), = raw.items()
    p = f"{path}.{kind}"
    if kind in ("all", "any"):
        if not isinstance(arg, list) or not arg:
            _fail(p, "a non-empty list of conditions is required")
        return {kind: [_condition(c, f"{p}[{i}]") for i, c in enumerate(arg)]}
    if kind == "not":
        return {"not": _condition(arg, p)}
    if kind == "member":
        if not isinstance(arg, dict) or "field" not in arg:
            _fail(p, "expected {field: ..., <operator>: value}")
        field = arg["field"]
        if not isinstance(field, str) or not (field in MEMBER_FIELDS or (
                field.startswith(("custom.", "subscribed.")) and field.split(".", 1)[1])):
            _fail(f"{p}.field", f"unknown field {field!r}; expected one of {', '.join(MEMBER_FIELDS)}, "
                                f"custom.<name>, subscribed.<channel>")
        ops = [k for k in arg if k != "field"]
        if len(ops) != 1 or ops[0] not in OPERATORS:
            _fail(p, f"exactly one operator is required: {', '.join(OPERATORS)}")
        op = ops[0]
        value = arg[op]
        if op in ("in", "not_in") and not isinstance(value, list):
            _fail(f"{p}.{op}", "a list is required")
        if op == "exists" and not isinstance(value, bool):
            _fail(f"{p}.{op}", "true or false")
        return {"member": {"field": field, "op": op, "value": value}}
    if kind == "message":
        if not isinstance(arg, dict):
            _fail(p, "expected {channel, kind, within}")
        _keys(arg, HISTORY_CONDITION_KEYS[kind], p)
        channel = arg.get("channel", "email")
        if channel not in CHANNELS:
            _fail(f"{p}.channel", f"expected one of {', '.join(CHANNELS)}, got {channel!r}")
        mkind = arg.get("kind", "sent")
        if mkind not in MESSAGE_KINDS:
            _fail(f"{p}.kind", f"expected one of {', '.join(MESSAGE_KINDS)}, got {mkind!r}")
        out = {"channel": channel, "kind": mkind}
        if "within" in arg:
            out["within"] = parse_duration(arg["within"], f"{p}.within")
        return {"message": out}
    if kind == "event":
        if isinstance(arg, str):
            arg = {"kind": arg}
        if not isinstance(arg, dict):
            _fail(p, "expected {kind, within}")
        _keys(arg, HISTORY_CONDITION_KEYS[kind], p)
        ekind = arg.get("kind")
        if ekind not in EVENT_KINDS:
            _fail(f"{p}.kind", f"expected one of {', '.join(EVENT_KINDS)}, got {ekind!r}")
        out = {"kind": ekind}
        if "within" in arg:
            out["within"] = parse_duration(arg["within"], f"{p}.within")
        return {"event": out}
    if kind == "visited":
        if isinstance(arg, str):
            arg = {"step": arg}
        if not isinstance(arg, dict) or "step" not in arg:
            _fail(p, "expected {step: id, times: N}")
        _keys(arg, HISTORY_CONDITION_KEYS[kind], p)
        return {"visited": {"step": _name(arg["step"], f"{p}.step"),
                            "times": _int(arg.get("times", 1), f"{p}.times", 1, 10000)}}
    if kind == "tag":
        return {"tag": _name(arg, p)}
    if kind == "segment":
        return {"segment": _name(arg, p)}
    _fail(path, f"unknown condition {kind!r}; expected all, any, not, member, message, event, visited, tag, "
                f"segment")


# ---- steps ------------------------------------------------------------------------------------------------

def _step_type(raw: dict, path: str) -> str:
    found = [k for k in raw if k in STEP_TYPES or k in SEND_SHORTHANDS]
    if not found:
        others = [k for k in raw if k not in STEP_COMMON_KEYS + BRANCH_KEYS]
        _fail(path, f"unknown step type {others[0]!r}; expected one of {', '.join(STEP_TYPES)}" if others
              else f"the step has no type; expected one of {', '.join(STEP_TYPES)}")
    if len(found) > 1:
        _fail(path, f"one step type per step, got {', '.join(found)}")
    return found[0]


def _step(raw, path: str, index: int) -> dict:
    if not isinstance(raw, dict):
        _fail(path, "a step is a mapping with an id and one step type")
    # YAML 1.1 reads a bare ``yes:`` / ``no:`` key as true / false: take them back as the branch names
    raw = {("yes" if k is True else "no" if k is False else k): v for k, v in raw.items()}
    kind = _step_type(raw, path)
    sid = _name(raw.get("id", f"step{index + 1}"), f"{path}.id")
    allowed = STEP_COMMON_KEYS + (kind,) + (BRANCH_KEYS if kind == "condition" else ())
    _keys(raw, allowed, path)
    arg = raw[kind]
    p = f"{path}.{kind}"
    step: dict = {"id": sid, "type": kind, "title": _text(raw.get("title"), f"{path}.title", 200)}
    if kind == "wait":
        if isinstance(arg, dict) and "until" in arg:
            _keys(arg, WAIT_UNTIL_KEYS, p)
            until = arg["until"]
            if not isinstance(until, str):
                _fail(f"{p}.until", "a time of day HH:MM or an ISO datetime with offset")
            tz = arg.get("timezone", "+00:00")
            if not isinstance(tz, str) or not _TZ_RE.match(tz):
                _fail(f"{p}.timezone", f"an offset like +03:00 is required, got {tz!r}")
            if not _TIME_RE.match(until):
                try:
                    at = dt.datetime.fromisoformat(until)
                except ValueError:
                    _fail(f"{p}.until", f"a time of day HH:MM or an ISO datetime, got {until!r}")
                if at.tzinfo is None:
                    _fail(f"{p}.until", "the datetime needs an offset, e.g. 2026-04-01T10:00:00+03:00")
            else:
                h, mnt = map(int, _TIME_RE.match(until).groups())
                if h > 23 or mnt > 59:
                    _fail(f"{p}.until", f"not a time of day: {until!r}")
            step.update(until=until, timezone=tz)
        else:
            if isinstance(arg, dict):
                _keys(arg, ("duration",), p)
                arg = arg.get("duration")
                p += ".duration"
            step["seconds"] = parse_duration(arg, p)
    elif kind == "condition":
        step["if"] = _condition(arg, p)
        for branch in ("yes", "no"):
            if branch in raw:
                step[branch] = _ref(raw[branch], f"{path}.{branch}")
    elif kind == "update_profile":
        if not isinstance(arg, dict) or "field" not in arg:
            _fail(p, "expected {field: ..., set: value} or {field: custom.<name>, increment: n}")
        _keys(arg, STEP_ARGUMENTS[kind], p)
        field = arg["field"]
        custom = isinstance(field, str) and field.startswith("custom.") and len(field) > 7
        if not (field in PROFILE_FIELDS or custom):
            _fail(f"{p}.field", f"expected one of {', '.join(PROFILE_FIELDS)} or custom.<name>, got {field!r}")
        if ("set" in arg) == ("increment" in arg):
            _fail(p, "exactly one of set and increment")
        step["field"] = field
        if "increment" in arg:
            if not custom:
                _fail(f"{p}.increment", "only custom.<name> fields hold numbers to increment")
            step["increment"] = _int(arg["increment"], f"{p}.increment", -10**12, 10**12)
        else:
            value = arg["set"]
            if not custom and not isinstance(value, str):
                _fail(f"{p}.set", "profile fields hold text")
            if not isinstance(value, (str, int, bool)) or isinstance(value, float):
                _fail(f"{p}.set", "text, a whole number or true / false")
            step["set"] = value
    elif kind in ("award_points", "deduct_points"):
        if isinstance(arg, int) and not isinstance(arg, bool):
            arg = {"points": arg}
        if not isinstance(arg, dict):
            _fail(p, "expected {points: N, reason: ..., expiry_days: N}")
        _keys(arg, STEP_ARGUMENTS[kind], p)
        if "points" not in arg:
            _fail(f"{p}.points", "required")
        step["points"] = _int(arg["points"], f"{p}.points", 1, 10**9)
        step["reason"] = _text(arg.get("reason"), f"{p}.reason", 500)
        if "expiry_days" in arg:
            step["expiry_days"] = _int(arg["expiry_days"], f"{p}.expiry_days", 1, 36500)
    elif kind == "issue_promo_code":
        if isinstance(arg, str):
            arg = {"pool": arg}
        if not isinstance(arg, dict) or "pool" not in arg:
            _fail(p, "expected {pool: name}")
        _keys(arg, STEP_ARGUMENTS[kind], p)
        step["pool"] = _name(arg["pool"], f"{p}.pool")
    elif kind in ("send",) + tuple(SEND_SHORTHANDS):
        if not isinstance(arg, dict):
            _fail(p, "expected {channel, subject, body, transactional}")
        channel = SEND_SHORTHANDS.get(kind) or arg.get("channel")
        _keys(arg, tuple(k for k in STEP_ARGUMENTS["send"] if kind == "send" or k != "channel"), p)
        if channel not in CHANNELS:
            _fail(f"{p}.channel", f"expected one of {', '.join(CHANNELS)}, got {channel!r}")
        step.update(type="send", channel=channel,
                    subject=_template(arg.get("subject"), f"{p}.subject", limit=500),
                    body=_template(arg.get("body"), f"{p}.body", required=True),
                    transactional=bool(arg.get("transactional", False)))
        if not isinstance(arg.get("transactional", False), bool):
            _fail(f"{p}.transactional", "true or false")
    elif kind == "webhook":
        if isinstance(arg, str):
            arg = {"url": arg}
        if not isinstance(arg, dict) or "url" not in arg:
            _fail(p, "expected {url, method, headers, body}")
        _keys(arg, STEP_ARGUMENTS[kind], p)
        url = _template(arg["url"], f"{p}.url", required=True, limit=2000)
        if not url.startswith(("http://", "https://")):
            _fail(f"{p}.url", "an http:// or https:// address is required")
        method = arg.get("method", "POST")
        if method not in WEBHOOK_METHODS:
            _fail(f"{p}.method", f"expected POST, PUT, PATCH or GET, got {method!r}")
        headers = arg.get("headers", {}) or {}
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            _fail(f"{p}.headers", "a mapping of header names to text")
        body = arg.get("body", None)
        if body is not None:
            _check_body(body, f"{p}.body")
        step.update(url=url, method=method, headers={str(k): v for k, v in headers.items()}, body=body)
    elif kind == "add_tag":
        step["tag"] = _name(arg.get("tag") if isinstance(arg, dict) else arg, p)
    elif kind == "add_to_segment":
        step["segment"] = _name(arg.get("segment") if isinstance(arg, dict) else arg, p)
    elif kind == "goto":
        step["target"] = _ref(arg, p)
    if "next" in raw:
        if kind == "goto":
            _fail(f"{path}.next", "a goto step has no next: its target is where the run goes")
        step["next"] = _ref(raw["next"], f"{path}.next")
    return step


def _check_body(body, path: str) -> None:
    if isinstance(body, str):
        _template(body, path)
    elif isinstance(body, dict):
        for k, v in body.items():
            _check_body(v, f"{path}.{k}")
    elif isinstance(body, list):
        for i, v in enumerate(body):
            _check_body(v, f"{path}[{i}]")
    elif not (body is None or isinstance(body, (int, bool))) or isinstance(body, float):
        _fail(path, "text, whole numbers, true / false, lists and mappings only")


def _ref(value, path: str) -> str:
    if value == "end":
        return "end"
    return _name(value, path)
