"""delivery outbox: what each row carries (study, SOP class, kind) and when it was delivered

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 02:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("study_instance_uid", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("sop_class_uid", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("kind", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("delivered_at", sa.DateTime(), nullable=True))
        batch_op.create_index(
            "ix_deliveries_study_instance_uid", ["study_instance_uid"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_deliveries_study_instance_uid")
        batch_op.drop_column("delivered_at")
        batch_op.drop_column("kind")
        batch_op.drop_column("sop_class_uid")
        batch_op.drop_column("study_instance_uid")
