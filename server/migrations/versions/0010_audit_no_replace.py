"""The audit log stays append-only against SQLite's REPLACE: ``INSERT OR REPLACE`` (and ``REPLACE INTO``) of a row
whose id exists deletes that row without firing a DELETE trigger, so a trigger refuses an INSERT whose id is
taken. PostgreSQL needs nothing: ``INSERT ... ON CONFLICT DO UPDATE`` fires the UPDATE trigger of 0009.

Revision ID: 0010_audit_no_replace
Revises: 0009_audit
Create Date: 2026-12-04
"""
from alembic import op

revision = '0010_audit_no_replace'
down_revision = '0009_audit'
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == 'sqlite':
        op.execute("CREATE TRIGGER audit_log_no_replace BEFORE INSERT ON audit_log "
                   "WHEN EXISTS (SELECT 1 FROM audit_log WHERE id = NEW.id) "
                   "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: REPLACE refused'); END")


def downgrade() -> None:
    if op.get_bind().dialect.name == 'sqlite':
        op.execute("DROP TRIGGER audit_log_no_replace")
