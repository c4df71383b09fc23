"""An index for the claim query (a hospital's Cases at a work step, oldest update first).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A database made by metadata.create_all (adopted) may have the index already.
    existing = {ix["name"] for ix in sa.inspect(op.get_bind()).get_indexes("cases")}
    if "ix_cases_claim" not in existing:
        op.create_index("ix_cases_claim", "cases", ["hospital", "step", "updated_at"])


def downgrade() -> None:
    op.drop_index("ix_cases_claim", table_name="cases")
