"""Plugin registry (built-ins + `webmacs.plugins` entry points), instance creation, wheel upload and removal."""

from __future__ import annotations

import asyncio
import email.parser
import hashlib
import importlib
import importlib.metadata
import json
import logging
import math
import re
import shlex
import subprocess
import sys
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from psycopg import AsyncConnection

from webmacs.errors import BadRequest, Conflict, DomainError, TooLarge, Unprocessable
from webmacs.plugins import Channel, Direction, PluginDescriptor, builtin
from webmacs.repositories import events as events_repo
from webmacs.repositories import plugins as plugins_repo
from webmacs.settings import Settings

log = logging.getLogger("webmacs.plugins")

ENTRY_POINT_GROUP = "webmacs.plugins"
# Keyed by Direction: `direction in EVENT_TYPE_BY_DIRECTION` narrows a str read from a plugin to a Direction.
EVENT_TYPE_BY_DIRECTION: dict[Direction, str] = {"input": "sensor", "output": "actuator", "bidirectional": "range"}

MAX_WHEEL_BYTES = 50 * 1024 * 1024
MAX_WHEEL_MEMBERS = 10_000
MAX_UNPACKED_BYTES = 200 * 1024 * 1024
MAX_METADATA_BYTES = 1024 * 1024
INSTALL_TIMEOUT_S = 120
WHEEL_FILE_NAME = re.compile(r"[A-Za-z0-9._+-]+\.whl")
PACKAGE_NAME = re.compile(r"[a-zA-Z0-9._-]+")


class InstallFailed(DomainError):
    """The installer rejected the wheel (spec §12.3 step 6: a 500 with a string detail)."""

    status_code = 500


# --- discovery ---


def _field(obj: Any, name: str, default: Any = None) -> Any:
    return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)


def _text(value: Any, max_length: int, *, min_length: int = 1) -> str:
    text = "" if value is None else str(getattr(value, "value", value))  # enums carry their wire string in .value
    if not min_length <= len(text) <= max_length or "\x00" in text:
        raise ValueError(f"invalid text {text[:40]!r}")
    return text


def _number(value: Any) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError("non-finite channel bound")
    return number


def _channel(raw: Any) -> Channel:
    direction = _text(_field(raw, "direction", "input"), 20)
    if direction not in EVENT_TYPE_BY_DIRECTION:
        raise ValueError(f"unknown channel direction {direction!r}")
    return Channel(
        id=_text(_field(raw, "id") or _field(raw, "channel_id"), 100),
        name=_text(_field(raw, "name") or _field(raw, "channel_name"), 255),
        direction=direction,
        unit=_text(_field(raw, "unit", ""), 50, min_length=0),
        min_value=_number(_field(raw, "min_value", 0.0)),
        max_value=_number(_field(raw, "max_value", 100.0)),
    )


def _channels_of(plugin: Any) -> list[Any]:
    channels = _field(plugin, "channels")
    if callable(channels):
        channels = channels()
    if channels is None and callable(getattr(plugin, "get_channels", None)):
        # WebMACS plugin classes declare channels on instances (`DevicePlugin.get_channels()`).
        target = plugin() if isinstance(plugin, type) else plugin
        channels = target.get_channels()
    return list(channels or [])


def describe(plugin: Any, distribution: str | None = None) -> PluginDescriptor:
    """A descriptor from whatever an entry point loaded: an object or class with id, name, version, vendor,
    description, url and channels — directly or under `.meta` as WebMACS plugin classes have them."""
    meta = _field(plugin, "meta") or plugin
    channels = tuple(_channel(c) for c in _channels_of(plugin))
    if len({c.id for c in channels}) != len(channels):
        raise ValueError("duplicate channel ids")
    return PluginDescriptor(
        id=_text(_field(meta, "id"), 100),
        name=_text(_field(meta, "name"), 255),
        version=_text(_field(meta, "version", "0.0.0"), 50),
        vendor=_text(_field(meta, "vendor", ""), 255, min_length=0),
        description=_text(_field(meta, "description", ""), 2000, min_length=0),
        url=_text(_field(meta, "url", ""), 2048, min_length=0),
        channels=channels,
        distribution=distribution,
    )


