"""The AuditEvent copy owed to the EHR: attempts, the last one and when to try again (backoff).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

COLUMNS = ("ehr_attempts", "ehr_tried_at", "ehr_retry_at")


def upgrade() -> None:
    # A database made by metadata.create_all (adopted) may have the columns already.
    have = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("audit_events")}
    with op.batch_alter_table("audit_events") as batch:
        if "ehr_attempts" not in have:
            batch.add_column(sa.Column("ehr_attempts", sa.Integer(), nullable=False, server_default="0"))
        if "ehr_tried_at" not in have:
            batch.add_column(sa.Column("ehr_tried_at", sa.Float()))
        if "ehr_retry_at" not in have:
            batch.add_column(sa.Column("ehr_retry_at", sa.Float()))


def downgrade() -> None:
    with op.batch_alter_table("audit_events") as batch:
        for name in reversed(COLUMNS):
            batch.drop_column(name)
