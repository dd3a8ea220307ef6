"""Pipeline fixtures live in tests/conftest.py (shared with tests/jobs)."""

from tests.conftest import labeled_table, unlabeled_table  # noqa: F401
