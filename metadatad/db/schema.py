"""SQLAlchemy Core tables.  Alembic migrations create them; this is the query-side view."""

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Double,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects import mysql

# MySQL's TEXT holds 64 KiB: a node document with its user-data needs more.
LONG_TEXT = Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
    }
)

nodes = Table(
    "nodes",
    metadata,
    Column("uuid", String(36), primary_key=True),
    Column("name", String(255), nullable=False),
    Column("hostname", String(255), nullable=False),
    Column("project_id", String(255), nullable=False, index=True),
    Column("conductor_group", String(255), nullable=False),
    # The canonical node document (JSON text); the columns above are for queries.
    Column("document", LONG_TEXT, nullable=False),
    Column("password", Text, nullable=True),
    Column("revision", Integer, nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
)

ports = Table(
    "ports",
    metadata,
    Column("mac", String(17), primary_key=True),
    Column(
        "node_uuid",
        String(36),
        ForeignKey("nodes.uuid", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("ip", String(45), nullable=True, unique=True),
    Column("pxe", Boolean, nullable=False),
)

# One row per TFTP request that reached a decision (migration 0003).  No foreign key
# to nodes: events outlive a node's deletion, and static files are often fetched by
# machines that are not (yet) registered (node_uuid NULL).
boot_events = Table(
    "boot_events",
    metadata,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
    Column("node_uuid", String(36), nullable=True),
    Column("conductor", String(255), nullable=False),
    Column("client", String(45), nullable=False),
    Column("server", String(45), nullable=False),
    Column("filename", String(512), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("outcome", String(32), nullable=False),
    Column("error", String(255), nullable=True),
    Column("size", BigInteger, nullable=True),
    Column("bytes_sent", BigInteger, nullable=False),
    Column("duration", Float, nullable=False),
    Column("blksize", Integer, nullable=True),
    Column("windowsize", Integer, nullable=True),
    Column("retransmits", Integer, nullable=False),
    Column("started_at", DateTime, nullable=False),
    # migration 0011: HTTP fetches of boot files are boot events too
    Column("protocol", String(8), nullable=False, server_default="tftp"),
    Index("ix_boot_events_node_uuid_started_at", "node_uuid", "started_at"),
    Index("ix_boot_events_started_at", "started_at"),
)

# A single row (id 1, migration 0012): bumped in the transaction of every write that
# can change what a node lookup answers (nodes, their ports, passwords, service
# members), so a node cache revalidates all its entries with one read.
node_generation = Table(
    "node_generation",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("generation", BigInteger, nullable=False),
)

# --- conductor membership and node claims (migration 0002) ---------------------------

# Heartbeats are compared at sub-second precision: MySQL's DATETIME alone keeps seconds.
PRECISE_DATETIME = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")

# One row per conductor that ever heartbeated; times are the database's UTC clock.
conductors = Table(
    "conductors",
    metadata,
    Column("name", String(255), primary_key=True),
    Column("conductor_group", String(255), nullable=False),
    Column("tftp_address", String(255), nullable=False),
    Column("http_address", String(255), nullable=False),
    Column("online", Boolean, nullable=False),
    # A random id per daemon process: two daemons under one name are noticed.
    Column("instance", String(32), nullable=False),
    Column("started_at", PRECISE_DATETIME, nullable=False),
    Column("heartbeat_at", PRECISE_DATETIME, nullable=False),
)

# A single row (id 1): the fencing generation and the membership recorded for it.
ring_state = Table(
    "ring_state",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("generation", BigInteger, nullable=False),
    Column("members", LONG_TEXT, nullable=False),
    Column("changed_at", PRECISE_DATETIME, nullable=False),
)

# Who holds each node (its DHCP mapping points there).  Deleting a node deletes its
# claim; a conductor's row may go while its claims stay until taken over.
node_claims = Table(
    "node_claims",
    metadata,
    Column(
        "node_uuid",
        String(36),
        ForeignKey("nodes.uuid", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("owner", String(255), nullable=False, index=True),
    Column("conductor_group", String(255), nullable=False),
    Column("generation", BigInteger, nullable=False),
    Column("claimed_at", PRECISE_DATETIME, nullable=False),
)

# A node whose dynamic vendordata failed under ``failure_fatal`` (migration 0004): one
# row per (node, target), cleared when that target next answers for the node.
vendordata_errors = Table(
    "vendordata_errors",
    metadata,
    Column(
        "node_uuid",
        String(36),
        ForeignKey("nodes.uuid", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("target", String(64), primary_key=True),
    Column("reason", String(512), nullable=False),
    Column("node_revision", Integer, nullable=False),
    Column("conductor", String(255), nullable=False),
    Column("failed_at", DateTime, nullable=False),
)

# --- peer discovery (migration 0005) -------------------------------------------------

# Keys compare byte for byte: MySQL's default collation would make ``Key`` equal ``key``.
PEER_KEY = String(255).with_variant(mysql.VARCHAR(255, collation="utf8mb4_bin"), "mysql", "mariadb")

# What nodes posted to /openstack/latest/metadata: write-once, one row per node and key.
# ``shared`` rows are visible to the node's project (shared.json); the others are the
# node's private callback data, shown to operators only.
peer_entries = Table(
    "peer_entries",
    metadata,
    Column(
        "node_uuid",
        String(36),
        ForeignKey("nodes.uuid", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("key", PEER_KEY, primary_key=True),
    Column("value", LONG_TEXT, nullable=False),
    Column("shared", Boolean, nullable=False),
    Column("created_at", DateTime, nullable=False),
)

# The watch index of each project: bumped by every change a project's peers or service
# view can show (shared entries, node writes).  Its row is also the project's write lock.
# ``changed_at`` (migration 0010): the database's UTC time of the last bump.
peer_index = Table(
    "peer_index",
    metadata,
    Column("project_id", String(255), primary_key=True),
    Column("counter", BigInteger, nullable=False),
    Column("changed_at", DateTime, nullable=True),
)

# --- DHCP boot mappings (migration 0006) ------------------------------------------------

# Per node, the mapping its owner wants pushed and the one last pushed (canonical JSON
# with their SHA-256), and the retry state.  No foreign key to nodes: a deleted node's
# row stays so its owner can retract the mapping (its MACs become ``ignore``).
dhcp_pushes = Table(
    "dhcp_pushes",
    metadata,
    Column("node_uuid", String(36), primary_key=True),
    Column("owner", String(255), nullable=False),
    Column("generation", BigInteger, nullable=False),
    Column("desired", LONG_TEXT, nullable=False),
    Column("desired_digest", String(64), nullable=False),
    Column("pushed", LONG_TEXT, nullable=True),
    Column("pushed_digest", String(64), nullable=True),
    Column("attempts", Integer, nullable=False),
    Column("last_error", String(1024), nullable=True),
    Column("permanent", Boolean, nullable=False),
    # Seconds since the epoch by the owner's clock (only the owner reads them); double
    # precision (migration 0009: MySQL's FLOAT is single precision).
    Column("next_attempt", Double, nullable=True),
    Column("desired_at", Double, nullable=False),
    Column("pushed_at", Double, nullable=True),
    Index("ix_dhcp_pushes_owner_next_attempt", "owner", "next_attempt"),
)

# --- the console's boot timeline (migration 0007) ----------------------------------------

# What a node did over HTTP, one row per node, kind and detail while the node is busy
# (written once it is quiet a second, or after ten: a crawl of 40 requests is one row):
# metadata requests (``requests``, and whether every one carried an IMDSv2 token), token
# PUTs, peer posts, vendordata results and operator actions.  Pruned with the boot
# events' retention.  No foreign key: a deleted node's history stays until it expires,
# like its boot events.
node_activity = Table(
    "node_activity",
    metadata,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
    Column("node_uuid", String(36), nullable=False),
    Column("conductor", String(255), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("detail", String(255), nullable=False),
    Column("requests", Integer, nullable=False),
    Column("imdsv2", Boolean, nullable=False),
    Column("first_at", DateTime, nullable=False),
    Column("last_at", DateTime, nullable=False),
    Index("ix_node_activity_node_uuid_last_at", "node_uuid", "last_at"),
    Index("ix_node_activity_last_at", "last_at"),
)

# The console's nodes table pages by name (migration 0007).
Index("ix_nodes_name_uuid", nodes.c.name, nodes.c.uuid)

# Each node's last boot outcome (the console's filter): the outcome of its newest TFTP
# transfer, or ``metadata`` once it read its metadata after that.
node_boot_status = Table(
    "node_boot_status",
    metadata,
    Column("node_uuid", String(36), primary_key=True),
    Column("outcome", String(32), nullable=False),
    Column("detail", String(255), nullable=False),
    Column("at", DateTime, nullable=False),
    Index("ix_node_boot_status_outcome", "outcome"),
    Index("ix_node_boot_status_at", "at"),
)

# --- services and liveness (migration 0010) --------------------------------------------

# A node's membership of its service (``service.name`` within its ``project_id``) and
# its cardinal value, unique within the service: given when the node joins, kept while
# it stays, free for the next joiner once it leaves (its service changes or it goes).
service_members = Table(
    "service_members",
    metadata,
    Column(
        "node_uuid",
        String(36),
        ForeignKey("nodes.uuid", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("project_id", String(255), nullable=False),
    Column("service_name", String(255), nullable=False),
    Column("cardinal", Integer, nullable=False),
    Column("joined_at", DateTime, nullable=False),
    UniqueConstraint("project_id", "service_name", "cardinal", name="uq_service_members_cardinal"),
)

# When each node last made a metadata request (UTC, to the conductors' flush interval):
# the liveness shown beside its shared entries.
node_seen = Table(
    "node_seen",
    metadata,
    Column(
        "node_uuid",
        String(36),
        ForeignKey("nodes.uuid", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("seen_at", DateTime, nullable=False),
)
