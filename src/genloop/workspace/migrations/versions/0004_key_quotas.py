"""per-key rate limits and quotas on api_keys

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 21:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("requests_per_min", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("tokens_per_min", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("tokens_per_day", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("tokens_per_month", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("tokens_per_month")
        batch_op.drop_column("tokens_per_day")
        batch_op.drop_column("tokens_per_min")
        batch_op.drop_column("requests_per_min")
