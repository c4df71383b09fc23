"""The audit trail: one row per disclosure and per opinion filed (a BALP AuditEvent each).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A database made by metadata.create_all (adopted: stamped at 0001) may have the table already.
    if sa.inspect(op.get_bind()).has_table("audit_events"):
        return
    op.create_table(
        "audit_events",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("hospital", sa.String(200), nullable=False),
        sa.Column("patient", sa.String(200), nullable=False),
        sa.Column("case_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("recipient", sa.String(200), nullable=False),
        sa.Column("resource", sa.JSON(), nullable=False),
        sa.Column("sent_to_ehr", sa.Boolean(), nullable=False),
        sa.Column("ehr_error", sa.Text()),
    )
    op.create_index("ix_audit_events_patient", "audit_events", ["patient"])
    op.create_index("ix_audit_events_case_id", "audit_events", ["case_id"])


def downgrade() -> None:
    op.drop_index("ix_audit_events_case_id", table_name="audit_events")
    op.drop_index("ix_audit_events_patient", table_name="audit_events")
    op.drop_table("audit_events")
