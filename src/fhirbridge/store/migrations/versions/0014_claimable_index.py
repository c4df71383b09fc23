"""A partial index serving the claim: a hospital's Cases at a work step, oldest update first (issue 19 goal 3).

The step list is `steps.WORK_STEPS` at this revision, the steps of `steps.FLOW` with a `next`:
collect, seal, deliver, supplement (issue 16's step, landed with this index), file, in that order (SQLite
matches the IN list as written). A Case awaiting an opinion, needing review or finished is not in the index, so
a claim reads along it in `updated_at` order and stops at the first free, due row, without sorting every
Case at a work step (36-46 ms per claim with 64,000 claimable Cases before). The claim query states the same
predicate with literals (`tables.claimable`): SQLite uses a partial index only when the query repeats its
WHERE. A new work step must re-create this index with the new list in a migration of its own;
tests/store/test_claim_index.py fails until it does.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

STEPS = ("collect", "seal", "deliver", "supplement", "file")
PREDICATE = "step IN (" + ", ".join(f"'{s}'" for s in STEPS) + ")"


def upgrade() -> None:
    # A database made by metadata.create_all (adopted) may have the index already.
    if "ix_cases_claimable" in {ix["name"] for ix in sa.inspect(op.get_bind()).get_indexes("cases")}:
        return
    op.create_index("ix_cases_claimable", "cases", ["hospital", "updated_at"],
                    sqlite_where=sa.text(PREDICATE), postgresql_where=sa.text(PREDICATE))


def downgrade() -> None:
    op.drop_index("ix_cases_claimable", table_name="cases")
