"""API keys and registered client certificates (``loyalty keys ...``), and the revision every process polls
to learn of a revocation within a second.

Revision ID: 0008_sec
Revises: 0007
Create Date: 2026-12-03
"""
from alembic import op
import sqlalchemy as sa


revision = '0008_sec'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('api_keys',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('scopes', sa.JSON(), nullable=False),
    sa.Column('stores', sa.JSON(), nullable=False),
    sa.Column('secret_hash', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('replaced_by', sa.String(length=32), nullable=True),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.CheckConstraint("kind IN ('key', 'certificate')", name=op.f('ck_api_keys_kind')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys'))
    )
    op.create_index('ix_api_keys_name', 'api_keys', ['name'], unique=False)
    op.create_index('ix_api_keys_revision', 'api_keys', ['revision'], unique=False)
    state = op.create_table('api_key_state',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_key_state'))
    )
    op.bulk_insert(state, [{'id': 1, 'revision': 0}])


def downgrade() -> None:
    op.drop_table('api_key_state')
    op.drop_index('ix_api_keys_revision', table_name='api_keys')
    op.drop_index('ix_api_keys_name', table_name='api_keys')
    op.drop_table('api_keys')
