"""Follow-up questions, their addenda and corrected opinions (issue 16, parts 3 and 5).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A database made by metadata.create_all (adopted) may have the table already.
    if "followups" in sa.inspect(op.get_bind()).get_table_names():
        return
    op.create_table(
        "followups",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("case_id", sa.String(64), nullable=False),
        sa.Column("hospital", sa.String(200), nullable=False),
        sa.Column("reviewer", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("asked_by", sa.String(200)),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("communication", sa.String(200)),
        sa.Column("sent_at", sa.Float()),
        sa.Column("answer_id", sa.String(64)),
        sa.Column("answered_at", sa.Float()),
        sa.Column("note", sa.String(200)),
        sa.Column("filed_at", sa.Float()),
        sa.Column("claimed_by", sa.String(200)),
        sa.Column("claimed_until", sa.Float()),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.Float()),
        sa.Column("error", sa.Text()),
        sa.UniqueConstraint("case_id", "kind", "seq", name="uq_followup_seq"),
    )
    op.create_index("ix_followups_due", "followups", ["hospital", "state", "next_attempt_at"])
    op.create_index("ix_followups_case", "followups", ["case_id"])


def downgrade() -> None:
    op.drop_index("ix_followups_case", table_name="followups")
    op.drop_index("ix_followups_due", table_name="followups")
    op.drop_table("followups")
