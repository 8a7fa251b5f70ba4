"""Plugins (spec §4.9, §12): available plugin classes, instances with channel mappings, wheel packages."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, StringConstraints

from webmacs.api.uploads import streamed_file
from webmacs.deps import AdminUser, CatalogWrites, Conn, CurrentUser, SettingsDep
from webmacs.errors import NotFound, TooLarge
from webmacs.pagination import Page, Paging, Status
from webmacs.repositories import plugins as plugins_repo
from webmacs.schemas import NO_NUL
from webmacs.services import plugins as plugins_service

router = APIRouter(prefix="/plugins", tags=["plugins"], dependencies=[CatalogWrites])

# PostgreSQL text cannot hold NUL; refusing it here keeps such input a 422 instead of a driver error.
Id = Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=NO_NUL)]  # plugin and channel ids
Name = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=NO_NUL)]
Unit = Annotated[str, StringConstraints(min_length=1, max_length=50, pattern=NO_NUL)]
AnyText = Annotated[str, StringConstraints(pattern=NO_NUL)]


class PluginStatus(StrEnum):
    inactive = "inactive"
    connected = "connected"
    error = "error"
    demo = "demo"


class ChannelDirection(StrEnum):
    input = "input"
    output = "output"
    bidirectional = "bidirectional"


class PluginSource(StrEnum):
    bundled = "bundled"
    uploaded = "uploaded"


class PluginInfo(BaseModel):
    id: str
    name: str
    version: str
    vendor: str
    description: str
    url: str


class PackageResponse(BaseModel):
    public_id: str
    package_name: str
    version: str
    source: PluginSource
    plugin_ids: list[str]
    file_size_bytes: int | None
    installed_on: datetime
    removable: bool


class ChannelMappingResponse(BaseModel):
    public_id: str
    channel_id: str
    channel_name: str
    direction: ChannelDirection
    unit: str
    event_public_id: str | None
    created_on: datetime


class PluginInstanceResponse(BaseModel):
    public_id: str
    plugin_id: str
    instance_name: str
    demo_mode: bool
    enabled: bool
    status: PluginStatus
    config_json: str | None
    error_message: str | None
    created_on: datetime
    updated_on: datetime
    user_public_id: str | None
    channel_mappings: list[ChannelMappingResponse]


class PluginInstanceCreate(BaseModel):
    plugin_id: Id
    instance_name: Name
    demo_mode: bool = False
    enabled: bool = True
    auto_create_events: bool = True
    config_json: AnyText | None = None


class PluginInstanceUpdate(BaseModel):
    instance_name: Name | None = None
    demo_mode: bool | None = None
    enabled: bool | None = None
    config_json: AnyText | None = None


class ChannelMappingCreate(BaseModel):
    channel_id: Id
    channel_name: Name
    direction: ChannelDirection
    unit: Unit
    event_public_id: AnyText | None = None


class ChannelMappingUpdate(BaseModel):
    event_public_id: AnyText | None = None


def mapping_response(row: dict[str, Any]) -> ChannelMappingResponse:
    return ChannelMappingResponse(
        public_id=row["public_id"],
        channel_id=row["channel_id"],
        channel_name=row["channel_name"],
        direction=row["direction"],
        unit=row["unit"],
        event_public_id=row["event_public_id"],
        created_on=row["created_on"],
    )


def instance_response(row: dict[str, Any]) -> PluginInstanceResponse:
    return PluginInstanceResponse(
        public_id=row["public_id"],
        plugin_id=row["plugin_id"],
        instance_name=row["instance_name"],
        demo_mode=row["demo_mode"],
        enabled=row["enabled"],
        status=row["status"],
        config_json=row["config_json"],
        error_message=row["error_message"],
        created_on=row["created_on"],
        updated_on=row["updated_on"],
        user_public_id=row["user_public_id"],
        channel_mappings=[mapping_response(m) for m in row["channel_mappings"]],
    )


def package_response(row: dict[str, Any]) -> PackageResponse:
    try:
        plugin_ids = [str(i) for i in json.loads(row["plugin_ids"])]
    except (ValueError, TypeError):
        plugin_ids = []  # the column is API-written JSON; a hand-edited row must not break the list
    return PackageResponse(
        public_id=row["public_id"],
        package_name=row["package_name"],
        version=row["version"],
        source=row["source"],
        plugin_ids=plugin_ids,
        file_size_bytes=row["file_size_bytes"],
        installed_on=row["installed_on"],
        removable=row["source"] == "uploaded",
    )


# Fixed paths first: they would otherwise match /{public_id}.


@router.get("/available", response_model=list[PluginInfo])
async def available_plugins(_: CurrentUser) -> list[PluginInfo]:
    return [PluginInfo(**d.metadata()) for d in await asyncio.to_thread(plugins_service.available)]


@router.get("/packages", response_model=list[PackageResponse])
async def list_packages(_: CurrentUser, conn: Conn) -> list[PackageResponse]:
    return [package_response(r) for r in await plugins_repo.packages(conn)]


_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "A .whl plugin package"}
                    },
                }
            }
        },
    }
}
# Multipart framing around the wheel; anything beyond cap + this is refused before it is read.
_MULTIPART_SLACK = 1024 * 1024


@router.post("/packages/upload", response_model=Status, status_code=201, openapi_extra=_UPLOAD_BODY)
async def upload_package(request: Request, user: AdminUser, conn: Conn, settings: SettingsDep) -> Status:
    # The body is read here, after authorisation, and streamed to disk under the size cap.
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > plugins_service.MAX_WHEEL_BYTES + _MULTIPART_SLACK:
        raise TooLarge("Wheel exceeds maximum size (50 MB).")
    upload = await streamed_file(request)
    message = await plugins_service.upload_package(
        conn, settings, filename=upload.filename, chunks=upload.chunks, user_public_id=user.public_id
    )
    return Status.ok(message)


@router.delete("/packages/{public_id}", response_model=Status)
async def delete_package(public_id: str, _: AdminUser, conn: Conn, settings: SettingsDep) -> Status:
    return Status.ok(await plugins_service.delete_package(conn, settings, public_id=public_id))


@router.get("", response_model=Page[PluginInstanceResponse])
async def list_instances(_: CurrentUser, conn: Conn, paging: Paging) -> Page[PluginInstanceResponse]:
    total, rows = await plugins_repo.page(conn, limit=paging.limit, offset=paging.offset)
    return Page.of(paging, total, [instance_response(r) for r in rows])


@router.post("", response_model=Status, status_code=201)
async def create_instance(body: PluginInstanceCreate, user: AdminUser, conn: Conn, request: Request) -> Status:
    await plugins_service.create_instance(
        conn,
        plugin_id=body.plugin_id,
        instance_name=body.instance_name,
        demo_mode=body.demo_mode,
        enabled=body.enabled,
        auto_create_events=body.auto_create_events,
        config_json=body.config_json,
        user_public_id=user.public_id,
    )
    return Status.ok("Plugin instance created.")


@router.get("/{public_id}", response_model=PluginInstanceResponse)
async def get_instance(public_id: str, _: CurrentUser, conn: Conn) -> PluginInstanceResponse:
    row = await plugins_repo.find(conn, public_id=public_id, with_mappings=True)
    if row is None:
        raise NotFound("Plugin instance not found.")  # this route's wording differs (spec §4.9)
    return instance_response(row)


@router.put("/{public_id}", response_model=Status)
async def update_instance(
    public_id: str, body: PluginInstanceUpdate, _: AdminUser, conn: Conn, request: Request
) -> Status:
    instance = await plugins_repo.by_public_id(conn, public_id=public_id)
    changes = body.model_dump(exclude_unset=True)
    # Nullable config_json takes an explicit null; NOT NULL columns ignore it.
    changes = {k: v for k, v in changes.items() if v is not None or k == "config_json"}
    await plugins_repo.update(conn, instance_id=instance["id"], changes=changes)
    return Status.ok("Plugin instance successfully updated.")


@router.delete("/{public_id}", response_model=Status)
async def delete_instance(public_id: str, _: AdminUser, conn: Conn, request: Request) -> Status:
    await plugins_repo.delete_cascade(conn, public_id=public_id)
    return Status.ok("Plugin instance successfully deleted.")


@router.get("/{public_id}/channels", response_model=list[ChannelMappingResponse])
async def list_channels(public_id: str, _: CurrentUser, conn: Conn) -> list[ChannelMappingResponse]:
    instance = await plugins_repo.by_public_id(conn, public_id=public_id)
    return [mapping_response(m) for m in await plugins_repo.mappings(conn, instance_id=instance["id"])]


@router.post("/{public_id}/channels", response_model=Status, status_code=201)
async def create_channel(
    public_id: str, body: ChannelMappingCreate, _: AdminUser, conn: Conn, request: Request
) -> Status:
    instance = await plugins_repo.by_public_id(conn, public_id=public_id)
    await plugins_repo.create_mapping(
        conn,
        instance_id=instance["id"],
        channel_id=body.channel_id,
        channel_name=body.channel_name,
        direction=body.direction.value,
        unit=body.unit,
        event_public_id=body.event_public_id,
    )
    return Status.ok("Channel mapping created.")


@router.put("/{public_id}/channels/{mapping_id}", response_model=Status)
async def update_channel(
    public_id: str, mapping_id: str, body: ChannelMappingUpdate, _: AdminUser, conn: Conn, request: Request
) -> Status:
    instance = await plugins_repo.by_public_id(conn, public_id=public_id)
    mapping = await plugins_repo.mapping_of_instance(conn, instance_id=instance["id"], public_id=mapping_id)
    if "event_public_id" in body.model_fields_set:
        await plugins_repo.relink_mapping(conn, mapping_id=mapping["id"], event_public_id=body.event_public_id)
    return Status.ok("Channel mapping successfully updated.")


@router.delete("/{public_id}/channels/{mapping_id}", response_model=Status)
async def delete_channel(public_id: str, mapping_id: str, _: AdminUser, conn: Conn, request: Request) -> Status:
    instance = await plugins_repo.by_public_id(conn, public_id=public_id)
    mapping = await plugins_repo.mapping_of_instance(conn, instance_id=instance["id"], public_id=mapping_id)
    await plugins_repo.delete_mapping(conn, mapping_id=mapping["id"])
    return Status.ok("Channel mapping successfully deleted.")
