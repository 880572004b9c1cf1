"""metadatad: the daemon on every bare-metal provisioning conductor."""

__version__ = "0.1.0"
