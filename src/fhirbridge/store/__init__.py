"""store: the Case store (SQLite embedded, PostgreSQL to scale out) and its migrations.

`tables` (the schema: Cases, events, polling cursors, seen opinions, audit rows), `store` (Case and Store:
leased claims with one UPDATE ... RETURNING, compare-and-set step completion, events), `migrations`
(Alembic; every start migrates).

Rule: nothing clinical is stored here (references, step names, counts, errors that name resources by
type/id), except the coded outcome of each filed opinion (`outcomes`: codes of our CodeSystems and the
planned treatment's code, never text; docs/outcomes.md). May import `steps`, the root modules and
`crypto.files` (the database file is private, 0600) only: never the EHR, the loop or anything above it.
"""
