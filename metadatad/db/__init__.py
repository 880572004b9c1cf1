"""The shared SQL store: tables, migrations and the :class:`~metadatad.db.store.Store`."""
