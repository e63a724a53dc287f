"""``loyalty schema``: the JSON Schemas of the program file, segment conditions and scenarios (generated from
the validators' tables by ``loyalty.server.schemas``), and the reference page made from them."""
from __future__ import annotations

import json

import click

__all__ = ["register"]

NAMES = ("program", "segment", "scenario")


def register(group: click.Group) -> None:
    @group.command(name="schema")
    @click.argument("name", type=click.Choice(NAMES), required=False)
    @click.option("--markdown", is_flag=True, help="Print the reference page of all three (docs/REFERENCE.md).")
    def schema_cmd(name, markdown):
        """Print the JSON Schema of a program file, a segment's conditions or a scenario.

        \b
        Example: point an editor's YAML language server at it
          loyalty schema program > program.schema.json
          loyalty schema --markdown > docs/REFERENCE.md
        """
        from loyalty.server.schemas import reference_markdown, schema

        if markdown == bool(name):
            raise click.UsageError("give a NAME (program, segment, scenario) or --markdown")
        click.echo(reference_markdown() if markdown else json.dumps(schema(name), indent=2, ensure_ascii=False))
