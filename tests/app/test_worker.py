"""A metadata worker's share of the configuration (the process itself is tested in
tests/daemon/test_workers.py)."""

from __future__ import annotations

from metadatad.config import Config, MetadataConfig
from metadatad.worker import worker_config


def config(**metadata: object) -> Config:
    return Config(metadata=MetadataConfig(**metadata))  # type: ignore[arg-type]


def test_the_pools_secret_is_used_only_when_the_file_sets_none() -> None:
    setup = {"token_secret": "from-the-pool"}
    assert worker_config(config(workers=2), setup).metadata.token_secret == "from-the-pool"
    chosen = config(workers=2, token_secret="from-the-file")
    assert worker_config(chosen, setup).metadata.token_secret == "from-the-file"


def test_per_node_limits_are_shared_out_rounded_up() -> None:
    metadata = worker_config(
        config(workers=3, rate_limit=100.0, rate_burst=1000, max_connections_per_source=64),
        {"token_secret": "s"},
    ).metadata
    assert metadata.rate_limit * 3 == 100.0
    assert (metadata.rate_burst, metadata.max_connections_per_source) == (334, 22)
    # Never below one.
    tiny = worker_config(
        config(workers=4, rate_burst=1, max_connections_per_source=1), {"token_secret": "s"}
    )
    assert (tiny.metadata.rate_burst, tiny.metadata.max_connections_per_source) == (1, 1)