def discover_installed() -> list[PluginDescriptor]:
    """Plugins of installed distributions, in entry-point order; a failing entry point is logged and skipped."""
    found: list[PluginDescriptor] = []
    try:
        entry_points = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    except Exception:
        log.exception("plugin discovery failed")
        return found
    for ep in entry_points:
        try:
            dist = ep.dist.name if ep.dist is not None else None
            found.append(describe(ep.load(), dist))
        except Exception:
            log.warning("skipping plugin entry point %r", ep.value, exc_info=True)
    return found


def available() -> list[PluginDescriptor]:
    """Built-ins first, then discovered plugins; the first descriptor of an id wins."""
    plugins: dict[str, PluginDescriptor] = {}
    for descriptor in [*builtin(), *discover_installed()]:
        plugins.setdefault(descriptor.id, descriptor)
    return list(plugins.values())


def find(plugin_id: str) -> PluginDescriptor | None:
    return next((d for d in available() if d.id == plugin_id), None)


# --- instances ---


async def create_instance(
    conn: AsyncConnection,
    *,
    plugin_id: str,
    instance_name: str,
    demo_mode: bool,
    enabled: bool,
    auto_create_events: bool,
    config_json: str | None,
    user_public_id: str,
) -> dict[str, Any]:
    """Spec §12.1: the instance, then one mapping per declared channel (with its event, reused by name or
    created). An unknown plugin or an unreadable config leaves the instance without mappings."""
    instance = await plugins_repo.create(
        conn,
        plugin_id=plugin_id,
        instance_name=instance_name,
        demo_mode=demo_mode,
        enabled=enabled,
        config_json=config_json,
        user_public_id=user_public_id,
    )
    descriptor = await asyncio.to_thread(find, plugin_id)
    if descriptor is None:
        log.info("plugin %r is not installed; instance %r has no channels", plugin_id, instance_name)
        return instance
    try:
        json.loads(config_json or "{}")
    except ValueError:
        log.warning("instance %r: config_json is not JSON; no channels mapped", instance_name)
        return instance
    for channel in descriptor.channels:
        event_public_id = None
        if auto_create_events:
            event_name = f"{instance_name} \u2013 {channel.name}"
            if len(event_name) <= 255:
                event_public_id = await events_repo.get_or_create(
                    conn,
                    name=event_name,
                    min_value=channel.min_value,
                    max_value=channel.max_value,
                    unit=channel.unit,
                    type=EVENT_TYPE_BY_DIRECTION[channel.direction],
                    user_public_id=user_public_id,
                )
            else:
                log.warning("event name %r is too long; channel %r stays unlinked", event_name[:60], channel.id)
        await plugins_repo.create_mapping(
            conn,
            instance_id=instance["id"],
            channel_id=channel.id,
            channel_name=channel.name,
            direction=channel.direction,
            unit=channel.unit,
            event_public_id=event_public_id,
        )
    return instance


# --- packages ---


def wheel_file_name(filename: str | None) -> str:
    """The upload's base name (any client-side directory is dropped) if it is a plain wheel file name."""
    base = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    if not base.endswith(".whl"):
        raise BadRequest("File must be a .whl (Python wheel) package.")
    if not WHEEL_FILE_NAME.fullmatch(base) or base.startswith("."):
        raise BadRequest("Invalid wheel file name.")
    return base


