"""Plugin instances, their channel mappings and uploaded plugin packages (spec §4.9, §12)."""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection, errors, sql
from psycopg.rows import dict_row

from webmacs.errors import Conflict, NotFound
from webmacs.repositories import assignments, conflict_on_duplicate
from webmacs.repositories import events as events_repo

COLUMNS = (
    "id, public_id, plugin_id, instance_name, demo_mode, enabled, status, config_json, error_message,"
    " created_on, updated_on, user_public_id"
)
MAPPING_COLUMNS = (
    "id, public_id, plugin_instance_id, channel_id, channel_name, direction, unit, event_public_id, created_on"
)
PACKAGE_COLUMNS = (
    "id, public_id, package_name, version, source, file_path, file_hash_sha256, file_size_bytes,"
    " plugin_ids, installed_on, user_public_id"
)
UPDATABLE = ("instance_name", "demo_mode", "enabled", "config_json")
PACKAGE_INSTALLED = "Plugin package '{name}' is already installed. Remove it first to upload a new version."


class EventNotFound(NotFound):
    """A channel mapping names an event that does not exist."""

    def __init__(self) -> None:
        super().__init__("Event not found.")


async def _attach_mappings(conn: AsyncConnection, instances: list[dict[str, Any]]) -> None:
    by_id = {i["id"]: i for i in instances}
    for i in instances:
        i["channel_mappings"] = []
    if not by_id:
        return
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        f"SELECT {MAPPING_COLUMNS} FROM channel_mappings WHERE plugin_instance_id = ANY(%(ids)s) ORDER BY id",
        {"ids": list(by_id)},
    )
    for m in await cur.fetchall():
        by_id[m["plugin_instance_id"]]["channel_mappings"].append(m)


async def page(conn: AsyncConnection, *, limit: int, offset: int) -> tuple[int, list[dict[str, Any]]]:
    cur = await conn.execute("SELECT count(*) FROM plugin_instances")
    total = await cur.fetchone()
    rows = conn.cursor(row_factory=dict_row)
    await rows.execute(
        f"SELECT {COLUMNS} FROM plugin_instances ORDER BY id LIMIT %(l)s OFFSET %(o)s", {"l": limit, "o": offset}
    )
    instances = await rows.fetchall()
    await _attach_mappings(conn, instances)
    return (int(total[0]) if total else 0), instances


async def find(conn: AsyncConnection, *, public_id: str, with_mappings: bool = False) -> dict[str, Any] | None:
    if "\x00" in public_id:  # PostgreSQL text cannot hold NUL: no row has such an id
        return None
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(f"SELECT {COLUMNS} FROM plugin_instances WHERE public_id = %(p)s", {"p": public_id})
    row = await cur.fetchone()
    if row is not None and with_mappings:
        await _attach_mappings(conn, [row])
    return row


async def by_public_id(conn: AsyncConnection, *, public_id: str) -> dict[str, Any]:
    row = await find(conn, public_id=public_id)
    if row is None:
        raise NotFound.entity("Plugin instance", public_id)
    return row


async def create(
    conn: AsyncConnection,
    *,
    plugin_id: str,
    instance_name: str,
    demo_mode: bool,
    enabled: bool,
    config_json: str | None,
    user_public_id: str,
) -> dict[str, Any]:
    cur = conn.cursor(row_factory=dict_row)
    async with conflict_on_duplicate(conn, "Plugin instance"):
        await cur.execute(
            "INSERT INTO plugin_instances (plugin_id, instance_name, demo_mode, enabled, config_json, user_public_id)"
            " VALUES (%(p)s, %(n)s, %(d)s, %(e)s, %(c)s, %(u)s) RETURNING " + COLUMNS,
            {"p": plugin_id, "n": instance_name, "d": demo_mode, "e": enabled, "c": config_json, "u": user_public_id},
        )
    row = await cur.fetchone()
    assert row is not None  # INSERT … RETURNING always yields the row
    return row


async def update(conn: AsyncConnection, *, instance_id: int, changes: dict[str, Any]) -> None:
    a = assignments(changes, UPDATABLE)
    if a is None:
        return
    stmt = sql.SQL("UPDATE plugin_instances SET {}, updated_on = now() WHERE id = %(id)s").format(a.clause)
    async with conflict_on_duplicate(conn, "Plugin instance"):
        await conn.execute(stmt, {**a.params, "id": instance_id})


async def delete_cascade(conn: AsyncConnection, *, public_id: str) -> None:
    """Spec §12.2 in one transaction: the events the instance's mappings point at go — with their datapoints,
    rules and widget/mapping links (also those of other instances) — then the instance and its mappings."""
    async with conn.transaction():
        row = None
        if "\x00" not in public_id:
            cur = await conn.execute(
                "SELECT id FROM plugin_instances WHERE public_id = %(p)s FOR UPDATE", {"p": public_id}
            )
            row = await cur.fetchone()
        if row is None:
            raise NotFound.entity("Plugin instance", public_id)
        cur = await conn.execute(
            "SELECT e.id FROM events e JOIN channel_mappings m ON m.event_public_id = e.public_id"
            " WHERE m.plugin_instance_id = %(i)s ORDER BY e.id FOR UPDATE OF e",
            {"i": row[0]},
        )
        event_ids = sorted({r[0] for r in await cur.fetchall()})
        await events_repo.delete_ids(conn, ids=event_ids)
        await conn.execute("DELETE FROM plugin_instances WHERE id = %(i)s", {"i": row[0]})


