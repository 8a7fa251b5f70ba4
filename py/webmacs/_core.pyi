"""Private Rust extension; use the `webmacs` package instead."""

from typing import Any, Final, final

__all__ = [
    "CELL_US",
    "DATAPOINT_COLUMNS",
    "MAX_FRAME_DATAPOINTS",
    "ConfigError",
    "CopyReader",
    "CoreException",
    "DatabaseError",
    "DatapointWriter",
    "Engine",
    "EngineClosedError",
    "FrameTooLargeError",
    "InvalidDataError",
    "InvalidFrameError",
    "LineBatch",
    "LineProtocolError",
    "ParquetExport",
    "QueueFullError",
    "Receipt",
    "WebmacsTransfer",
    "__version__",
    "cell_rows_in",
    "decode_datapoints",
    "downsample_avg",
    "downsample_lttb",
    "downsample_m4",
    "downsample_minmax",
    "downsample_stride",
    "inspect_jwt",
    "parse_lines",
    "series_from_candidates",
    "series_from_pg",
    "validate_frame",
]

__version__: str
#: The datapoints hypertable's columns and types in binary COPY order.
DATAPOINT_COLUMNS: Final[list[tuple[str, str]]]
MAX_FRAME_DATAPOINTS: Final[int]
#: Width of a datapoint cell (sql/0041_datapoint_cells.sql), µs.
CELL_US: Final[int]

class CoreException(Exception): ...

class InvalidFrameError(CoreException):
    #: "invalid_json" or "not_object".
    code: str

class FrameTooLargeError(CoreException):
    #: "too_many" (datapoints in the frame) or "too_large" (bytes).
    code: str
    count: int
    limit: int

class QueueFullError(CoreException):
    depth: int
    capacity: int
    #: The sender's own share of the queue was the limit (the queue as a whole had room).
    share: bool

class LineProtocolError(CoreException):
    #: The 1-based number of the line that does not parse; 0 when the body has too many points.
    line: int

class EngineClosedError(CoreException): ...
class DatabaseError(CoreException): ...
class ConfigError(CoreException): ...

class InvalidDataError(CoreException):
    code: str

def validate_frame(frame: bytes) -> tuple[list[tuple[str, float, int | None]], list[tuple[int, str]], int]: ...
def inspect_jwt(
    token: str, *, secret_key: str, algorithm: str = "HS256", now_s: float | None = None
) -> tuple[int, str | None, float, bool] | None: ...

@final
class Receipt:
    @property
    def accepted(self) -> int: ...
    @property
    def rejected(self) -> int: ...
    @property
    def total(self) -> int: ...
    @property
    def has_datapoints(self) -> bool: ...
    @property
    def seq(self) -> int | None: ...
    @property
    def ticket(self) -> int: ...
    @property
    def reasons(self) -> dict[str, int]: ...
    @property
    def rejects(self) -> list[tuple[int, str]]: ...
    def refused(self) -> list[tuple[int, str, str]]: ...

@final
class Engine:
    def __new__(
        cls,
        dsn: str,
        *,
        max_rows: int = 20000,
        max_bytes: int = 4194304,
        max_age_ms: int = 5,
        queue_capacity: int = 200000,
        max_frame_bytes: int = 4194304,
        reading_interval_s: float = 5.0,
        broadcast_interval_s: float = 0.2,
        writers: int = 2,
        source_share: float = 0.25,
        write_timeout_s: float = 30.0,
        fanout: str = "postgres",
        nats_url: str | None = None,
        nats_prefix: str = "webmacs",
        mqtt_url: str | None = None,
        mqtt_topics: list[str] | None = None,
        mqtt_token: str | None = None,
        mqtt_client_id: str | None = None,
        mqtt_shared: bool = True,
        mqtt_error_topic: str | None = None,
        mqtt_session_expiry_s: int = 604800,
        mqtt_receive_maximum: int = 1000,
    ) -> Engine: ...
    def submit(self, frame: bytes, strict: bool = False, source: int = 0, instance: int | None = None) -> Receipt: ...
    @property
    def mqtt_client_id(self) -> str | None: ...
    def drain_mqtt_log(self) -> list[str]: ...
    def submit_lines(
        self,
        batch: LineBatch,
        events: list[str | None],
        start: int,
        end: int,
        *,
        with_rejects: bool,
        source: int = 0,
        instance: int | None = None,
    ) -> Receipt: ...
    def serve_websockets(
        self,
        *,
        secret_key: str,
        algorithm: str = "HS256",
        listen: str | None = None,
        recheck_s: float = 2.0,
        outbox: int = 1024,
        subscriber_queue: int = 256,
        send_timeout_s: float = 30.0,
        max_connections: int = 10000,
    ) -> str | None: ...
    def adopt_websocket(self, fd: int, head: bytes) -> None: ...
    def websocket_stats(self) -> dict[str, int]: ...
    def stop_websockets_now(self) -> None: ...
    def commit_fd(self) -> int: ...
    def committed_ticket(self) -> int: ...
    def refresh_catalog(self) -> None: ...
    def latest(self) -> list[tuple[str, float, int, str | None]]: ...
    def reload_latest(self, event_public_ids: list[str] | None = None) -> None: ...
    def event_state(self, event_public_id: str) -> bool | None: ...
    def drain_firings(self) -> list[dict[str, Any]]: ...
    def stats(self) -> dict[str, Any]: ...
    def health(self) -> dict[str, Any]: ...
    def close(self, timeout_s: float = 30.0) -> int: ...

