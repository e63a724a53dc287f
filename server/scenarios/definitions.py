"""Scenario definitions: the YAML a loyalty manager writes (program file ``scenarios:`` or the Admin API),
validated into one normalized dict the engine runs. Every error is ``InvalidArgument(path, reason)`` naming
the place in the file, e.g. ``scenarios[0].steps[3].next``.

Shape (see ``examples/welcome.yaml``)::

    id: welcome                      # letters, digits, _ . -
    title: Welcome chain
    reentry: never                   # never (default) | always | after_exit
    goal: {event: purchase_confirmed, within: 30d}     # the funnel's last stage (optional)
    triggers:                        # 1 to 10, several of one type allowed
      - member_registered: {source: form}
      - purchase_confirmed           # a bare name: no filter
    steps:                           # run in order unless a step says otherwise
      - id: hello
        send: {channel: email, subject: "Hi {first_name}", body: "..."}
      - id: pause
        wait: 1d                     # or {until: "10:00", timezone: "+03:00"} / {until: ISO datetime}
      - id: confirmed
        condition: {any: [{message: {channel: email, kind: confirmed}}, {event: {kind: purchase_confirmed}}]}
        yes: reward                  # default: the next step
        no: remind
      ...
      - id: back
        goto: confirmed              # an earlier step

Step types: ``wait``, ``condition`` (+ ``yes`` / ``no``), ``update_profile``, ``award_points``,
``deduct_points``, ``issue_promo_code``, ``send`` (and the shorthands ``send_email``, ``send_sms``,
``send_push``), ``webhook``, ``add_tag``, ``add_to_segment``, ``goto``. Any step may say ``next: <id>`` or
``next: end``. The checks beyond shapes: unknown step references, steps unreachable from the first one,
and loops without a wait (they would spin without end inside one transaction).

Conditions: ``all`` / ``any`` / ``not``, ``member`` (a field and an operator), ``message`` (``{channel, kind,
within}``: ``sent`` as the outbox records it, or ``delivered``, ``opened``, ``clicked``, ``bounced``,
``unsubscribed``, ``confirmed`` (double opt-in) as providers report them through ``RecordMessageEvents``),
``event`` (a domain event), ``visited`` (a step of this run), ``tag`` and ``segment``. Without ``within`` a
history condition counts from the event that started the run.
"""
from __future__ import annotations

import datetime as dt
import re

from loyalty.server.errors import InvalidArgument
from loyalty.server.models import CHANNELS
from loyalty.server.segments.models import MESSAGE_KINDS

__all__ = ["parse_scenario", "parse_scenarios", "parse_duration", "render", "template_names", "match_trigger",
           "TRIGGER_TYPES", "STEP_TYPES", "MAX_TRIGGERS", "SOURCES", "EVENT_KINDS", "MEMBER_FIELDS",
           "next_until"]

MAX_TRIGGERS = 10
MAX_STEPS = 200
SOURCES = ("any", "manual", "api", "form", "import", "pos")
TRIGGER_TYPES = ("member_registered", "purchase_confirmed", "refund", "tier_changed", "card_status_changed",
                 "top_up", "points_expiring", "birthday", "segment_entered")
EVENT_KINDS = TRIGGER_TYPES
STEP_TYPES = ("wait", "condition", "update_profile", "award_points", "deduct_points", "issue_promo_code", "send",
              "webhook", "add_tag", "add_to_segment", "goto")
SEND_SHORTHANDS = {"send_email": "email", "send_sms": "sms", "send_push": "push"}
REENTRY = ("never", "always", "after_exit")
CARD_STATUSES = ("active", "restricted", "suspended", "blocked")
# member state a condition may test and a template may show
MEMBER_FIELDS = ("member_id", "first_name", "last_name", "gender", "birth_date", "email", "phone", "city", "source",
                 "registered_at", "card", "card_status", "tier", "active_points", "pending_points", "purchases_sum")
