"""The daemon's Prometheus metrics registry.

Every module that counts something registers its collectors here (never in
prometheus_client's global registry, which tests and embedding programs share);
``GET /metrics`` on the admin site renders this registry.
"""

from prometheus_client import CollectorRegistry

REGISTRY = CollectorRegistry(auto_describe=True)
