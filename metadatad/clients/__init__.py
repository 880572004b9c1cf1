"""Outbound HTTP: the one client factory, and the Keystone token client.

Built once by :mod:`metadatad.tap` and handed to the services that call out
(vendordata targets, Neutron, Keystone)."""
