"""Security, part 2: the audit log (append-only: a trigger refuses UPDATE and DELETE), the soft operation limits'
breaches, member erasures, and the index a terminal's confirm rate is counted with.

Revision ID: 0009_audit
Revises: 0008_sec
Create Date: 2026-12-03
"""
from alembic import op
import sqlalchemy as sa

revision = '0009_audit'
down_revision = '0008_sec'
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')

_PG_APPEND_ONLY = """
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP;
END $$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
"""

_SQLITE_APPEND_ONLY = (
    "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: UPDATE refused'); END",
    "CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: DELETE refused'); END",
)


def upgrade() -> None:
    op.create_table('audit_log',
    sa.Column('id', _ID, nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('actor', sa.String(length=200), nullable=False),
    sa.Column('actor_kind', sa.String(length=20), nullable=False),
    sa.Column('rpc', sa.String(length=64), nullable=False),
    sa.Column('target', sa.String(length=200), nullable=False),
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('outcome', sa.String(length=32), nullable=False),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_log'))
    )
    op.create_index(op.f('ix_audit_log_at'), 'audit_log', ['at'], unique=False)
    op.create_index(op.f('ix_audit_log_actor'), 'audit_log', ['actor'], unique=False)
    op.create_table('limit_breaches',
    sa.Column('id', _ID, nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('limit', sa.String(length=40), nullable=False),
    sa.Column('threshold', sa.BigInteger(), nullable=False),
    sa.Column('value', sa.BigInteger(), nullable=False),
    sa.Column('member_id', sa.BigInteger(), nullable=True),
    sa.Column('card', sa.String(length=64), nullable=True),
    sa.Column('store', sa.String(length=64), nullable=False),
    sa.Column('terminal', sa.String(length=64), nullable=False),
    sa.Column('number', sa.String(length=64), nullable=False),
    sa.Column('purchase_id', sa.BigInteger(), nullable=True),
    sa.Column('receipt_date', sa.Date(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_limit_breaches'))
    )
    op.create_index(op.f('ix_limit_breaches_at'), 'limit_breaches', ['at'], unique=False)
    op.create_index('ix_limit_breaches_member_id', 'limit_breaches', ['member_id'], unique=False)
    op.create_table('member_erasures',
    sa.Column('card_digest', sa.String(length=64), nullable=False),
    sa.Column('member_id', _ID, nullable=False),
    sa.Column('reason', sa.String(length=500), nullable=False),
    sa.Column('erased_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('card_digest', name=op.f('pk_member_erasures'))
    )
    op.create_index(op.f('ix_member_erasures_member_id'), 'member_erasures', ['member_id'], unique=False)
    op.create_index('ix_purchases_store_terminal_created_at', 'purchases', ['store', 'terminal', 'created_at'],
                    unique=False)
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(_PG_APPEND_ONLY)
    else:
        for statement in _SQLITE_APPEND_ONLY:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute("DROP TRIGGER audit_log_no_truncate ON audit_log")
        op.execute("DROP TRIGGER audit_log_append_only ON audit_log")
        op.execute("DROP FUNCTION audit_log_append_only()")
    op.drop_index('ix_purchases_store_terminal_created_at', table_name='purchases')
    op.drop_index(op.f('ix_member_erasures_member_id'), table_name='member_erasures')
    op.drop_table('member_erasures')
    op.drop_index('ix_limit_breaches_member_id', table_name='limit_breaches')
    op.drop_index(op.f('ix_limit_breaches_at'), table_name='limit_breaches')
    op.drop_table('limit_breaches')
    op.drop_index(op.f('ix_audit_log_actor'), table_name='audit_log')
    op.drop_index(op.f('ix_audit_log_at'), table_name='audit_log')
    op.drop_table('audit_log')
