"""DHCP boot mappings: the pure mapping, the providers that push it, the pusher."""
