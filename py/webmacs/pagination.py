"""The spec's pagination envelope (§0.1): `page`, `page_size` 1..100, `total`, `data`."""

from __future__ import annotations

from typing import Annotated, Generic, TypeVar

from fastapi import Depends, Query
from pydantic import BaseModel

T = TypeVar("T")
_MAX_OFFSET = 2**63 - 1


class PageParams(BaseModel):
    page: int
    page_size: int

    @property
    def limit(self) -> int:
        return self.page_size

    @property
    def offset(self) -> int:
        # `page` has no upper bound (spec §0.1): a page far past the end must read as empty, not overflow
        # PostgreSQL's bigint OFFSET.
        return min((self.page - 1) * self.page_size, _MAX_OFFSET)


def _page_params(
    page: Annotated[int, Query(ge=1)] = 1, page_size: Annotated[int, Query(ge=1, le=100)] = 25
) -> PageParams:
    return PageParams(page=page, page_size=page_size)


Paging = Annotated[PageParams, Depends(_page_params)]


class Page(BaseModel, Generic[T]):
    page: int
    page_size: int
    total: int
    data: list[T]

    @classmethod
    def of(cls, params: PageParams, total: int, data: list[T]) -> Page[T]:
        return cls(page=params.page, page_size=params.page_size, total=total, data=data)


class Status(BaseModel):
    """The status envelope: `{"status": "success", "message": …}`."""

    status: str = "success"
    message: str

    @classmethod
    def ok(cls, message: str) -> Status:
        return cls(message=message)
