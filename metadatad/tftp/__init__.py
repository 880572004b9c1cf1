"""TFTP for PXE: sans-IO protocol (``protocol``), path safety (``paths``)."""
