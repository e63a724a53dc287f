"""Member updates: the audit record of ``UpdateMember`` (profile fields, custom fields, subscriptions), idempotent
by ``request_id``.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""
from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('member_updates',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('request_id', sa.String(length=100), nullable=True),
    sa.Column('member_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('request_hash', sa.String(length=64), nullable=False),
    sa.Column('changes', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['member_id'], ['members.id'], name=op.f('fk_member_updates_member_id_members')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_member_updates')),
    sa.UniqueConstraint('request_id', name=op.f('uq_member_updates_request_id'))
    )
    op.create_index(op.f('ix_member_updates_member_id'), 'member_updates', ['member_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_member_updates_member_id'), table_name='member_updates')
    op.drop_table('member_updates')
