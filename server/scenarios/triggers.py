"""Scenario triggers: a definition's ``triggers:`` entries validated (a type and its options, with paths), and
whether a domain event matches one of them (``match_trigger``, used where events are turned into runs)."""
from __future__ import annotations

from .vocabulary import CARD_STATUSES, SOURCES, TRIGGER_OPTIONS, TRIGGER_TYPES, _fail, _int, _keys, _name, _text

__all__ = ["match_trigger"]


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
