"""The CDS Hooks cards shown, with the feedback on each (issue 18 part 1).

Revision ID: 0009
Revises: 0006
Create Date: 2026-12-02
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A database made by metadata.create_all (adopted) may have the table already.
    if "cds_cards" in sa.inspect(op.get_bind()).get_table_names():
        return
    op.create_table(
        "cds_cards",
        sa.Column("card_id", sa.String(64), primary_key=True),
        sa.Column("hospital", sa.String(200), nullable=False),
        sa.Column("service", sa.String(64), nullable=False),
        sa.Column("hook_instance", sa.String(64), nullable=False),
        sa.Column("patient", sa.String(200), nullable=False),
        sa.Column("ordered_by", sa.String(200), nullable=False),
        sa.Column("draft_order", sa.String(300), nullable=False),
        sa.Column("draft_code", sa.String(300), nullable=False),
        sa.Column("rule", sa.String(100), nullable=False),
        sa.Column("issued_at", sa.Float(), nullable=False),
        sa.Column("outcome", sa.String(20)),
        sa.Column("outcome_at", sa.Float()),
        sa.Column("override_reason", sa.String(200)),
        sa.Column("second_opinion_order", sa.String(200)),
        sa.Column("case_id", sa.String(64)),
    )
    op.create_index("ix_cds_cards_case_id", "cds_cards", ["case_id"])


def downgrade() -> None:
    op.drop_index("ix_cds_cards_case_id", "cds_cards")
    op.drop_table("cds_cards")
