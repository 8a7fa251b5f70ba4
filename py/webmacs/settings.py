"""All configuration, read once from the environment (spec §16 names; our own are prefixed WEBMACS_)."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEV_SECRET_WARNING = "SECRET_KEY is empty or shorter than 32 characters; acceptable only in development."

class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", case_sensitive=False, extra="ignore")

    # --- WebMACS names (spec §16) ---
    database_url: str | None = None
    secret_key: str = ""
    algorithm: str = "HS256"
    access_token_expire_minutes: int = Field(default=1440, ge=1)
    backend_host: str = "0.0.0.0"
    backend_port: int = 8000
    cors_origins: Annotated[list[str], NoDecode] = ["http://localhost:3000", "http://localhost:5173"]
    debug: bool = False
    env: Literal["development", "production", "test"] = "development"
    initial_admin_email: str = "admin@webmacs.io"
    initial_admin_username: str = "admin"
    initial_admin_password: str = "admin123"
    rate_limit_per_minute: int = Field(default=300, ge=1)
    github_repo: str = "stefanposs/webmacs"
    webmacs_update_dir: Path = Path("/updates")
    webmacs_plugin_dir: Path = Path("/plugins")

    # --- our own (WEBMACS_*) ---
    #: Where the local cluster, uploads in development and caches live.
    webmacs_home: Path = Path(".webmacs")
    #: Port of the project-managed local cluster.
    webmacs_db_port: int = 55432
    #: Chunk interval of the datapoints hypertable (a PostgreSQL interval).
    webmacs_chunk_interval: str = "1 day"
    #: Connection pool size of the API (the engine has its own connections).
    webmacs_pool_size: int = Field(default=10, ge=1)
    #: bcrypt cost factor (tests lower it; 12 is the production default).
    webmacs_bcrypt_rounds: int = Field(default=12, ge=4, le=16)
    #: Bind address/port of `webmacs serve`.
    webmacs_host: str = "127.0.0.1"
    webmacs_port: int = 8000

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _parse_origins(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("["):
                return json.loads(v)
            return [o.strip() for o in v.split(",") if o.strip()]
        return v

    @field_validator("database_url", mode="before")
    @classmethod
    def _normalise_url(cls, v: Any) -> Any:
        # WebMACS deployments carry SQLAlchemy URLs; psycopg wants the plain libpq form.
        if isinstance(v, str):
            v = v.strip()
            if not v:
                return None
            for prefix in ("postgresql+asyncpg://", "postgresql+psycopg://", "postgresql+psycopg2://", "postgres://"):
                if v.startswith(prefix):
                    return "postgresql://" + v[len(prefix):]
        return v

    @model_validator(mode="after")
    def _production_secret(self) -> Settings:
        if self.env == "production" and len(self.secret_key) < 32:
            raise ValueError("SECRET_KEY must be set to at least 32 characters when ENV=production")
        return self

    @property
    def weak_secret(self) -> bool:
        return len(self.secret_key) < 32

    @cached_property
    def secret_key_effective(self) -> str:
        """The JWT signing key. An empty development key is replaced by a random per-process key rather
        than signing with "" (tokens then do not survive a restart, which is what development wants)."""
        if self.secret_key:
            return self.secret_key
        import secrets

        return secrets.token_urlsafe(48)
