"""twistd plugin: ``twistd metadatad``; kept cheap to import (twistd loads every dropin)."""

from twisted.application.service import ServiceMaker

metadatad = ServiceMaker(
    "metadatad",
    "metadatad.tap",
    "Instance metadata, conductor membership, DHCP boot mappings and TFTP",
    "metadatad",
)