async def store_upload(chunks: AsyncIterator[bytes], target: Path) -> tuple[str, int]:
    """Write the upload to `target` (created exclusively) as it arrives; returns (sha256 hex, size)."""
    digest = hashlib.sha256()
    size = 0
    try:
        out = target.open("xb")
    except FileExistsError as e:
        raise Conflict(f"Package '{target.name}' already exists.") from e
    try:
        with out:
            async for chunk in chunks:
                size += len(chunk)
                if size > MAX_WHEEL_BYTES:
                    raise TooLarge("Wheel exceeds maximum size (50 MB).")
                digest.update(chunk)
                out.write(chunk)
    except BaseException:
        # Inline, not awaited in a thread: the file is gone before the exception (often a cancellation) propagates.
        target.unlink(missing_ok=True)  # noqa: ASYNC240
        raise
    return digest.hexdigest(), size


def _unsafe_member(name: str) -> bool:
    path = name.replace("\\", "/")
    return path.startswith("/") or re.match(r"[A-Za-z]:", path) is not None or ".." in path.split("/")


def inspect_wheel(path: Path) -> tuple[str, str]:
    """(package name, version) of a wheel that is a safe zip declaring a `[webmacs.plugins]` entry point;
    raises Unprocessable otherwise (spec §12.3 step 4, plus zip safety checks)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise Unprocessable(f"Not a valid ZIP/wheel archive: {e}") from e
    try:
        with archive:
            members = archive.infolist()
            if len(members) > MAX_WHEEL_MEMBERS:
                raise Unprocessable(f"Wheel has too many members (more than {MAX_WHEEL_MEMBERS}).")
            for member in members:
                if _unsafe_member(member.filename):
                    raise Unprocessable(f"Wheel contains an unsafe path: '{member.filename}'.")
            if sum(m.file_size for m in members) > MAX_UNPACKED_BYTES:
                raise Unprocessable("Wheel contents exceed the maximum unpacked size (200 MB).")
            names = {m.filename for m in members}
            metadata = next((n for n in sorted(names) if n.endswith(".dist-info/METADATA")), None)
            if metadata is None:
                raise Unprocessable("No .dist-info/METADATA found in wheel.")
            headers = email.parser.HeaderParser().parsestr(_read_text(archive, metadata))
            name = str(headers.get("Name", "unknown")).strip()
            version = str(headers.get("Version", "0.0.0")).strip()
            entry_points = metadata.rsplit("/", 1)[0] + "/entry_points.txt"
            if entry_points not in names or "[webmacs.plugins]" not in _read_text(archive, entry_points):
                raise Unprocessable(
                    f"Wheel '{name}' does not declare a [webmacs.plugins] entry point. "
                    "It is not a valid WebMACS plugin package."
                )
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError) as e:
        raise Unprocessable(f"Not a valid ZIP/wheel archive: {e}") from e
    if not PACKAGE_NAME.fullmatch(name) or len(name) > 255:
        raise Unprocessable("Invalid package name.")
    if not version or len(version) > 50 or "\x00" in version:
        raise Unprocessable("Invalid package version.")
    return name, version


def _read_text(archive: zipfile.ZipFile, member: str) -> str:
    with archive.open(member) as f:
        data = f.read(MAX_METADATA_BYTES + 1)
    if len(data) > MAX_METADATA_BYTES:
        raise Unprocessable(f"'{member}' is too large.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Unprocessable(f"'{member}' is not UTF-8.") from e


def _install_argv(settings: Settings, wheel: Path) -> list[str]:
    command = shlex.split(settings.webmacs_plugin_install_cmd)
    if not command:
        command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-input", "--disable-pip-version-check"]
    return [*command, str(wheel)]


def install(settings: Settings, wheel: Path) -> None:
    """Run the installer on the wheel (blocking; call in a thread)."""
    try:
        done = subprocess.run(
            _install_argv(settings, wheel),
            capture_output=True,
            timeout=INSTALL_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise InstallFailed(f"Plugin install failed: timed out after {INSTALL_TIMEOUT_S} s") from e
    except OSError as e:
        raise InstallFailed(f"Plugin install failed: {e}"[:340]) from e
    if done.returncode != 0:
        raise InstallFailed(f"Plugin install failed: {done.stderr.decode(errors='replace')[:300]}")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def plugin_ids_of(package_name: str) -> list[str]:
    """Ids of the plugins the just-installed package provides (by distribution or `webmacs-plugin-<id>`
    name); when none can be attributed, every discovered third-party plugin id."""
    importlib.invalidate_caches()
    discovered = discover_installed()
    wanted = _canonical(package_name)
    ids = [
        d.id
        for d in discovered
        if (d.distribution and _canonical(d.distribution) == wanted) or _canonical(f"webmacs-plugin-{d.id}") == wanted
    ]
    return ids or [d.id for d in discovered]


async def upload_package(
    conn: AsyncConnection, settings: Settings, *, filename: str, chunks: AsyncIterator[bytes], user_public_id: str
) -> str:
    """Spec §12.3: store, validate, install and record an uploaded plugin wheel; returns the status message."""
    file_name = wheel_file_name(filename)
    plugin_dir = Path(settings.webmacs_plugin_dir)
    try:
        await asyncio.to_thread(plugin_dir.mkdir, parents=True, exist_ok=True)
    except OSError as e:
        raise InstallFailed(f"Plugin directory is not writable: {e.strerror}") from e
    target = plugin_dir / file_name
    sha256, size = await store_upload(chunks, target)
    try:
        name, version = await asyncio.to_thread(inspect_wheel, target)
        if await plugins_repo.package_exists(conn, package_name=name):
            raise Conflict(plugins_repo.PACKAGE_INSTALLED.format(name=name))
        await asyncio.to_thread(install, settings, target)
        plugin_ids = await asyncio.to_thread(plugin_ids_of, name)
        await plugins_repo.create_package(
            conn,
            package_name=name,
            version=version,
            file_path=str(target),
            file_hash_sha256=sha256,
            file_size_bytes=size,
            plugin_ids=json.dumps(plugin_ids),
            user_public_id=user_public_id,
        )
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return f"Plugin package '{name}' v{version} installed ({size:,} bytes). Restart the controller to activate."


def uninstall(settings: Settings, package_name: str) -> None:
    """pip-uninstall a package we installed with pip (blocking). With a custom install command the deployment
    manages installs itself, so nothing is uninstalled here; failures are logged, the record still goes."""
    if settings.webmacs_plugin_install_cmd:
        return
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "uninstall", "-y", "--no-input", "--disable-pip-version-check", package_name],
            capture_output=True,
            timeout=INSTALL_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if done.returncode != 0:
            log.warning("uninstalling %s failed: %s", package_name, done.stderr.decode(errors="replace")[:300])
    except (OSError, subprocess.TimeoutExpired):
        log.warning("uninstalling %s failed", package_name, exc_info=True)


def _remove_wheel(wheel: Path, plugin_dir: Path) -> None:
    # Only ever delete a file inside the plugin directory, whatever the row says.
    if wheel.resolve().parent == plugin_dir.resolve():
        wheel.unlink(missing_ok=True)


async def delete_package(conn: AsyncConnection, settings: Settings, *, public_id: str) -> str:
    """Spec §4.9 DELETE /plugins/packages/{id}: checks, uninstall, wheel file and record removed."""
    package = await plugins_repo.package_by_public_id(conn, public_id=public_id)
    if package["source"] == "bundled":
        raise BadRequest("Bundled plugins cannot be removed.")
    name = package["package_name"]
    if not PACKAGE_NAME.fullmatch(name):
        raise BadRequest("Invalid package name.")
    await asyncio.to_thread(uninstall, settings, name)
    if package["file_path"]:
        await asyncio.to_thread(_remove_wheel, Path(package["file_path"]), Path(settings.webmacs_plugin_dir))
    await plugins_repo.delete_package(conn, package_id=package["id"])
    return f"Plugin package '{name}' uninstalled. Restart the controller to apply."