PROFILE_FIELDS = ("first_name", "last_name", "gender", "email", "city")
OPERATORS = ("eq", "ne", "in", "not_in", "gt", "gte", "lt", "lte", "exists")
# The keys of each part's mapping; the validator and the JSON Schema (``loyalty.server.schemas``) read them.
SCENARIO_KEYS = ("id", "title", "enabled", "reentry", "goal", "triggers", "steps")
STEP_COMMON_KEYS = ("id", "title", "next")
BRANCH_KEYS = ("yes", "no")
TRIGGER_OPTIONS = {"member_registered": ("source",), "purchase_confirmed": ("min_payable",),
                   "tier_changed": ("to", "from"), "card_status_changed": ("to", "from"), "top_up": ("min_points",),
                   "birthday": ("days_before",), "segment_entered": ("segment",)}
STEP_ARGUMENTS = {"update_profile": ("field", "set", "increment"),
                  "award_points": ("points", "reason", "expiry_days"), "deduct_points": ("points", "reason"),
                  "issue_promo_code": ("pool",), "send": ("subject", "body", "transactional", "channel"),
                  "webhook": ("url", "method", "headers", "body"), "add_tag": ("tag",), "add_to_segment": ("segment",)}
WAIT_UNTIL_KEYS = ("until", "timezone")
HISTORY_CONDITION_KEYS = {"message": ("channel", "kind", "within"), "event": ("kind", "within"),
                          "visited": ("step", "times")}
CONDITION_KINDS = ("all", "any", "not", "member", "message", "event", "visited", "tag", "segment")
WEBHOOK_METHODS = ("POST", "PUT", "PATCH", "GET")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")
_DURATION_RE = re.compile(r"^\s*(\d+)\s*(s|m|h|d|w)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.\-]*)\}")
_TIME_RE = re.compile(r"^(\d{1,2}):(\d{2})$")
_TZ_RE = re.compile(r"^([+-])(\d{2}):(\d{2})$")


def _fail(path: str, reason: str):
    raise InvalidArgument(path, reason)


