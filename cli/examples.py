"""An example in the help of every ``loyalty`` command, kept in one table so they read alike and a test can
hold every command to having one (``tests/cli/test_every_command_has_help_with_an_example.py``).

A command that writes its own ``epilog`` keeps it; the others get ``Example:`` and the lines below. The
examples use the demo data (``loyalty serve`` seeds it; ``loyalty demo seed`` on any database).
"""
from __future__ import annotations

import click

__all__ = ["EXAMPLES", "add_examples"]

EXAMPLES: dict[str, tuple[str, ...]] = {
    "calc": ("loyalty calc --program server/demo/program.yaml --receipt examples/receipt-a.json --pretty",),
    "serve": ("loyalty serve",
              "LOYALTY_DATABASE_URL=postgresql+psycopg://loyalty@db/loyalty LOYALTY_WORKERS=4 loyalty serve "
              "--host 0.0.0.0"),
    "db upgrade": ("loyalty db upgrade --database-url postgresql+psycopg://loyalty@db/loyalty",),
    "jobs run": ("loyalty jobs run --once --json",),
    "ledger check": ("loyalty ledger check --database-url postgresql+psycopg://loyalty@db/loyalty",),
    "ledger liability": ("loyalty ledger liability --json",),
    "program publish": ("loyalty program publish program.yaml --comment 'spring promotions' --server 127.0.0.1:50051",),
    "program show": ("loyalty program show --version 3 > program-v3.yaml",),
    "program versions": ("loyalty program versions --json",),
    "member get": ("loyalty member get 7000001", "loyalty member get --phone +79001234567 --json"),
    "member enroll": ("loyalty member enroll --card 7100001 --gender F --birth-date 1990-05-01 --city Moscow "
                      "--subscribe email",),
    "member update": ("loyalty member update 7100001 --city Kazan --unsubscribe email --subscribe sms",),
    "member adjust": ("loyalty member adjust 7000001 --kind credit --points 500 --reason 'apology for a delay'",),
    "member status": ("loyalty member status 7000001 suspended --reason 'card reported lost'",),
    "segments list": ("loyalty segments list --json",),
    "segments create": ("loyalty segments create women --type dynamic --conditions '{gender: female}'",),
    "segments update": ("loyalty segments update women --title 'Women, all ages'",),
    "segments apply": ("loyalty segments apply server/demo/program.yaml",),
    "segments audience": ("loyalty segments audience women-q1 --include women --exclude blocked",),
    "segments recalc": ("loyalty segments recalc big-spenders", "loyalty segments recalc --due"),
    "segments count": ("loyalty segments count women",),
    "segments preview": ("loyalty segments preview women --columns card,first_name,city --limit 5",),
    "segments export": ("loyalty segments export women --columns card,email -o women.csv",),
    "segments history": ("loyalty segments history big-spenders --limit 10",),
    "segments changes": ("loyalty segments changes vip",),
    "segments add": ("loyalty segments add vip 7000001 +79001234567 id:42",),
    "segments remove": ("loyalty segments remove vip 7000001",),
    "segments import": ("loyalty segments import vip vip.csv",),
    "segments tag": ("loyalty segments tag women-q1 women-q1 --replace",),
    "demo seed": ("loyalty demo seed --database-url postgresql+psycopg://loyalty@db/loyalty",
                  "loyalty demo seed --members 10000 --purchases 100000 --database-url sqlite:///demo.db"),
    "worker": ("loyalty worker --email smtp://mail:25?from=club@example.com",
               "loyalty worker --once --json"),
    "batch award": ("loyalty batch award --id spring-bonus --points 100 --reason 'spring bonus' --segment women",),
    "batch deduct": ("loyalty batch deduct --id fix-17 --points 50 --reason 'double award on 17 May' "
                     "--members 7000001,7000002",),
    "batch status": ("loyalty batch status spring-bonus",),
    "scenarios define": ("loyalty scenarios define welcome.yaml",),
    "scenarios apply": ("loyalty scenarios apply server/demo/program.yaml",),
    "scenarios list": ("loyalty scenarios list --json",),
    "scenarios enable": ("loyalty scenarios enable welcome",),
    "scenarios disable": ("loyalty scenarios disable welcome",),
    "scenarios stats": ("loyalty scenarios stats welcome",),
    "scenarios funnel": ("loyalty scenarios funnel welcome --goal purchase_confirmed --within 30d",),
    "scenarios dead-letters": ("loyalty scenarios dead-letters --limit 20",),
    "scenarios retry": ("loyalty scenarios retry message 17",),
    "scenarios codes": ("loyalty scenarios codes welcome codes.txt",),
    "schema": ("loyalty schema program > program.schema.json", "loyalty schema --markdown > docs/REFERENCE.md"),
    "keys create": ("loyalty keys create --name till-msk-01-3 --scope pos --store msk-01 --server 127.0.0.1:50051",
                    "loyalty keys create --name first-admin --scope admin --database-url "
                    "postgresql+psycopg://loyalty@db/loyalty"),
    "keys list": ("loyalty keys list --json",),
    "keys revoke": ("loyalty keys revoke 3f9c2a7d1e4b6a80",),
    "keys rotate": ("loyalty keys rotate 3f9c2a7d1e4b6a80 --grace 86400",),
    "audit list": ("loyalty audit list --since 2026-12-01 --actor ops-admin",),
    "limits list": ("loyalty limits list --since 2026-12-01 --json",),
    "member erase": ("loyalty member erase 7000003 --reason 'request #42 of 2 December'",),
    "member export": ("loyalty member export 7000003 > member-7000003.json",),
    "messages record": ("loyalty messages record events.jsonl --server 127.0.0.1:50051",
                        "provider-export | loyalty messages record - --json"),
}


def add_examples(group: click.Group, prefix: str = "") -> None:
    """Give every command under ``group`` without an epilog of its own its example from ``EXAMPLES``."""
    for name, command in group.commands.items():
        path = f"{prefix}{name}"
        if isinstance(command, click.Group):
            add_examples(command, f"{path} ")
        elif not command.epilog and path in EXAMPLES:
            command.epilog = "\b\nExample:\n" + "\n".join(f"  {line}" for line in EXAMPLES[path])
