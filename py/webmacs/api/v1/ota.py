"""OTA firmware records (spec §4.7, §10): admin CRUD, apply/rollback state machine, update check, bundle upload."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, StringConstraints

import webmacs
from webmacs.api.uploads import streamed_file
from webmacs.deps import AdminUser, Conn, CurrentUser, RuntimeDep, SettingsDep
from webmacs.errors import BadRequest
from webmacs.pagination import Page, Paging, Status
from webmacs.repositories import NOW
from webmacs.repositories import firmware as firmware_repo
from webmacs.schemas import NO_NUL
from webmacs.services import ota

router = APIRouter(prefix="/ota", tags=["ota"])


# PostgreSQL text cannot hold NUL: refuse it as invalid input instead of failing at the database.


class FirmwareCreate(BaseModel):
    version: Annotated[str, StringConstraints(pattern=ota.SEMVER, max_length=50)]
    changelog: Annotated[str, StringConstraints(pattern=NO_NUL)] | None = None


class ApplyRequest(BaseModel):
    download_url: Annotated[str, StringConstraints(max_length=2048, pattern=NO_NUL)] | None = None
    # The reference only checks the length; hex is required here so a typo fails early, not as a mismatch.
    file_hash_sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{64}$")] | None = None


class FirmwareUpdateResponse(BaseModel):
    public_id: str
    version: str
    changelog: str | None
    file_hash_sha256: str | None
    file_size_bytes: int | None
    status: str
    error_message: str | None
    created_on: datetime
    started_on: datetime | None
    completed_on: datetime | None
    user_public_id: str | None
    has_firmware_file: bool


class UpdateCheckResponse(BaseModel):
    current_version: str
    latest_version: str | None
    update_available: bool
    github_latest_version: str | None
    github_download_url: str | None
    github_release_url: str | None
    github_error: str | None


def to_response(row: dict[str, Any]) -> FirmwareUpdateResponse:
    # file_path is never exposed; has_firmware_file says whether one is recorded.
    return FirmwareUpdateResponse(
        **{k: row[k] for k in FirmwareUpdateResponse.model_fields if k != "has_firmware_file"},
        has_firmware_file=row["file_path"] is not None,
    )


@router.get("", response_model=Page[FirmwareUpdateResponse])
async def list_updates(_: AdminUser, conn: Conn, paging: Paging) -> Page[FirmwareUpdateResponse]:
    total, rows = await firmware_repo.page(conn, limit=paging.limit, offset=paging.offset)
    return Page.of(paging, total, [to_response(r) for r in rows])


@router.post("", response_model=Status, status_code=201)
async def create_update(body: FirmwareCreate, user: AdminUser, conn: Conn) -> Status:
    await firmware_repo.create(conn, version=body.version, changelog=body.changelog, user_public_id=user.public_id)
    return Status.ok("Firmware update successfully registered.")


@router.get("/check", response_model=UpdateCheckResponse)
async def check_for_updates(_: CurrentUser, conn: Conn, rt: RuntimeDep) -> UpdateCheckResponse:
    settings = rt.settings
    current = webmacs.__version__
    db_best = max(
        (v for v in await firmware_repo.candidate_versions(conn) if ota.newer(v, current)),
        key=ota.version_key,
        default=None,
    )
    gh = await rt.ota_github_cache.latest(settings)
    gh_newer = gh.version if ota.newer(gh.version, current) else None
    newer = [v for v in (db_best, gh_newer) if v is not None]
    return UpdateCheckResponse(
        current_version=current,
        latest_version=max(newer, key=ota.version_key) if newer else None,
        update_available=bool(newer),
        github_latest_version=gh.version,
        github_download_url=gh.download_url,
        github_release_url=gh.release_url,
        github_error=gh.error,
    )


@router.post(
    "/upload",
    response_model=Status,
    status_code=201,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {"file": {"type": "string", "format": "binary"}},
                    }
                }
            },
        }
    },
)
async def upload_bundle(request: Request, _: AdminUser, settings: SettingsDep) -> Status:
    # The body is parsed here, not by FastAPI, so that it streams to disk under the size cap instead of
    # being spooled whole first.
    upload = await streamed_file(request)
    name, size = await ota.store_bundle(upload.filename, upload.chunks, settings)
    return Status.ok(f"Bundle '{name}' uploaded ({size:,} bytes). Update will be applied automatically.")


@router.get("/{public_id}", response_model=FirmwareUpdateResponse)
async def get_update(public_id: str, _: AdminUser, conn: Conn) -> FirmwareUpdateResponse:
    return to_response(await firmware_repo.by_public_id(conn, public_id=public_id))


@router.post("/{public_id}/apply", response_model=Status)
async def apply_update(
    public_id: str, _: AdminUser, conn: Conn, settings: SettingsDep, body: ApplyRequest | None = None
) -> Any:
    fw = await firmware_repo.by_public_id(conn, public_id=public_id, for_update=True)
    body = body or ApplyRequest()
    if body.download_url is None:
        ota.check_transition(fw["status"], "completed")
        if fw["file_path"] and fw["file_hash_sha256"]:
            actual = await ota.sha256_file(Path(fw["file_path"]))
            if actual != fw["file_hash_sha256"].lower():
                ota.check_transition(fw["status"], "failed")
                error = ota.HASH_MISMATCH if actual else "Firmware file is missing"
                await firmware_repo.update(
                    conn, firmware_id=fw["id"], changes={"status": "failed", "error_message": error}
                )
                # Returned, not raised: the failed state is a finding about the stored file and is kept.
                return JSONResponse({"detail": error}, status_code=400)
        await firmware_repo.update(
            conn,
            firmware_id=fw["id"],
            changes={
                "status": "completed",
                "error_message": None,
                "completed_on": NOW,
                "started_on": fw["started_on"] or NOW,
            },
        )
        return Status.ok("Firmware update applied successfully.")

    # pending → downloading → verifying → applying → completed, in this one transaction: a failure raises,
    # which rolls the record back to the state it had (spec §10.2), and leaves no file behind.
    ota.check_transition(fw["status"], "downloading")
    try:
        got = await ota.download(
            body.download_url,
            ota.firmware_path(settings, fw["version"]),
            settings,
            expected_sha256=body.file_hash_sha256,
        )
    except ota.DownloadFailed as e:
        raise BadRequest(str(e)) from e
    await firmware_repo.update(
        conn,
        firmware_id=fw["id"],
        changes={
            "status": "completed",
            "error_message": None,
            "started_on": NOW,
            "completed_on": NOW,
            "file_path": str(got.path),
            "file_size_bytes": got.size,
            "file_hash_sha256": got.sha256,
        },
    )
    return Status.ok("Firmware update applied successfully.")


@router.post("/{public_id}/rollback", response_model=Status)
async def rollback_update(public_id: str, _: AdminUser, conn: Conn) -> Status:
    fw = await firmware_repo.by_public_id(conn, public_id=public_id, for_update=True)
    ota.check_transition(fw["status"], "rolled_back")
    await firmware_repo.update(conn, firmware_id=fw["id"], changes={"status": "rolled_back"})
    return Status.ok("Firmware update rolled back successfully.")


@router.delete("/{public_id}", response_model=Status)
async def delete_update(public_id: str, _: AdminUser, conn: Conn, settings: SettingsDep) -> Status:
    row = await firmware_repo.delete(conn, public_id=public_id)
    path = row["file_path"]
    # The record's downloaded file goes with it; never touch anything outside the update directory.
    if path and ota.inside(Path(path), settings.webmacs_update_dir):
        with contextlib.suppress(OSError):
            await asyncio.to_thread(Path(path).unlink)
    return Status.ok("FirmwareUpdate successfully deleted.")