def _name(value, path: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        _fail(path, f"an id of 1-100 letters, digits, _ . - is required, got {value!r}")
    return value


def _int(value, path: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(path, f"a whole number is required, got {value!r}")
    if not lo <= value <= hi:
        _fail(path, f"must be {lo} to {hi}, got {value}")
    return value


def _text(value, path: str, limit: int = 10000, required: bool = False) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        _fail(path, "text is required" if required else f"text is expected, got {value!r}")
    if len(value) > limit:
        _fail(path, f"at most {limit} characters")
    return value


def _keys(d: dict, allowed, path: str) -> None:
    for k in d:
        if k not in allowed:
            _fail(f"{path}.{k}", f"unknown key; expected {', '.join(allowed)}")


def parse_duration(value, path: str, *, minimum: int = 1) -> int:
    """``30s``, ``15m``, ``2h``, ``1d``, ``1w`` (or a whole number of seconds) -> seconds."""
    if isinstance(value, int) and not isinstance(value, bool):
        seconds = value
    else:
        m = _DURATION_RE.match(value) if isinstance(value, str) else None
        if m is None:
            _fail(path, f"a duration like 30s, 15m, 2h, 1d or 1w is required, got {value!r}")
        seconds = int(m.group(1)) * _UNITS[m.group(2)]
    if not minimum <= seconds <= 366 * 86400:
        _fail(path, f"must be {minimum} second(s) to 366 days, got {seconds} s")
    return seconds


# ---- templates --------------------------------------------------------------------------------------------

def template_names(text: str) -> list[str]:
    return _PLACEHOLDER_RE.findall(text)


def _template(value, path: str, *, required: bool = False, limit: int = 10000) -> str:
    text = _text(value, path, limit, required)
    for name in template_names(text):
        if not (name in MEMBER_FIELDS or name == "promo_code" or name == "scenario"
                or (name.startswith(("custom.", "event.")) and len(name) > 7)):
            _fail(path, f"unknown placeholder {{{name}}}; expected one of {', '.join(MEMBER_FIELDS)}, "
                        f"promo_code, scenario, custom.<field>, event.<field>")
    return text


def render(text: str, values: dict) -> str:
    """Replace ``{name}`` placeholders by ``values`` (missing ones become empty text)."""
    def one(m):
        v = values.get(m.group(1))
        return "" if v is None else str(v)
    return _PLACEHOLDER_RE.sub(one, text)


# ---- triggers ---------------------------------------------------------------------------------------------

def _trigger(raw, path: str) -> dict:
    if isinstance(raw, str):
        kind, opts = raw, {}
    elif isinstance(raw, dict) and "type" in raw:
        kind, opts = raw["type"], {k: v for k, v in raw.items() if k != "type"}
    elif isinstance(raw, dict) and len(raw) == 1:
        (kind, opts), = raw.items()
        opts = {} if opts is None else opts
    else:
        _fail(path, "a trigger is a type name, {type: options} or {type: ..., options}")
    if kind not in TRIGGER_TYPES:
        _fail(path, f"unknown trigger {kind!r}; expected one of {', '.join(TRIGGER_TYPES)}")
    if not isinstance(opts, dict):
        _fail(f"{path}.{kind}", "options are a mapping")
    out = {"type": kind}
    if kind == "member_registered":
        _keys(opts, TRIGGER_OPTIONS[kind], path)
        source = opts.get("source", "any")
        if source not in SOURCES:
            _fail(f"{path}.source", f"expected one of {', '.join(SOURCES)}, got {source!r}")
        out["source"] = source
    elif kind == "purchase_confirmed":
        _keys(opts, TRIGGER_OPTIONS[kind], path)
        if "min_payable" in opts:
            out["min_payable"] = _int(opts["min_payable"], f"{path}.min_payable", 0, 10**15)
    elif kind in ("tier_changed", "card_status_changed"):
        _keys(opts, TRIGGER_OPTIONS[kind], path)
        for k in ("to", "from"):
            if k in opts:
                v = _text(opts[k], f"{path}.{k}", 64, True)
                if kind == "card_status_changed" and v not in CARD_STATUSES:
                    _fail(f"{path}.{k}", f"expected one of {', '.join(CARD_STATUSES)}, got {v!r}")
                out[k] = v
    elif kind == "top_up":
        _keys(opts, TRIGGER_OPTIONS[kind], path)
        if "min_points" in opts:
            out["min_points"] = _int(opts["min_points"], f"{path}.min_points", 0, 10**12)
    elif kind == "birthday":
        _keys(opts, TRIGGER_OPTIONS[kind], path)
        out["days_before"] = _int(opts.get("days_before", 0), f"{path}.days_before", 0, 30)
    elif kind == "segment_entered":
        _keys(opts, TRIGGER_OPTIONS[kind], path)
        if "segment" not in opts:
            _fail(f"{path}.segment", "required: the segment or audience id")
        out["segment"] = _name(opts["segment"], f"{path}.segment")
    else:
        _keys(opts, (), path)
    return out


def match_trigger(trigger: dict, kind: str, payload: dict) -> bool:
    """Does an event of ``kind`` with ``payload`` fire ``trigger``?"""
    if trigger["type"] != kind:
        return False
    t = trigger["type"]
    if t == "member_registered":
        return trigger["source"] == "any" or payload.get("source") == trigger["source"]
    if t == "purchase_confirmed":
        return payload.get("payable", 0) >= trigger.get("min_payable", 0)
    if t == "tier_changed":
        return (trigger.get("to") in (None, payload.get("tier"))
                and trigger.get("from") in (None, payload.get("tier_before")))
    if t == "card_status_changed":
        return (trigger.get("to") in (None, payload.get("status"))
                and trigger.get("from") in (None, payload.get("status_before")))
    if t == "top_up":
        return payload.get("points", 0) >= trigger.get("min_points", 0)
    if t == "birthday":
        return payload.get("days_before", 0) == trigger["days_before"]
    if t == "segment_entered":
        return payload.get("segment") == trigger["segment"]
    return True


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


# ---- the whole scenario -------------------------------------------------------------------------------------

def parse_scenario(raw, path: str = "scenario") -> dict:
    """Validate one scenario mapping; returns the normalized definition (plain JSON types)."""
    if not isinstance(raw, dict):
        _fail(path, "a scenario is a mapping with id, triggers and steps")
    _keys(raw, SCENARIO_KEYS, path)
    if "id" not in raw:
        _fail(f"{path}.id", "required")
    out = {"id": _name(raw["id"], f"{path}.id"), "title": _text(raw.get("title"), f"{path}.title", 200)}
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        _fail(f"{path}.enabled", "true or false")
    out["enabled"] = enabled
    reentry = raw.get("reentry", "never")
    if reentry is False:
        reentry = "never"
    elif reentry is True:
        reentry = "always"
    if reentry not in REENTRY:
        _fail(f"{path}.reentry", f"expected one of {', '.join(REENTRY)}, got {reentry!r}")
    out["reentry"] = reentry
    triggers = raw.get("triggers")
    if not isinstance(triggers, list) or not triggers:
        _fail(f"{path}.triggers", "at least one trigger is required")
    if len(triggers) > MAX_TRIGGERS:
        _fail(f"{path}.triggers", f"at most {MAX_TRIGGERS} triggers, got {len(triggers)}")
    out["triggers"] = [_trigger(t, f"{path}.triggers[{i}]") for i, t in enumerate(triggers)]
    goal = raw.get("goal")
    if goal is not None:
        if isinstance(goal, str):
            goal = {"event": goal}
        if not isinstance(goal, dict) or goal.get("event") not in EVENT_KINDS:
            _fail(f"{path}.goal", f"expected {{event: <{' | '.join(EVENT_KINDS)}>, within: 30d}}")
        _keys(goal, ("event", "within"), f"{path}.goal")
        out["goal"] = {"event": goal["event"],
                       "within": parse_duration(goal.get("within", "30d"), f"{path}.goal.within")}
    steps = raw.get("steps")
    if not isinstance(steps, list) or not steps:
        _fail(f"{path}.steps", "at least one step is required")
    if len(steps) > MAX_STEPS:
        _fail(f"{path}.steps", f"at most {MAX_STEPS} steps, got {len(steps)}")
    parsed = [_step(s, f"{path}.steps[{i}]", i) for i, s in enumerate(steps)]
    _check_graph(parsed, path)
    out["steps"] = parsed
    return out


def successors(steps: list[dict], i: int) -> list[str]:
    """The ids a step may go to (``end`` included)."""
    s = steps[i]
    following = steps[i + 1]["id"] if i + 1 < len(steps) else "end"
    if s["type"] == "goto":
        return [s["target"]]
    if s["type"] == "condition":
        return [s.get("yes", following), s.get("no", following)]
    return [s.get("next", following)]


def _leaves(node: dict, path: str):
    (kind, arg), = node.items()
    if kind in ("all", "any"):
        for i, c in enumerate(arg):
            yield from _leaves(c, f"{path}.{kind}[{i}]")
    elif kind == "not":
        yield from _leaves(arg, f"{path}.not")
    else:
        yield path, node


def _check_graph(steps: list[dict], path: str) -> None:
    index: dict[str, int] = {}
    for i, s in enumerate(steps):
        if s["id"] in index:
            _fail(f"{path}.steps[{i}].id", f"step id {s['id']!r} is used twice (also steps[{index[s['id']]}])")
        if s["id"] == "end":
            _fail(f"{path}.steps[{i}].id", "'end' is reserved: it ends the run")
        index[s["id"]] = i
    for i, s in enumerate(steps):
        refs = {"goto": [("goto", s.get("target"))],
                "condition": [("yes", s.get("yes")), ("no", s.get("no"))]}.get(s["type"], []) + [("next", s.get("next"))]
        for key, ref in refs:
            if ref is not None and ref != "end" and ref not in index:
                _fail(f"{path}.steps[{i}].{key}", f"no step {ref!r} in this scenario")
        if s["type"] == "condition":
            for leaf_path, leaf in _leaves(s["if"], f"{path}.steps[{i}].condition"):
                if "visited" in leaf and leaf["visited"]["step"] not in index:
                    _fail(f"{leaf_path}.visited.step", f"no step {leaf['visited']['step']!r} in this scenario")
        if s["type"] == "goto" and s["target"] != "end" and index[s["target"]] >= i:
            _fail(f"{path}.steps[{i}].goto", f"goto goes to an earlier step; {s['target']!r} is not before "
                                             f"{s['id']!r} (use next: for a forward jump)")
    # reachability from the first step
    seen, stack = {steps[0]["id"]}, [0]
    while stack:
        i = stack.pop()
        for nxt in successors(steps, i):
            if nxt != "end" and nxt not in seen:
                seen.add(nxt)
                stack.append(index[nxt])
    for i, s in enumerate(steps):
        if s["id"] not in seen:
            _fail(f"{path}.steps[{i}]", f"step {s['id']!r} is unreachable from the first step "
                                        f"{steps[0]['id']!r}")
    # every cycle must pass a wait: the graph without wait steps must have none
    WHITE, GREY, BLACK = 0, 1, 2
    color = [WHITE] * len(steps)
    trail: list[int] = []

    def visit(i: int) -> None:
        color[i] = GREY
        trail.append(i)
        for nxt in successors(steps, i):
            if nxt == "end":
                continue
            j = index[nxt]
            if steps[j]["type"] == "wait":
                continue
            if color[j] == GREY:
                loop = trail[trail.index(j):] + [j]
                names = " -> ".join(steps[k]["id"] for k in loop)
                _fail(f"{path}.steps[{i}]", f"the loop {names} has no wait step: a run would go round it "
                                            f"without end; add a wait inside the loop")
            if color[j] == WHITE:
                visit(j)
        trail.pop()
        color[i] = BLACK

    for i, s in enumerate(steps):
        if color[i] == WHITE and s["type"] != "wait":
            visit(i)


def parse_scenarios(raw, path: str = "scenarios") -> list[dict]:
    """The program file's ``scenarios:`` list (ids unique)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        _fail(path, "a list of scenarios is expected")
    out, ids = [], {}
    for i, item in enumerate(raw):
        sc = parse_scenario(item, f"{path}[{i}]")
        if sc["id"] in ids:
            _fail(f"{path}[{i}].id", f"scenario id {sc['id']!r} is used twice (also {path}[{ids[sc['id']]}])")
        ids[sc["id"]] = i
        out.append(sc)
    return out


def next_until(step: dict, now: dt.datetime) -> dt.datetime:
    """When a ``wait: {until: ...}`` step ends, seen at ``now``."""
    until = step["until"]
    m = _TIME_RE.match(until)
    if m is None:
        at = dt.datetime.fromisoformat(until).astimezone(dt.timezone.utc)
        return max(at, now)
    sign, hh, mm = _TZ_RE.match(step["timezone"]).groups()
    offset = dt.timedelta(hours=int(hh), minutes=int(mm)) * (1 if sign == "+" else -1)
    tz = dt.timezone(offset)
    local = now.astimezone(tz)
    h, mnt = map(int, m.groups())
    at = local.replace(hour=h, minute=mnt, second=0, microsecond=0)
    if at <= local:
        at += dt.timedelta(days=1)
    return at.astimezone(dt.timezone.utc)