# --- channel mappings ---


async def mappings(conn: AsyncConnection, *, instance_id: int) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        f"SELECT {MAPPING_COLUMNS} FROM channel_mappings WHERE plugin_instance_id = %(i)s ORDER BY id",
        {"i": instance_id},
    )
    return await cur.fetchall()


async def _check_event(conn: AsyncConnection, event_public_id: str | None) -> None:
    if event_public_id is not None and await events_repo.find(conn, public_id=event_public_id) is None:
        raise EventNotFound()


async def create_mapping(
    conn: AsyncConnection,
    *,
    instance_id: int,
    channel_id: str,
    channel_name: str,
    direction: str,
    unit: str,
    event_public_id: str | None,
) -> dict[str, Any]:
    await _check_event(conn, event_public_id)
    cur = conn.cursor(row_factory=dict_row)
    try:
        async with conflict_on_duplicate(conn, "Channel mapping"):
            await cur.execute(
                "INSERT INTO channel_mappings (plugin_instance_id, channel_id, channel_name, direction, unit,"
                " event_public_id) VALUES (%(i)s, %(c)s, %(n)s, %(d)s, %(u)s, %(e)s) RETURNING " + MAPPING_COLUMNS,
                {"i": instance_id, "c": channel_id, "n": channel_name, "d": direction, "u": unit, "e": event_public_id},
            )
    except errors.ForeignKeyViolation as e:  # the event (or instance) was deleted since the check
        raise EventNotFound() from e
    row = await cur.fetchone()
    assert row is not None  # INSERT … RETURNING always yields the row
    return row


async def mapping_of_instance(conn: AsyncConnection, *, instance_id: int, public_id: str) -> dict[str, Any]:
    """The mapping `public_id` of this instance; a mapping of another instance is not found here."""
    row = None
    if "\x00" not in public_id:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(
            f"SELECT {MAPPING_COLUMNS} FROM channel_mappings WHERE public_id = %(p)s AND plugin_instance_id = %(i)s",
            {"p": public_id, "i": instance_id},
        )
        row = await cur.fetchone()
    if row is None:
        raise NotFound.entity("Channel mapping", public_id)
    return row


async def relink_mapping(conn: AsyncConnection, *, mapping_id: int, event_public_id: str | None) -> None:
    await _check_event(conn, event_public_id)
    try:
        async with conn.transaction():
            await conn.execute(
                "UPDATE channel_mappings SET event_public_id = %(e)s WHERE id = %(id)s",
                {"e": event_public_id, "id": mapping_id},
            )
    except errors.ForeignKeyViolation as e:
        raise EventNotFound() from e


async def delete_mapping(conn: AsyncConnection, *, mapping_id: int) -> None:
    await conn.execute("DELETE FROM channel_mappings WHERE id = %(id)s", {"id": mapping_id})


# --- packages ---


async def packages(conn: AsyncConnection) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(f"SELECT {PACKAGE_COLUMNS} FROM plugin_packages ORDER BY installed_on, id")
    return await cur.fetchall()


async def package_by_public_id(conn: AsyncConnection, *, public_id: str) -> dict[str, Any]:
    row = None
    if "\x00" not in public_id:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(
            f"SELECT {PACKAGE_COLUMNS} FROM plugin_packages WHERE public_id = %(p)s FOR UPDATE", {"p": public_id}
        )
        row = await cur.fetchone()
    if row is None:
        raise NotFound.entity("Plugin package", public_id)
    return row


async def package_exists(conn: AsyncConnection, *, package_name: str) -> bool:
    cur = await conn.execute("SELECT 1 FROM plugin_packages WHERE package_name = %(n)s", {"n": package_name})
    return await cur.fetchone() is not None


async def create_package(
    conn: AsyncConnection,
    *,
    package_name: str,
    version: str,
    file_path: str,
    file_hash_sha256: str,
    file_size_bytes: int,
    plugin_ids: str,
    user_public_id: str,
) -> None:
    try:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO plugin_packages (package_name, version, source, file_path, file_hash_sha256,"
                " file_size_bytes, plugin_ids, user_public_id)"
                " VALUES (%(n)s, %(v)s, 'uploaded', %(f)s, %(h)s, %(s)s, %(p)s, %(u)s)",
                {
                    "n": package_name,
                    "v": version,
                    "f": file_path,
                    "h": file_hash_sha256,
                    "s": file_size_bytes,
                    "p": plugin_ids,
                    "u": user_public_id,
                },
            )
    except errors.UniqueViolation as e:
        raise Conflict(PACKAGE_INSTALLED.format(name=package_name)) from e


async def delete_package(conn: AsyncConnection, *, package_id: int) -> None:
    await conn.execute("DELETE FROM plugin_packages WHERE id = %(id)s", {"id": package_id})