# Influx line protocol (`core-rs/src/py/lineproto.rs`): a parsed body whose points stay in Rust.
@final
class LineBatch:
    @property
    def series(self) -> list[str]: ...
    @property
    def points(self) -> int: ...
    @property
    def lines(self) -> int: ...
    @property
    def rejects(self) -> dict[str, int]: ...
    def series_counts(self) -> list[int]: ...

def parse_lines(body: bytes, precision: str = "ns", max_points: int = 1000000) -> LineBatch: ...

# Series downsamplers (`core-rs/src/py/downsample.rs`): times and values are big-endian int64 / float64
# buffers as PostgreSQL's binary send format gives them; selectors return the kept indices.
def downsample_stride(n: int, max_points: int) -> list[int]: ...
def downsample_lttb(times: bytes, values: bytes, max_points: int) -> list[int]: ...
def downsample_minmax(times: bytes, values: bytes, max_points: int) -> list[int]: ...
def downsample_m4(times: bytes, values: bytes, max_points: int) -> list[int]: ...
def downsample_avg(times: bytes, values: bytes, max_points: int) -> tuple[list[int], list[float]]: ...
def series_from_pg(
    times: bytes, values: bytes, experiments: bytes | None = None
) -> tuple[bytes, bytes, bytes | None]: ...
def cell_rows_in(packed: bytes, lo: int, hi: int) -> tuple[int, bytes, bytes]: ...
def series_from_candidates(
    mode: str, times: bytes, values: bytes, total: int, max_points: int
) -> tuple[bytes, bytes]: ...

# Binary COPY decoder (`core-rs/src/py/pgcopy.rs`): (time, event_id, value, experiment_id) tuples → native-endian
# column buffers: (rows, time_us, event_id, value, experiment_id, experiment_validity, experiment_nulls, finished).
def decode_datapoints(data: bytes, with_header: bool) -> tuple[int, bytes, bytes, bytes, bytes, bytes, int, bool]: ...

_Columns = tuple[int, bytes, bytes, bytes, bytes, bytes, int, bool]

@final
class CopyReader:
    def __new__(cls, dsn: str) -> CopyReader: ...
    def start(
        self,
        statement: str,
        max_rows: int,
        ties_by_event: bool = False,
        prefetch: str | None = None,
        sort: bool = False,
    ) -> None: ...
    def next_frame(self) -> _Columns | None: ...
    def close(self) -> None: ...

# A Parquet export encoded in Rust (`core-rs/src/parquet_export.rs`): COPY frames become row groups in memory.
@final
class ParquetExport:
    def __new__(
        cls,
        dsn: str,
        events: list[tuple[int, str, str, str | None]],
        experiments: list[tuple[int, str]],
        row_group_rows: int,
    ) -> ParquetExport: ...
    def start(
        self,
        statement: str,
        max_rows: int,
        ties_by_event: bool = False,
        prefetch: str | None = None,
        sort: bool = False,
    ) -> None: ...
    def next_chunk(self) -> bytes | None: ...
    def finish(self) -> bytes: ...
    @property
    def rows(self) -> int: ...
    def close(self) -> None: ...

# History import (`core-rs/src/py/import.rs`): WebMACS's datapoints streamed into the hypertable with a checkpoint
# per batch, and datapoints from files as native-endian column buffers (Arrow layout).
@final
class WebmacsTransfer:
    def __new__(
        cls,
        source_dsn: str,
        target_dsn: str,
        statement: str,
        *,
        run_id: int,
        events: dict[str, tuple[int, float, float]],
        experiments: dict[str, int],
        carry: list[tuple[int, int]],
        batch_rows: int = 50000,
        now_us: int | None = None,
    ) -> WebmacsTransfer: ...
    def run(self) -> dict[str, int]: ...
    def progress(self) -> tuple[int, int, int | None]: ...
    def cancel(self) -> None: ...

@final
class DatapointWriter:
    def __new__(cls, dsn: str) -> DatapointWriter: ...
    def write(
        self,
        time_us: bytes,
        event_id: bytes,
        value: bytes,
        experiment_id: bytes,
        experiment_validity: bytes | None = None,
        now_us: int | None = None,
    ) -> tuple[int, int, dict[str, int]]: ...
    def close(self) -> None: ...
