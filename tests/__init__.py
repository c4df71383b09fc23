"""The test suite: one folder per source layer (tests/<layer>/), the shared kit in tests/kit/."""
