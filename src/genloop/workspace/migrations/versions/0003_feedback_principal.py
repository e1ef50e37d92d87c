"""feedback.principal: who gave the feedback, from the API key, not the client's label

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07 21:10:00.000000

Existing rows get the bucket curation used before: ``user:<user_id>`` when the row names
a user, else ``key:<id>`` of the key that made the request (NULL when neither is known).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("feedback", schema=None) as batch_op:
        batch_op.add_column(sa.Column("principal", sa.String(length=160), nullable=True))
        batch_op.create_index("ix_feedback_principal", ["principal"], unique=False)
    op.execute("UPDATE feedback SET principal = 'user:' || user_id WHERE user_id IS NOT NULL")
    op.execute(
        "UPDATE feedback SET principal = ("
        "SELECT 'key:' || CAST(requests.api_key_id AS VARCHAR) FROM requests "
        "WHERE requests.id = feedback.request_id) WHERE principal IS NULL"
    )


def downgrade() -> None:
    with op.batch_alter_table("feedback", schema=None) as batch_op:
        batch_op.drop_index("ix_feedback_principal")
        batch_op.drop_column("principal")
