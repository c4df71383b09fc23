"""The write ledger of the POST-only write plans (issue 14): each write recorded before it is sent.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A database made by metadata.create_all (adopted) may have the table already.
    if "write_ledger" in sa.inspect(op.get_bind()).get_table_names():
        return
    op.create_table(
        "write_ledger",
        sa.Column("case_id", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(40), primary_key=True),
        sa.Column("identifier", sa.String(300), nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("server_id", sa.String(200)),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("updated_at", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("write_ledger")
