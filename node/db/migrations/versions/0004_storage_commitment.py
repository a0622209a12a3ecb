"""deliveries: storage commitment transaction and when it was asked

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 02:20:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("commitment_uid", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("commitment_requested_at", sa.DateTime(), nullable=True))
        batch_op.create_index("ix_deliveries_commitment_uid", ["commitment_uid"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_deliveries_commitment_uid")
        batch_op.drop_column("commitment_requested_at")
        batch_op.drop_column("commitment_uid")
