"""Fixtures shared by the test suite."""

from tests.daemon import daemon_factory
from tests.databases import database_url, scratch_databases

__all__ = ["daemon_factory", "database_url", "scratch_databases"]
