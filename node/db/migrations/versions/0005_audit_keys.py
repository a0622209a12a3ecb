"""audit_events: hash algorithm and key id of each event (HMAC-keyed chain)

Existing events were chained by plain SHA-256 and keep ``hash_alg`` ``sha256``
and no key id; they verify as legacy events.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 09:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("hash_alg", sa.String(length=16), nullable=False, server_default="sha256")
        )
        batch_op.add_column(sa.Column("key_id", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_column("key_id")
        batch_op.drop_column("hash_alg")
