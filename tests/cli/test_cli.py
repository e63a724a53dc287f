"""`loyalty calc`, run as the installed command in a subprocess on the example files: SPEC section 4's worked
examples come out of it, and every bad file gives one `error:` line on stderr and exit code 2, never a
traceback."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
PROGRAM = ROOT / "server" / "demo" / "program.yaml"


def loyalty_command() -> str:
    beside = pathlib.Path(sys.executable).parent / "loyalty"
    found = str(beside) if beside.exists() else shutil.which("loyalty")
    if not found:
        pytest.fail("the `loyalty` command is not installed: pip install -e . --no-build-isolation")
    return found


def run(*args, cwd=None):
    return subprocess.run([loyalty_command(), *map(str, args)], capture_output=True, text=True, timeout=60,
                          cwd=cwd)


def calc(receipt, *extra, program=PROGRAM):
    return run("calc", "--program", program, "--receipt", receipt, "--reference", *extra)


def assert_one_error_line(result, path, words=""):
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {path}: "), lines[0]
    assert words in lines[0]


# ---- SPEC worked examples, through the reference engine ----------------------------------------------------
# These need core/reference.py (being written beside this module); until it lands they fail.

def test_example_a_cap_20_percent():
    result = calc(EXAMPLES / "receipt-a.json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    t = answer["totals"]
    # T = 17980 + 45000 + 89900 = 152880; nothing discounts for a member outside women-q1
    assert (t["amount"], t["discount"], t["payable"]) == (152880, 0, 152880)
    assert answer["promotions"] == []
    # cap_amount = floor(152880 x 20 / 100) = 30576 -> max_points = 305; applied = min(500, 305)
    assert (t["max_points"], t["redeemed_points"], t["redeemed_amount"]) == (305, 305, 30500)
    # 30500 split by payable: 3587.06 / 8977.63 / 17935.31 -> floors sum 30499, the extra unit to cheese
    assert [ln["redeemed"] for ln in answer["lines"]] == [3587, 8978, 17935]
    assert [ln["payable"] for ln in answer["lines"]] == [17980, 45000, 89900]
    assert all(ln["discounts"] == [] for ln in answer["lines"])
    # 3%: 14393 x 0.03 = 4.3179, 36022 x 0.03 = 10.8066, 71965 x 0.03 = 21.5895; sum 36.714 -> 36;
    # floors 4 + 10 + 21 = 35, the extra point to the largest remainder (.8066, cheese)
    assert t["accrued_points"] == 36
    assert [ln["points"] for ln in answer["lines"]] == [4, 11, 21]
    assert answer["messages"] == ["requested 500 points, 305 can be written off"]
    m = answer["member"]
    assert (m["card"], m["tier"], m["anonymous"]) == ("7000001", "Basic", False)
    assert (m["active_before"], m["active_after"], m["pending_before"], m["pending_after"]) == (1000, 695, 0, 36)


def test_example_b_reduced_cap():
    answer = json.loads(calc(EXAMPLES / "receipt-b.json").stdout)
    # external 40000 / amount 152880 = 26.16% > 25% -> cap 10% of payable 112880 = 11288 -> 112 points
    assert answer["totals"]["payable"] == 112880
    assert answer["totals"]["max_points"] == 112
    assert answer["totals"]["redeemed_points"] == 112


def test_example_c_audience_promotion():
    answer = json.loads(calc(EXAMPLES / "receipt-c.json").stdout)
    # 20% off each line: floor(17980 x 0.2) = 3596, 45000 -> 9000, 89900 -> 17980
    assert [ln["discounts"] for ln in answer["lines"]] == [
        [{"promotion": "women-q1-20", "amount": 3596}],
        [{"promotion": "women-q1-20", "amount": 9000}],
        [{"promotion": "women-q1-20", "amount": 17980}],
    ]
    assert [ln["payable"] for ln in answer["lines"]] == [14384, 36000, 71920]
    t = answer["totals"]
    assert (t["discount"], t["payable"]) == (30576, 122304)
    # floor(122304 x 20 / 100) = 24460 -> 244 points
    assert t["max_points"] == 244
    assert answer["promotions"] == ["women-q1-20"]


def test_pretty_prints_the_same_object_indented():
    plain = calc(EXAMPLES / "receipt-a.json")
    pretty = calc(EXAMPLES / "receipt-a.json", "--pretty")
    assert pretty.returncode == 0, pretty.stderr
    assert json.loads(pretty.stdout) == json.loads(plain.stdout)
    assert len(plain.stdout.strip().splitlines()) == 1 and len(pretty.stdout.splitlines()) > 10


# ---- bad files: one line, exit 2 ---------------------------------------------------------------------------

def write(tmp_path, name, text):
    f = tmp_path / name
    f.write_text(text, encoding="utf-8")
    return f


def test_program_with_a_misspelt_key(tmp_path):
    prog = write(tmp_path, "p.yaml", PROGRAM.read_text().replace("    effect: {percent_off: 20}",
                                                                  "    efect: {percent_off: 20}"))
    assert_one_error_line(calc(EXAMPLES / "receipt-a.json", program=prog), "promotions[0].efect", "unknown key")


def test_program_with_two_effects(tmp_path):
    prog = write(tmp_path, "p.yaml", PROGRAM.read_text().replace("effect: {percent_off: 20}",
                                                                  "effect: {percent_off: 20, fixed_price: 100}"))
    result = calc(EXAMPLES / "receipt-a.json", program=prog)
    assert_one_error_line(result, "promotions[0].effect",
                          "exactly one effect expected, got percent_off and fixed_price")


def test_program_yaml_syntax_error(tmp_path):
    prog = write(tmp_path, "p.yaml", "program: demo\npromotions: [\n")
    assert_one_error_line(calc(EXAMPLES / "receipt-a.json", program=prog), str(prog), "YAML syntax error at line")


def test_empty_program(tmp_path):
    prog = write(tmp_path, "p.yaml", "")
    assert_one_error_line(calc(EXAMPLES / "receipt-a.json", program=prog), str(prog), "empty")


def test_missing_program_file(tmp_path):
    assert_one_error_line(calc(EXAMPLES / "receipt-a.json", program=tmp_path / "nope.yaml"),
                          str(tmp_path / "nope.yaml"), "file not found")


def test_missing_receipt_file(tmp_path):
    assert_one_error_line(calc(tmp_path / "nope.json"), str(tmp_path / "nope.json"), "file not found")


def test_receipt_bad_json(tmp_path):
    bad = write(tmp_path, "r.json", '{"receipt": {"at": "2026-03-02T12:30",}}')
    assert_one_error_line(calc(bad), str(bad), "invalid JSON at line 1")


def test_receipt_file_not_an_object(tmp_path):
    bad = write(tmp_path, "r.json", "[1, 2]")
    assert_one_error_line(calc(bad), str(bad), "expected a JSON object")


def test_receipt_file_with_misspelt_member_key(tmp_path):
    data = json.loads((EXAMPLES / "receipt-a.json").read_text())
    data["memeber"] = data.pop("member")
    bad = write(tmp_path, "r.json", json.dumps(data))
    assert_one_error_line(calc(bad), "memeber", "unknown key")


def test_receipt_with_a_bad_line_names_its_path(tmp_path):
    data = json.loads((EXAMPLES / "receipt-a.json").read_text())
    data["receipt"]["lines"][2]["quantity"] = 0
    bad = write(tmp_path, "r.json", json.dumps(data))
    assert_one_error_line(calc(bad), "receipt.lines[2].quantity", "at least 1")


def test_member_with_an_unknown_tier(tmp_path):
    data = json.loads((EXAMPLES / "receipt-a.json").read_text())
    data["member"]["tier"] = "Platinum"
    bad = write(tmp_path, "r.json", json.dumps(data))
    assert_one_error_line(calc(bad), "member.tier", "unknown tier 'Platinum'")


def test_bad_budgets_used(tmp_path):
    data = json.loads((EXAMPLES / "receipt-a.json").read_text())
    data["budgets_used"] = {"women-q1-20": -5}
    bad = write(tmp_path, "r.json", json.dumps(data))
    assert_one_error_line(calc(bad), "budgets_used.women-q1-20", "at least 0")


def test_help_lists_calc():
    result = run("--help")
    assert result.returncode == 0 and "calc" in result.stdout


# ---- the command's plumbing, in-process with a stand-in engine (independent of the engine's progress) ------

class RecordingEngine:
    calls = []

    def __init__(self, program):
        self.program = program

    def calculate(self, receipt, member=None, budgets_used=None):
        RecordingEngine.calls.append((self.program.name, receipt, member, budgets_used))
        return {"totals": {"payable": 1}, "note": "ünïcode"}


@pytest.mark.parametrize("flag, attribute", [("--reference", "ReferenceEngine"), (None, "Engine")])
def test_calc_hands_the_file_to_the_chosen_engine_and_prints_its_answer(tmp_path, monkeypatch, flag, attribute):
    from click.testing import CliRunner

    import loyalty.core
    from loyalty.cli.main import main

    monkeypatch.setattr(loyalty.core, attribute, RecordingEngine)
    RecordingEngine.calls = []
    data = json.loads((EXAMPLES / "receipt-a.json").read_text())
    data["budgets_used"] = {"women-q1-20": 7}
    f = write(tmp_path, "r.json", json.dumps(data))
    args = ["calc", "--program", str(PROGRAM), "--receipt", str(f)] + ([flag] if flag else [])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"totals": {"payable": 1}, "note": "ünïcode"}
    assert result.stdout.count("\n") == 1
    assert RecordingEngine.calls == [("demo", data["receipt"], data["member"], {"women-q1-20": 7})]


def test_calc_without_member_passes_none(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import loyalty.core
    from loyalty.cli.main import main

    monkeypatch.setattr(loyalty.core, "ReferenceEngine", RecordingEngine)
    RecordingEngine.calls = []
    data = json.loads((EXAMPLES / "receipt-a.json").read_text())
    del data["member"]
    f = write(tmp_path, "r.json", json.dumps(data))
    result = CliRunner().invoke(main, ["calc", "--program", str(PROGRAM), "--receipt", str(f), "--reference"])
    assert result.exit_code == 0, result.output
    assert RecordingEngine.calls[0][2:] == (None, {})


def test_an_engine_bug_is_one_line_with_exit_1(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import loyalty.core
    from loyalty.cli.main import main

    class Broken:
        def __init__(self, program):
            raise ZeroDivisionError("boom")

    monkeypatch.setattr(loyalty.core, "ReferenceEngine", Broken)
    monkeypatch.delenv("LOYALTY_TRACEBACK", raising=False)
    result = CliRunner().invoke(main, ["calc", "--program", str(PROGRAM), "--receipt",
                                       str(EXAMPLES / "receipt-a.json"), "--reference"])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "error: internal error: ZeroDivisionError: boom (LOYALTY_TRACEBACK=1 shows where)"]


# ---- the shared output module ------------------------------------------------------------------------------

def test_error_exit_is_one_line_and_the_code(capsys):
    from loyalty.cli.output import error_exit

    with pytest.raises(SystemExit) as info:
        error_exit("receipt.lines[0].sku: must not\nbe empty", code=3)
    assert info.value.code == 3
    assert capsys.readouterr().err == "error: receipt.lines[0].sku: must not be empty\n"


def test_progress_is_silent_when_stderr_is_not_a_terminal(capsys):
    from loyalty.cli.output import progress

    with progress(10, "members") as bar:
        for _ in range(10):
            bar.advance()
    assert capsys.readouterr() == ("", "")


def test_emit_table_prints_every_cell(capsys):
    from loyalty.cli.output import emit_table

    emit_table([{"promotion": "women-q1-20", "amount": 3596}, ("p2", None)], ["promotion", "amount"])
    out = capsys.readouterr().out
    assert "women-q1-20" in out and "3596" in out and "p2" in out
