"""The Case list at 100,000 Cases: indexes for its sorts and filters, and the filed opinion's summary columns.

The summary (concordance, recommendation, filed_at, turnaround_seconds) is written when an opinion is filed;
Cases filed before this revision are summarised by the dashboard a few at a time (ui/dashboard.py).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from fhirbridge.store.tables import CASE_LIST_INDEX_COLUMNS

revision = "0006"
down_revision = "0005"   # stacked on the newest of main; renumbered at merge
branch_labels = None
depends_on = None

SUMMARY = (("concordance", sa.String(40)), ("recommendation", sa.String(60)), ("filed_at", sa.Float()),
           ("turnaround_seconds", sa.Float()))


def upgrade() -> None:
    # A database made by metadata.create_all (adopted) may have the columns and indexes already.
    inspector = sa.inspect(op.get_bind())
    columns = {c["name"] for c in inspector.get_columns("cases")}
    for name, kind in SUMMARY:
        if name not in columns:
            op.add_column("cases", sa.Column(name, kind))
    existing = {ix["name"] for ix in inspector.get_indexes("cases")}
    for name, cols in CASE_LIST_INDEX_COLUMNS.items():
        if name not in existing:
            op.create_index(name, "cases", list(cols))


def downgrade() -> None:
    for name in CASE_LIST_INDEX_COLUMNS:
        op.drop_index(name, table_name="cases")
    with op.batch_alter_table("cases") as batch:
        for name, _kind in reversed(SUMMARY):
            batch.drop_column(name)
