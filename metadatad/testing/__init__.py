"""Checked fakes and stubs for tests and benchmarks; never imported by the daemon.

- :mod:`~metadatad.testing.repositories`: in-memory repositories that pass the same
  tests as the SQL ones; :mod:`~metadatad.testing.cluster`: the cluster repository's.
- :mod:`~metadatad.testing.stores`: :class:`MemoryStore`, the node store's facade
  without threads.
- :mod:`~metadatad.testing.dhcp`: :class:`RecordingProvider`, a DHCP provider that
  records pushes.
- :mod:`~metadatad.testing.keystone` and :mod:`~metadatad.testing.neutron`: the
  Keystone and Neutron stubs, from those APIs' references, validating what they get.
- :mod:`~metadatad.testing.factories`: node documents;
  :mod:`~metadatad.testing.daemon`: the real ``twistd metadatad`` in a subprocess.
"""

from metadatad.db.threaded import run_now
from metadatad.testing.cluster import MemoryClusterRepository
from metadatad.testing.dhcp import RecordingProvider
from metadatad.testing.keystone import KEYSTONE_PROJECT, KEYSTONE_USER, KeystoneStub
from metadatad.testing.neutron import NeutronStub
from metadatad.testing.repositories import (
    MemoryBootEventRepository,
    MemoryNodeRepository,
    MemoryPeerRepository,
    MemorySeenRepository,
    MemoryVendordataErrorRepository,
)
from metadatad.testing.stores import MemoryStore

__all__ = [
    "KEYSTONE_PROJECT",
    "KEYSTONE_USER",
    "KeystoneStub",
    "MemoryBootEventRepository",
    "MemoryClusterRepository",
    "MemoryNodeRepository",
    "MemoryPeerRepository",
    "MemorySeenRepository",
    "MemoryStore",
    "MemoryVendordataErrorRepository",
    "NeutronStub",
    "RecordingProvider",
    "run_now",
]
