"""The words of a scenario definition: the tables of keys, types and bounds the validator checks (the JSON
Schema, ``loyalty.server.schemas``, reads them too), the field parsers every part of a definition uses (names,
bounded integers, texts, allowed keys, durations), and the ``{placeholder}`` templates of messages, checked
here and rendered by the engine."""
from __future__ import annotations

import re

from loyalty.server.errors import InvalidArgument

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
