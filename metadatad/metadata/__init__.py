"""The metadata site booting machines read: pure renderers and the Klein glue."""
