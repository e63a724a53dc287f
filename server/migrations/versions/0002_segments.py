"""Segments and audiences: definitions, stored membership, the manual-change log, the recalculation history,
member tags, the roaring bitmaps the core reads with their version, and the message events the ``messages``
condition reads (written by the scenario module).

Revision ID: 0002
Revises: 0001
Create Date: 2026-03-02
"""
import datetime as dt

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('audience_bitmaps',
    sa.Column('audience_id', sa.String(length=100), nullable=False),
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('bitmap', sa.LargeBinary(), nullable=False),
    sa.Column('member_count', sa.BigInteger(), nullable=False),
    sa.Column('version', sa.BigInteger(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("kind IN ('segment', 'audience', 'tag')", name=op.f('ck_audience_bitmaps_kind')),
    sa.PrimaryKeyConstraint('audience_id', name=op.f('pk_audience_bitmaps'))
    )
    op.create_table('audiences',
    sa.Column('id', sa.String(length=100), nullable=False),
    sa.Column('title', sa.String(length=200), nullable=False),
    sa.Column('include', sa.JSON(), nullable=False),
    sa.Column('exclude', sa.JSON(), nullable=False),
    sa.Column('origin', sa.String(length=10), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audiences'))
    )
    op.create_table('member_tags',
    sa.Column('member_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('tag', sa.String(length=100), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('member_id', 'tag', name=op.f('pk_member_tags'))
    )
    with op.batch_alter_table('member_tags', schema=None) as batch_op:
        batch_op.create_index('ix_member_tags_tag_member_id', ['tag', 'member_id'], unique=False)

    op.create_table('membership_version',
    sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('version', sa.BigInteger(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_membership_version'))
    )
    op.bulk_insert(sa.table('membership_version', sa.column('id', sa.Integer()), sa.column('version', sa.BigInteger()),
                            sa.column('updated_at', sa.DateTime(timezone=True))),
                   [{'id': 1, 'version': 0, 'updated_at': dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)}])
    op.create_table('message_events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('member_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('channel', sa.String(length=32), nullable=False),
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("kind IN ('sent', 'opened', 'clicked')", name=op.f('ck_message_events_kind')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_message_events'))
    )
    with op.batch_alter_table('message_events', schema=None) as batch_op:
        batch_op.create_index('ix_message_events_member_id_kind_at', ['member_id', 'kind', 'at'], unique=False)

    op.create_table('segment_changes',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('segment_id', sa.String(length=100), nullable=False),
    sa.Column('member_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('action', sa.String(length=6), nullable=False),
    sa.Column('source', sa.String(length=10), nullable=False),
    sa.Column('actor', sa.String(length=100), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("action IN ('add', 'remove')", name=op.f('ck_segment_changes_action')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_segment_changes'))
    )
    with op.batch_alter_table('segment_changes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_segment_changes_segment_id'), ['segment_id'], unique=False)

    op.create_table('segment_members',
    sa.Column('segment_id', sa.String(length=100), nullable=False),
    sa.Column('member_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.PrimaryKeyConstraint('segment_id', 'member_id', name=op.f('pk_segment_members'))
    )
    op.create_table('segment_runs',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('segment_id', sa.String(length=100), nullable=False),
    sa.Column('source', sa.String(length=10), nullable=False),
    sa.Column('status', sa.String(length=8), nullable=False),
    sa.Column('phase', sa.String(length=20), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('duration_ms', sa.BigInteger(), nullable=False),
    sa.Column('member_count', sa.BigInteger(), nullable=False),
    sa.Column('added', sa.BigInteger(), nullable=False),
    sa.Column('removed', sa.BigInteger(), nullable=False),
    sa.Column('error', sa.Text(), nullable=False),
    sa.CheckConstraint("status IN ('running', 'done', 'failed')", name=op.f('ck_segment_runs_status')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_segment_runs'))
    )
    with op.batch_alter_table('segment_runs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_segment_runs_segment_id'), ['segment_id'], unique=False)

    op.create_table('segments',
    sa.Column('id', sa.String(length=100), nullable=False),
    sa.Column('title', sa.String(length=200), nullable=False),
    sa.Column('type', sa.String(length=10), nullable=False),
    sa.Column('conditions', sa.JSON(), nullable=True),
    sa.Column('schedule', sa.String(length=100), nullable=True),
    sa.Column('origin', sa.String(length=10), nullable=False),
    sa.Column('member_count', sa.BigInteger(), nullable=False),
    sa.Column('calculated_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('next_run_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("type IN ('static', 'updatable', 'dynamic')", name=op.f('ck_segments_type')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_segments'))
    )


def downgrade() -> None:
    op.drop_table('segments')
    with op.batch_alter_table('segment_runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_segment_runs_segment_id'))

    op.drop_table('segment_runs')
    op.drop_table('segment_members')
    with op.batch_alter_table('segment_changes', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_segment_changes_segment_id'))

    op.drop_table('segment_changes')
    with op.batch_alter_table('message_events', schema=None) as batch_op:
        batch_op.drop_index('ix_message_events_member_id_kind_at')

    op.drop_table('message_events')
    op.drop_table('membership_version')
    with op.batch_alter_table('member_tags', schema=None) as batch_op:
        batch_op.drop_index('ix_member_tags_tag_member_id')

    op.drop_table('member_tags')
    op.drop_table('audiences')
    op.drop_table('audience_bitmaps')
