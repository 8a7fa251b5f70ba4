"""Dashboards and widgets (spec §4.8, §11): own-or-global visibility, owner-or-admin writes."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import BaseModel, Field, StringConstraints

from webmacs.deps import Conn, CurrentUser, OperatorUser, User
from webmacs.errors import Forbidden, NotFound
from webmacs.pagination import Page, Paging, Status
from webmacs.repositories import dashboards as dashboards_repo
from webmacs.schemas import NO_NUL

router = APIRouter(prefix="/dashboards", tags=["dashboards"])

# PostgreSQL text cannot hold NUL; refusing it here keeps such input a 422 instead of a driver error.
Title = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=NO_NUL)]
# Positions are int4 columns; the spec sets no bounds, the column does.
Position = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
Span = Annotated[int, Field(ge=1, le=12)]
Text = Annotated[str, StringConstraints(pattern=NO_NUL)]


class WidgetType(StrEnum):
    line_chart = "line_chart"
    gauge = "gauge"
    stat_card = "stat_card"
    actuator_toggle = "actuator_toggle"


class DashboardCreate(BaseModel):
    name: Title
    is_global: bool = False


class DashboardUpdate(BaseModel):
    name: Annotated[str, StringConstraints(max_length=255, pattern=NO_NUL)] | None = None
    is_global: bool | None = None


class WidgetCreate(BaseModel):
    widget_type: WidgetType
    title: Title
    event_public_id: Text | None = None
    x: Position = 0
    y: Position = 0
    w: Span = 4
    h: Span = 3
    config_json: Text | None = None


class WidgetUpdate(BaseModel):
    widget_type: WidgetType | None = None
    title: Title | None = None
    event_public_id: Text | None = None
    x: Position | None = None
    y: Position | None = None
    w: Span | None = None
    h: Span | None = None
    config_json: Text | None = None


class WidgetResponse(BaseModel):
    public_id: str
    widget_type: WidgetType
    title: str
    event_public_id: str | None
    x: int
    y: int
    w: int
    h: int
    config_json: str | None


class DashboardResponse(BaseModel):
    public_id: str
    name: str
    is_global: bool
    created_on: datetime
    user_public_id: str | None
    widgets: list[WidgetResponse]


def widget_response(row: dict[str, Any]) -> WidgetResponse:
    return WidgetResponse(
        public_id=row["public_id"],
        widget_type=row["widget_type"],
        title=row["title"],
        event_public_id=row["event_public_id"],
        x=row["x"],
        y=row["y"],
        w=row["w"],
        h=row["h"],
        config_json=row["config_json"],
    )


def to_response(row: dict[str, Any]) -> DashboardResponse:
    return DashboardResponse(
        public_id=row["public_id"],
        name=row["name"],
        is_global=row["is_global"],
        created_on=row["created_on"],
        user_public_id=row["user_public_id"],
        widgets=[widget_response(w) for w in row["widgets"]],
    )


async def _writable(conn: Conn, public_id: str, user: User) -> dict[str, Any]:
    """The dashboard if the caller may change it: 404 before 403 (spec §4.8 check order)."""
    dashboard = await dashboards_repo.by_public_id(conn, public_id=public_id)
    if dashboard["user_public_id"] != user.public_id and not user.admin:
        raise Forbidden("Not allowed.")
    return dashboard


async def _widget_on(conn: Conn, dashboard: dict[str, Any], widget_public_id: str) -> dict[str, Any]:
    widget = await dashboards_repo.widget_by_public_id(conn, public_id=widget_public_id)
    if widget["dashboard_id"] != dashboard["id"]:
        raise NotFound("Widget not on this dashboard.")
    return widget


@router.get("", response_model=Page[DashboardResponse])
async def list_dashboards(user: CurrentUser, conn: Conn, paging: Paging) -> Page[DashboardResponse]:
    total, rows = await dashboards_repo.visible_page(
        conn, user_public_id=user.public_id, limit=paging.limit, offset=paging.offset
    )
    return Page.of(paging, total, [to_response(r) for r in rows])


@router.post("", response_model=DashboardResponse, status_code=201)
async def create_dashboard(body: DashboardCreate, user: OperatorUser, conn: Conn) -> DashboardResponse:
    return to_response(
        await dashboards_repo.create(conn, name=body.name, is_global=body.is_global, user_public_id=user.public_id)
    )


@router.get("/{public_id}", response_model=DashboardResponse)
async def get_dashboard(public_id: str, user: CurrentUser, conn: Conn) -> DashboardResponse:
    dashboard = await dashboards_repo.by_public_id(conn, public_id=public_id, with_widgets=True)
    # Private dashboards are private from admins too (spec §4.8).
    if dashboard["user_public_id"] != user.public_id and not dashboard["is_global"]:
        raise Forbidden("Not allowed.")
    return to_response(dashboard)


@router.put("/{public_id}", response_model=Status)
async def update_dashboard(public_id: str, body: DashboardUpdate, user: OperatorUser, conn: Conn) -> Status:
    dashboard = await _writable(conn, public_id, user)
    changes = {k: v for k, v in body.model_dump(exclude_unset=True).items() if v is not None}
    await dashboards_repo.update(conn, dashboard_id=dashboard["id"], changes=changes)
    return Status.ok("Dashboard successfully updated.")


@router.delete("/{public_id}", response_model=Status)
async def delete_dashboard(public_id: str, user: OperatorUser, conn: Conn) -> Status:
    dashboard = await _writable(conn, public_id, user)
    await dashboards_repo.delete(conn, dashboard_id=dashboard["id"])
    return Status.ok("Dashboard successfully deleted.")


@router.post("/{public_id}/widgets", response_model=WidgetResponse, status_code=201)
async def create_widget(public_id: str, body: WidgetCreate, user: OperatorUser, conn: Conn) -> WidgetResponse:
    dashboard = await _writable(conn, public_id, user)
    widget = await dashboards_repo.create_widget(
        conn, dashboard_id=dashboard["id"], fields=body.model_dump(mode="json")
    )
    return widget_response(widget)


@router.put("/{public_id}/widgets/{widget_id}", response_model=Status)
async def update_widget(public_id: str, widget_id: str, body: WidgetUpdate, user: OperatorUser, conn: Conn) -> Status:
    dashboard = await _writable(conn, public_id, user)
    widget = await _widget_on(conn, dashboard, widget_id)
    changes = body.model_dump(exclude_unset=True, mode="json")
    # Nullable columns take an explicit null (clears the event link, the config); NOT NULL ones ignore it.
    changes = {k: v for k, v in changes.items() if v is not None or k in ("event_public_id", "config_json")}
    await dashboards_repo.update_widget(conn, widget_id=widget["id"], changes=changes)
    return Status.ok("Widget successfully updated.")


@router.delete("/{public_id}/widgets/{widget_id}", response_model=Status)
async def delete_widget(public_id: str, widget_id: str, user: OperatorUser, conn: Conn) -> Status:
    dashboard = await _writable(conn, public_id, user)
    widget = await _widget_on(conn, dashboard, widget_id)
    await dashboards_repo.delete_widget(conn, widget_id=widget["id"])
    return Status.ok("Widget successfully deleted.")
