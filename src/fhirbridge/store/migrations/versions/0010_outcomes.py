"""Outcomes read from the chart (issue 18 part 2): what became of each filed opinion's planned treatment.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A database made by metadata.create_all (adopted) may have the table already.
    if "outcomes" in sa.inspect(op.get_bind()).get_table_names():
        return
    op.create_table(
        "outcomes",
        sa.Column("case_id", sa.String(64), primary_key=True),
        sa.Column("hospital", sa.String(200), nullable=False),
        sa.Column("reviewer", sa.String(200), nullable=False),
        sa.Column("profile", sa.String(100), nullable=False),
        sa.Column("patient", sa.String(200), nullable=False),
        sa.Column("order_ref", sa.String(200), nullable=False),
        sa.Column("filed_at", sa.Float(), nullable=False),
        sa.Column("window_ends", sa.Float(), nullable=False),
        sa.Column("recommendation", sa.String(60)),
        sa.Column("concordance", sa.String(60)),
        sa.Column("plan", sa.String(200)),
        sa.Column("plan_code", sa.String(300)),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("result", sa.String(30)),
        sa.Column("result_ref", sa.String(200)),
        sa.Column("decided_at", sa.Float()),
        sa.Column("checks", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("checked_at", sa.Float()),
        sa.Column("next_check_at", sa.Float()),
        sa.Column("last_error", sa.Text()),
    )
    op.create_index("ix_outcomes_due", "outcomes", ["hospital", "state", "next_check_at"])


def downgrade() -> None:
    op.drop_index("ix_outcomes_due", table_name="outcomes")
    op.drop_table("outcomes")
