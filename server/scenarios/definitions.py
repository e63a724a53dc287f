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

The parts are read in their own modules: ``vocabulary`` (the tables, the field parsers, the templates),
``triggers`` and ``steps`` (with the conditions of ``condition`` steps); this module checks a whole scenario,
its step graph, and the list of them in a program file.
"""
from __future__ import annotations

import datetime as dt

from .steps import _step
from .triggers import _trigger, match_trigger
from .vocabulary import (
    _TIME_RE, _TZ_RE, CONDITION_KINDS, EVENT_KINDS, MAX_STEPS, MAX_TRIGGERS, MEMBER_FIELDS, REENTRY, SCENARIO_KEYS,
    SEND_SHORTHANDS, SOURCES, STEP_TYPES, TRIGGER_TYPES, _fail, _keys, _name, _text, parse_duration, render,
    template_names,
)

__all__ = ["parse_scenario", "parse_scenarios", "parse_duration", "render", "template_names", "match_trigger",
           "TRIGGER_TYPES", "STEP_TYPES", "MAX_TRIGGERS", "SOURCES", "EVENT_KINDS", "MEMBER_FIELDS",
           "next_until", "SCENARIO_KEYS", "SEND_SHORTHANDS", "CONDITION_KINDS"]


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
