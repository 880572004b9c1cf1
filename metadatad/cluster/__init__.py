"""Conductor membership and the node-to-conductor consistent-hash ring."""
