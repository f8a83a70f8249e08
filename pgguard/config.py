"""Typed configuration: one model, loaded from YAML with ``PGGUARD_…`` environment overrides.

Every problem (unknown key, bad value) is collected and reported at once, with its path.
Secrets come from environment variables or files named here, never from the command line.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> Any:
    """'30s', '5m', '1h', '250ms' or a number of seconds → float seconds."""
    if isinstance(value, bool):
        return value  # let pydantic reject it
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if not m:
            raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 5m, 1h)")
        return float(m.group(1)) * _UNITS[m.group(2)]
    return value


Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(6432, ge=0, le=65535)


class AdminSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(9187, ge=0, le=65535)


class TLSSettings(_Section):
    cert_file: Path | None = None
    key_file: Path | None = None
    allow_plaintext_loopback: bool = True


class UpstreamSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(5432, ge=1, le=65535)
    user: str = "pgguard"
    password_env: str | None = "PGGUARD_UPSTREAM_PASSWORD"
    password_file: Path | None = None
    sslmode: Literal["disable", "prefer", "require", "verify-full"] = "prefer"
    sslrootcert: Path | None = None
    databases: list[str] | None = None
    connect_timeout: Duration = 10.0

    def password(self) -> str | None:
        """The upstream password from its file or environment variable; None for trust."""
        if self.password_file is not None:
            return self.password_file.read_text().rstrip("\r\n")
        if self.password_env:
            return os.environ.get(self.password_env)
        return None


class IdentitySettings(_Section):
    algorithms: list[
        Literal[
            "HS256",
            "HS384",
            "HS512",
            "RS256",
            "RS384",
            "RS512",
            "ES256",
            "ES384",
            "ES512",
            "PS256",
            "PS384",
            "PS512",
        ]
    ] = ["HS256"]
    secret_env: str | None = "PGGUARD_JWT_SECRET"
    secret_file: Path | None = None
    public_key_file: Path | None = None
    jwks_file: Path | None = None
    jwks_url: str | None = None
    jwks_cache_ttl: Duration = 300.0
    issuer: str | None = None
    audience: str | None = None
    user_claim: str = "sub"
    groups_claim: str = "groups"
    max_ttl: Duration = 3600.0
    leeway: Duration = 30.0
    max_token_bytes: int = Field(8192, ge=64)
    end_session_on_expiry: bool = True
    role_map: dict[str, str] = Field(default_factory=dict)

    def secret(self) -> str | None:
        """The HS* signing secret from its file or environment variable."""
        if self.secret_file is not None:
            return self.secret_file.read_text().strip()
        if self.secret_env:
            return os.environ.get(self.secret_env)
        return None


class AuditSettings(_Section):
    url: str | None = "sqlite:///pgguard-audit.db"
    jsonl: str | None = None
    mode: Literal["strict", "buffered"] = "strict"
    instance_id: str | None = None  # default: host:port:worker; names this process's chain
    strict_timeout: Duration = 5.0  # strict mode: longest a result waits for its record
    queue_size: int = Field(10000, ge=1)  # records waiting to be written, at most
    max_param_bytes: int = Field(1024, ge=0)  # a longer Bind parameter is cut (and says so)
    redact_literals: bool = False  # statement texts keep no literal values
    redact_params: bool = False  # Bind parameters are recorded as ***
    # full: a commit is on stable storage before it counts (SQLite synchronous=FULL, fsync of
    # the JSON lines, PostgreSQL synchronous_commit=on); normal: handed to the OS / server,
    # which survives pgguard being killed but not a power cut (no fsync per commit).
    sync: Literal["full", "normal"] = "full"


class RecordingSettings(_Section):
    max_rows: int = Field(50, ge=0)
    max_bytes: int = Field(65536, ge=0)


class ApprovalSettings(_Section):
    timeout: Duration = 300.0
    webhook_url: str | None = None


class MaskingSettings(_Section):
    # HMAC key of the keyed masks (hash, pseudo, noise). Every replica needs the same one so
    # that masked values agree across them. Without one, keyed masks fall back to redact.
    secret_env: str | None = "PGGUARD_MASKING_SECRET"
    secret_file: Path | None = None

    def secret(self) -> bytes:
        if self.secret_file is not None:
            return self.secret_file.read_bytes().strip()
        if self.secret_env:
            return os.environ.get(self.secret_env, "").encode("utf-8")
        return b""


class LimitSettings(_Section):
    max_connections: int = Field(1000, ge=1)
    max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_startup_bytes: int = Field(10000, ge=64)
    auth_timeout: Duration = 10.0
    idle_timeout: Duration = 0.0
    drain_timeout: Duration = 30.0


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class Settings(BaseSettings):
    """The whole configuration (SPEC §9)."""

    model_config = SettingsConfigDict(
        env_prefix="PGGUARD_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    listen: ListenSettings = ListenSettings()
    admin: AdminSettings = AdminSettings()
    tls: TLSSettings = TLSSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    identity: IdentitySettings = IdentitySettings()
    policies: list[str] = ["policies/*.yaml"]
    audit: AuditSettings = AuditSettings()
    recording: RecordingSettings = RecordingSettings()
    approvals: ApprovalSettings = ApprovalSettings()
    masking: MaskingSettings = MaskingSettings()
    limits: LimitSettings = LimitSettings()
    log: LogSettings = LogSettings()
    workers: int = Field(1, ge=1, le=64)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file.
        return (env_settings, init_settings)


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` lists every one with its path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))

    def report(self) -> str:
        lines = [f"invalid configuration in {self.source}:"]
        lines.extend(f"  - {p}" for p in self.problems)
        return "\n".join(lines)


def default_config_path() -> Path:
    return Path(os.environ.get("PGGUARD_CONFIG", "pgguard.yaml"))


def load_settings(path: Path | None = None, *, require_file: bool = False) -> Settings:
    """Load ``path`` (YAML) with environment overrides; raise ConfigError listing all problems."""
    path = path if path is not None else default_config_path()
    data: Any = {}
    if path.exists():
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(str(path), [f"not valid YAML: {exc}"]) from exc
        if not isinstance(data, dict):
            raise ConfigError(str(path), ["top level must be a mapping"])
    elif require_file:
        raise ConfigError(str(path), ["file not found"])
    try:
        return Settings(**data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            problems.append(f"{loc}: {msg}")
        raise ConfigError(str(path), problems) from exc
