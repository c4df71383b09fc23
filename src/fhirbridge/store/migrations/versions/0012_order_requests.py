"""Orders accepted by the API and placed in the EHR by the workers (issue 19, goal 5).

Revision ID: 0012
Revises: 0010
Create Date: 2026-12-02
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A database made by metadata.create_all (adopted) may have the table already.
    if "order_requests" in sa.inspect(op.get_bind()).get_table_names():
        return
    op.create_table(
        "order_requests",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("hospital", sa.String(200), nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("claimed_by", sa.String(200)),
        sa.Column("claimed_until", sa.Float()),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.Float()),
        sa.Column("service_request", sa.String(200)),
        sa.Column("case_id", sa.String(64)),
        sa.Column("error", sa.Text()),
    )
    op.create_index("ix_order_requests_due", "order_requests", ["hospital", "state", "next_attempt_at"])


def downgrade() -> None:
    op.drop_index("ix_order_requests_due", table_name="order_requests")
    op.drop_table("order_requests")
