"""Message events reported back by providers: the new kinds (delivered, bounced, unsubscribed, confirmed by
double opt-in, beside sent / opened / clicked), the provider's event id as a unique key (NULL for the ``sent``
rows the server writes itself), the delivery and scenario it is about, and when it reached us.

The kind column grows from 8 to 16 characters ("unsubscribed"); SQLite rebuilds the table (batch mode), rows
written before keep their data and get NULL in the new columns. A downgrade deletes the rows of the new kinds
(the old CHECK would refuse them) and drops the columns.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""
from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

OLD_KINDS = "kind IN ('sent', 'opened', 'clicked')"
NEW_KINDS = "kind IN ('sent', 'delivered', 'opened', 'clicked', 'bounced', 'unsubscribed', 'confirmed')"


def upgrade() -> None:
    with op.batch_alter_table('message_events', schema=None) as batch_op:
        batch_op.drop_constraint(op.f('ck_message_events_kind'), type_='check')
        batch_op.alter_column('kind', existing_type=sa.String(length=8), type_=sa.String(length=16),
                              existing_nullable=False)
        batch_op.add_column(sa.Column('event_id', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('message_id', sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column('scenario_id', sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.create_check_constraint(op.f('ck_message_events_kind'), NEW_KINDS)
        batch_op.create_unique_constraint(op.f('uq_message_events_event_id'), ['event_id'])


def downgrade() -> None:
    op.execute("DELETE FROM message_events WHERE kind NOT IN ('sent', 'opened', 'clicked')")
    with op.batch_alter_table('message_events', schema=None) as batch_op:
        batch_op.drop_constraint(op.f('uq_message_events_event_id'), type_='unique')
        batch_op.drop_constraint(op.f('ck_message_events_kind'), type_='check')
        batch_op.drop_column('recorded_at')
        batch_op.drop_column('scenario_id')
        batch_op.drop_column('message_id')
        batch_op.drop_column('event_id')
        batch_op.alter_column('kind', existing_type=sa.String(length=16), type_=sa.String(length=8),
                              existing_nullable=False)
        batch_op.create_check_constraint(op.f('ck_message_events_kind'), OLD_KINDS)
