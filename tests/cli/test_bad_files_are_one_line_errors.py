"""Inputs that once escaped as internal errors: each is now one line naming the file or field, exit 2."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from loyalty.core import ProgramError, load_program_text

ROOT = pathlib.Path(__file__).resolve().parents[2]
LOYALTY = str(pathlib.Path(sys.executable).parent / "loyalty")


def test_a_date_that_does_not_exist_is_a_program_error():
    with pytest.raises(ProgramError, match="day is out of range"):
        load_program_text("program: p\npromotions:\n  - id: a\n    valid: {from: 2026-02-30}\n"
                          "    effect: {percent_off: 5}\n")


def test_aliases_cannot_blow_a_small_file_up():
    # 9 levels of 9 aliases each would expand to 9^9 (387 million) nodes.
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    with pytest.raises(ProgramError, match="aliases expand to more than"):
        load_program_text("\n".join(lines) + "\nprogram: p\n")


def test_deeply_nested_receipt_json_is_one_line(tmp_path):
    receipt = tmp_path / "deep.json"
    receipt.write_text("[" * 100_000 + "]" * 100_000)
    result = subprocess.run([LOYALTY, "calc", "--program", ROOT / "server" / "demo" / "program.yaml",
                             "--receipt", receipt], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {receipt}: JSON nested too deeply"


@pytest.mark.parametrize("url", ["foo://bar", "garbage"])
def test_a_malformed_database_url_names_the_option(url):
    result = subprocess.run([LOYALTY, "db", "upgrade", "--database-url", url], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: database_url: expected sqlite:///PATH")
    assert "Traceback" not in result.stderr
