"""`Client`: the REST API from Python — login or `wm_` token, small CRUD helpers, series and exports as polars."""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Literal

import httpx
import polars as pl


class ApiError(RuntimeError):
    """The server answered with an error status; `status` and `detail` are the response's."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


def _iso(t: datetime | str | None) -> str | None:
    return t.isoformat() if isinstance(t, datetime) else t


class Client:
    """A synchronous client for one server. Authenticate with `token` (a `wm_` API token or a JWT) or call
    `login(email, password)`. Use as a context manager or call `close()`."""

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 60.0, verify: bool | str = True) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout, verify=verify)
        self.token = token

    @property
    def token(self) -> str | None:
        return self._token

    @token.setter
    def token(self, value: str | None) -> None:
        self._token = value
        if value:
            self._http.headers["Authorization"] = f"Bearer {value}"
        else:
            self._http.headers.pop("Authorization", None)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- plumbing ----------------------------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send a request to `/api/v1/<path>` (or an absolute path starting with `/`); raise `ApiError` on 4xx/5xx."""
        target = path if path.startswith("/") else f"/api/v1/{path}"
        r = self._http.request(method, target, **kwargs)
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise ApiError(r.status_code, detail)
        return r

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params).json()

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, json=body).json()

    def put(self, path: str, body: Any = None) -> Any:
        return self.request("PUT", path, json=body).json()

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path).json()

    # --- auth --------------------------------------------------------------------------------------------

    def login(self, email: str, password: str) -> str:
        """Log in; the JWT is used for every later request and returned."""
        token = str(self.post("auth/login", {"email": email, "password": password})["access_token"])
        self.token = token
        return token

    def logout(self) -> None:
        self.post("auth/logout")
        self.token = None

    # --- CRUD helpers ------------------------------------------------------------------------------------

    def events(self, *, page_size: int = 100) -> list[dict[str, Any]]:
        """Every event (all pages)."""
        out: list[dict[str, Any]] = []
        page = 1
        while True:
            body = self.get("events", page=page, page_size=page_size)
            out.extend(body["data"])
            if len(out) >= body["total"] or not body["data"]:
                return out
            page += 1

    def create_event(
        self, name: str, *, unit: str, min_value: float, max_value: float, type: str = "sensor"
    ) -> dict[str, Any]:
        """Create an event and return it (looked up by its unique name)."""
        self.post("events", {"name": name, "unit": unit, "min_value": min_value, "max_value": max_value, "type": type})
        return next(e for e in self.events() if e["name"] == name)

    def delete_event(self, public_id: str) -> None:
        self.delete(f"events/{public_id}")

    def experiments(self) -> list[dict[str, Any]]:
        return list(self.get("experiments", page_size=100)["data"])

    # --- analyst path --------------------------------------------------------------------------------------

    def series(
        self,
        events: Sequence[str],
        start: datetime | str,
        end: datetime | str,
        *,
        bucket: str | None = None,
        agg: str = "avg",
        tz: str = "UTC",
        mode: str | None = None,
        max_points: int | None = None,
    ) -> pl.DataFrame:
        """`GET /series` as a long DataFrame: columns `event_public_id`, `time` (UTC), `value`."""
        params: dict[str, Any] = {"events": list(events), "start": _iso(start), "end": _iso(end), "agg": agg, "tz": tz}
        optional = {"bucket": bucket, "mode": mode, "max_points": max_points}
        params.update({k: v for k, v in optional.items() if v is not None})
        body = self.request("GET", "series", params=params).json()
        ids: list[str] = []
        times: list[str] = []
        values: list[float] = []
        for public_id, ev in body["events"].items():
            for t, v in ev["points"]:
                ids.append(public_id)
                times.append(t)
                values.append(v)
        frame = pl.DataFrame(
            {"event_public_id": ids, "time": times, "value": values},
            schema={"event_public_id": pl.String, "time": pl.String, "value": pl.Float64},
        )
        return frame.with_columns(pl.col("time").str.to_datetime(time_zone="UTC", time_unit="us"))

    def export(
        self,
        events: Sequence[str],
        start: datetime | str | None = None,
        end: datetime | str | None = None,
        *,
        format: Literal["arrow", "parquet"] = "parquet",
    ) -> pl.DataFrame:
        """`GET /export` as a DataFrame: `time` (timestamp[us, UTC]), `event_public_id`, `event_name`, `unit`,
        `value`, `experiment_public_id`, ordered by time then event."""
        params: dict[str, Any] = {"events": list(events), "format": format}
        if start is not None:
            params["start"] = _iso(start)
        if end is not None:
            params["end"] = _iso(end)
        body = self.request("GET", "export", params=params).content
        if format == "arrow":
            # The stream's dictionary columns arrive as categoricals: give them the Parquet reading's type.
            return pl.read_ipc_stream(io.BytesIO(body)).with_columns(pl.col(pl.Categorical).cast(pl.String))
        return pl.read_parquet(io.BytesIO(body))
