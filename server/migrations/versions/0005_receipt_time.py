"""A purchase happens when its receipt says: ``purchases.receipt_time`` (the moment, UTC) and
``purchases.receipt_date`` (the receipt's local date) beside the text the POS sent (``receipt_at``).

Stored purchases get them from their ``receipt_at`` (a time without an offset is taken as UTC); a purchase
whose text cannot be read (an empty ``at`` of a hand-made row) gets its confirmation time and that moment's
UTC date. Segments, tier windows and the activation of pending lots read the new columns.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""
from alembic import op
import sqlalchemy as sa

from loyalty.core.errors import InputError
from loyalty.core.inputs import parse_receipt_time
from loyalty.server.models import UTCDateTime


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

CHUNK = 5000
INDEX = 'ix_purchases_member_id_receipt_date'


def _fill(conn) -> None:
    purchases = sa.table('purchases', sa.column('id', sa.BigInteger()), sa.column('receipt_at', sa.String()),
                         sa.column('created_at', UTCDateTime()), sa.column('receipt_time', UTCDateTime()),
                         sa.column('receipt_date', sa.Date()))
    update = (sa.update(purchases).where(purchases.c.id == sa.bindparam('pid'))
              .values(receipt_time=sa.bindparam('t'), receipt_date=sa.bindparam('d')))
    last = None
    while True:
        stmt = (sa.select(purchases.c.id, purchases.c.receipt_at, purchases.c.created_at)
                .order_by(purchases.c.id).limit(CHUNK))
        if last is not None:
            stmt = stmt.where(purchases.c.id > last)
        rows = conn.execute(stmt).all()
        if not rows:
            return
        values = []
        for pid, text, created in rows:
            try:
                local, moment = parse_receipt_time(text)
                day = local.date()
            except InputError:
                moment, day = created, created.date()
            values.append({'pid': pid, 't': moment, 'd': day})
        conn.execute(update, values)
        last = rows[-1][0]


def upgrade() -> None:
    with op.batch_alter_table('purchases') as batch:
        batch.add_column(sa.Column('receipt_time', sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('receipt_date', sa.Date(), nullable=True))
    _fill(op.get_bind())
    with op.batch_alter_table('purchases') as batch:
        batch.alter_column('receipt_time', existing_type=sa.DateTime(timezone=True), nullable=False)
        batch.alter_column('receipt_date', existing_type=sa.Date(), nullable=False)
        batch.create_index(INDEX, ['member_id', 'receipt_date'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('purchases') as batch:
        batch.drop_index(INDEX)
        batch.drop_column('receipt_date')
        batch.drop_column('receipt_time')
