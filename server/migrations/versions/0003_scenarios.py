"""Scenarios: definitions, durable runs (a wait is a later ``wake_at``), the append-only step log behind
statistics and funnels, the message / webhook outbox with its dead letters, the module's own events
(birthday, segment entered), consumption cursors, segment watches, promo code pools and batch points actions
with their frozen audiences and progress rows.

Revision ID: 0003
Revises: 0002
Create Date: 2026-03-02
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('batch_members',
    sa.Column('batch_id', sa.String(length=100), nullable=False),
    sa.Column('member_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.PrimaryKeyConstraint('batch_id', 'member_id', name=op.f('pk_batch_members'))
    )
    op.create_table('batches',
    sa.Column('id', sa.String(length=100), nullable=False),
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('points', sa.BigInteger(), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('expiry_days', sa.BigInteger(), nullable=True),
    sa.Column('target', sa.JSON(), nullable=False),
    sa.Column('request_hash', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=8), nullable=False),
    sa.Column('total', sa.BigInteger(), nullable=False),
    sa.Column('processed', sa.BigInteger(), nullable=False),
    sa.Column('written', sa.BigInteger(), nullable=False),
    sa.Column('points_moved', sa.BigInteger(), nullable=False),
    sa.Column('position', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("kind IN ('award', 'deduct')", name=op.f('ck_batches_kind')),
    sa.CheckConstraint("state IN ('running', 'done')", name=op.f('ck_batches_state')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_batches'))
    )
    op.create_table('promo_codes',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('pool', sa.String(length=100), nullable=False),
    sa.Column('code', sa.String(length=100), nullable=False),
    sa.Column('member_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('issue_key', sa.String(length=200), nullable=True),
    sa.Column('issued_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_promo_codes')),
    sa.UniqueConstraint('issue_key', name=op.f('uq_promo_codes_issue_key')),
    sa.UniqueConstraint('pool', 'code', name=op.f('uq_promo_codes_pool_code'))
    )
    with op.batch_alter_table('promo_codes', schema=None) as batch_op:
        batch_op.create_index('ix_promo_codes_pool_issued_at', ['pool', 'issued_at'], unique=False)

    op.create_table('scenario_cursors',
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('position', sa.BigInteger(), nullable=False),
    sa.Column('value', sa.String(length=100), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_scenario_cursors'))
    )
    op.create_table('scenario_events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('kind', sa.String(length=24), nullable=False),
    sa.Column('key', sa.String(length=200), nullable=False),
    sa.Column('member_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('processed_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_scenario_events')),
    sa.UniqueConstraint('key', name=op.f('uq_scenario_events_key'))
    )
    with op.batch_alter_table('scenario_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_scenario_events_member_id'), ['member_id'], unique=False)

    op.create_table('scenario_outbox',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('key', sa.String(length=200), nullable=False),
    sa.Column('run_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('scenario_id', sa.String(length=100), nullable=False),
    sa.Column('step', sa.String(length=100), nullable=False),
    sa.Column('member_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('channel', sa.String(length=16), nullable=False),
    sa.Column('transactional', sa.Boolean(), nullable=False),
    sa.Column('recipient', sa.String(length=2000), nullable=False),
    sa.Column('subject', sa.Text(), nullable=False),
    sa.Column('body', sa.Text(), nullable=False),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('state', sa.String(length=8), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("state IN ('pending', 'sent', 'dead', 'skipped')", name=op.f('ck_scenario_outbox_state')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_scenario_outbox')),
    sa.UniqueConstraint('key', name=op.f('uq_scenario_outbox_key'))
    )
    with op.batch_alter_table('scenario_outbox', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_scenario_outbox_member_id'), ['member_id'], unique=False)
        batch_op.create_index('ix_scenario_outbox_state_next_attempt_at', ['state', 'next_attempt_at'], unique=False)

    op.create_table('scenario_runs',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('scenario_id', sa.String(length=100), nullable=False),
    sa.Column('member_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('entry_key', sa.String(length=200), nullable=False),
    sa.Column('trigger', sa.String(length=40), nullable=False),
    sa.Column('state', sa.String(length=8), nullable=False),
    sa.Column('step', sa.String(length=100), nullable=False),
    sa.Column('visit', sa.Integer(), nullable=False),
    sa.Column('wake_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('context', sa.JSON(), nullable=False),
    sa.Column('entered_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('error', sa.Text(), nullable=False),
    sa.CheckConstraint("state IN ('active', 'done', 'failed')", name=op.f('ck_scenario_runs_state')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_scenario_runs')),
    sa.UniqueConstraint('scenario_id', 'entry_key', name=op.f('uq_scenario_runs_scenario_id_entry_key'))
    )
    with op.batch_alter_table('scenario_runs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_scenario_runs_member_id'), ['member_id'], unique=False)
        batch_op.create_index('ix_scenario_runs_scenario_id_member_id', ['scenario_id', 'member_id'], unique=False)
        batch_op.create_index('ix_scenario_runs_state_wake_at', ['state', 'wake_at'], unique=False)

    op.create_table('scenario_segment_watch',
    sa.Column('segment_id', sa.String(length=100), nullable=False),
    sa.Column('version', sa.BigInteger(), nullable=False),
    sa.Column('bitmap', sa.LargeBinary(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('segment_id', name=op.f('pk_scenario_segment_watch'))
    )
    op.create_table('scenario_step_log',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('run_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('scenario_id', sa.String(length=100), nullable=False),
    sa.Column('step', sa.String(length=100), nullable=False),
    sa.Column('outcome', sa.String(length=10), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("outcome IN ('triggered', 'entered', 'yes', 'no', 'completed', 'failed')", name=op.f('ck_scenario_step_log_outcome')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_scenario_step_log'))
    )
    with op.batch_alter_table('scenario_step_log', schema=None) as batch_op:
        batch_op.create_index('ix_scenario_step_log_scenario_id_step', ['scenario_id', 'step'], unique=False)

    op.create_table('scenarios',
    sa.Column('id', sa.String(length=100), nullable=False),
    sa.Column('title', sa.String(length=200), nullable=False),
    sa.Column('version', sa.BigInteger(), nullable=False),
    sa.Column('definition', sa.JSON(), nullable=False),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('origin', sa.String(length=10), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_scenarios'))
    )


def downgrade() -> None:
    op.drop_table('scenarios')
    with op.batch_alter_table('scenario_step_log', schema=None) as batch_op:
        batch_op.drop_index('ix_scenario_step_log_scenario_id_step')

    op.drop_table('scenario_step_log')
    op.drop_table('scenario_segment_watch')
    with op.batch_alter_table('scenario_runs', schema=None) as batch_op:
        batch_op.drop_index('ix_scenario_runs_state_wake_at')
        batch_op.drop_index('ix_scenario_runs_scenario_id_member_id')
        batch_op.drop_index(batch_op.f('ix_scenario_runs_member_id'))

    op.drop_table('scenario_runs')
    with op.batch_alter_table('scenario_outbox', schema=None) as batch_op:
        batch_op.drop_index('ix_scenario_outbox_state_next_attempt_at')
        batch_op.drop_index(batch_op.f('ix_scenario_outbox_member_id'))

    op.drop_table('scenario_outbox')
    with op.batch_alter_table('scenario_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_scenario_events_member_id'))

    op.drop_table('scenario_events')
    op.drop_table('scenario_cursors')
    with op.batch_alter_table('promo_codes', schema=None) as batch_op:
        batch_op.drop_index('ix_promo_codes_pool_issued_at')

    op.drop_table('promo_codes')
    op.drop_table('batches')
    op.drop_table('batch_members')
