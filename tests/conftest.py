"""Fixtures shared by the test suite."""

from hypothesis import HealthCheck, settings

from tests.support.daemon import daemon_factory
from tests.support.databases import database_url, scratch_databases
from tests.support.debian import built_deb

__all__ = ["built_deb", "daemon_factory", "database_url", "scratch_databases"]

# CI machines have two cores shared with database servers and real subprocesses; the
# timing health check and per-example deadlines measure that load, not our code.
settings.register_profile(
    "metadatad", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("metadatad")
