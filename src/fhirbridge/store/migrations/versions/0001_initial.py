"""The Case store as it was when migrations were introduced: cases, cursors, events, seen_messages.

Written out table by table (not metadata.create_all) so that this revision stays what it is when
store/tables.py changes, and later revisions are the difference from it.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cases",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("hospital", sa.String(200), nullable=False),
        sa.Column("service_request", sa.String(200), nullable=False),
        sa.Column("patient", sa.String(200), nullable=False),
        sa.Column("reviewer", sa.String(200), nullable=False),
        sa.Column("profile", sa.String(100), nullable=False),
        sa.Column("step", sa.String(40), nullable=False),
        sa.Column("task", sa.String(200)),
        sa.Column("package_id", sa.String(64)),
        sa.Column("opinion_id", sa.String(200)),
        sa.Column("document_reference", sa.String(200)),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text()),
        sa.Column("next_attempt_at", sa.Float()),
        sa.Column("claimed_by", sa.String(200)),
        sa.Column("claimed_until", sa.Float()),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("due_at", sa.Float()),
        sa.Column("overdue_at", sa.Float()),
        sa.UniqueConstraint("hospital", "service_request", name="uq_case_per_order"),
    )
    create_cursors()
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("case_id", sa.String(64), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("kind", sa.String(80), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
    )
    op.create_index("ix_events_case_id", "events", ["case_id"])
    op.create_table(
        "seen_messages",
        sa.Column("jti", sa.String(200), primary_key=True),
        sa.Column("case_id", sa.String(64), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
    )


def create_cursors() -> None:
    """Also used when adopting a pre-migration database made before polling cursors existed."""
    op.create_table(
        "cursors",
        sa.Column("hospital", sa.String(200), primary_key=True),
        sa.Column("name", sa.String(80), primary_key=True),
        sa.Column("value", sa.String(64)),
        sa.Column("claimed_by", sa.String(200)),
        sa.Column("claimed_until", sa.Float()),
        sa.Column("updated_at", sa.Float()),
    )


def downgrade() -> None:
    op.drop_table("seen_messages")
    op.drop_index("ix_events_case_id", table_name="events")
    op.drop_table("events")
    op.drop_table("cursors")
    op.drop_table("cases")
