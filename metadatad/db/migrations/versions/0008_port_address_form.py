"""Port addresses in the form identity compares callers in.

An IPv4-mapped address (``::ffff:10.0.0.2``) becomes IPv4 and a zone (``fe80::1%eth0``)
is dropped, in the ``ports`` table and in the stored node documents, as validation
does from this version on.  Two ports that would then share an address stop the
upgrade, naming both nodes, and nothing is changed: an operator decides which keeps it.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

import ipaddress
import json

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_ports = sa.table(
    "ports",
    sa.column("mac", sa.String),
    sa.column("node_uuid", sa.String),
    sa.column("ip", sa.String),
)
_nodes = sa.table("nodes", sa.column("uuid", sa.String), sa.column("document", sa.Text))


def _identity_form(value: str) -> str:
    try:
        address = ipaddress.ip_address(value.split("%", 1)[0])
    except ValueError:
        return value  # not ours to judge here; validation refused such values anyway
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


def upgrade() -> None:
    from metadatad.db.migrate import SchemaError

    connection = op.get_bind()
    rows = connection.execute(
        sa.select(_ports.c.mac, _ports.c.node_uuid, _ports.c.ip).where(_ports.c.ip.is_not(None))
    ).all()
    owner = {row.ip: row.node_uuid for row in rows}
    changes = [(row, _identity_form(row.ip)) for row in rows if _identity_form(row.ip) != row.ip]
    for row, new in changes:
        other = owner.get(new)
        if other is not None:
            raise SchemaError(
                f"port {row.mac} of node {row.node_uuid} has address {row.ip}, which is "
                f"{new}, a port address of node {other}: give one of them another address "
                "(metadatad-manage node import), then upgrade again"
            )
        owner[new] = row.node_uuid
    for row, new in changes:
        connection.execute(_ports.update().where(_ports.c.mac == row.mac).values(ip=new))
    for uuid in sorted({row.node_uuid for row, _ in changes}):
        text = connection.execute(
            sa.select(_nodes.c.document).where(_nodes.c.uuid == uuid)
        ).scalar_one()
        document = json.loads(text)
        for port in document.get("ports") or []:
            if isinstance(port.get("ip"), str):
                port["ip"] = _identity_form(port["ip"])
        connection.execute(
            _nodes.update().where(_nodes.c.uuid == uuid).values(document=json.dumps(document))
        )


def downgrade() -> None:
    # The old form is not needed by older versions: they accept the new one.
    pass
