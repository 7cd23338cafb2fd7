"""Runtime settings, from environment variables (the same names in docker
compose, the embedded `csi run` and tests). CLI flags override them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


@dataclass(frozen=True)
class Settings:
    bootstrap: str = field(default_factory=lambda: _env("CSI_BOOTSTRAP", "127.0.0.1:9092"))
    """Kafka bootstrap servers, host:port[,host:port]."""
    warehouse: str = field(default_factory=lambda: _env("CSI_WAREHOUSE", "chdb://.csi/warehouse"))
    """`chdb://PATH` (embedded) or `clickhouse://[user[:pw]@]host:port/db`."""
    data_dir: Path = field(default_factory=lambda: Path(_env("CSI_DATA_DIR", ".csi")))
    """Local state: embedded broker data, Faust table state, logs."""
    app_id: str = field(default_factory=lambda: _env("CSI_APP_ID", "csi-worker"))
    """Faust application id: the consumer group and the changelog topic prefix."""
    batch_max: int = field(default_factory=lambda: int(_env("CSI_BATCH_MAX", "2000")))
    """Most events the worker takes per batch."""
    batch_within_s: float = field(default_factory=lambda: float(_env("CSI_BATCH_WITHIN", "0.5")))
    """Longest wait to fill a batch, seconds."""
    sink_max_rows: int = field(default_factory=lambda: int(_env("CSI_SINK_MAX_ROWS", "1000")))
    sink_max_age_s: float = field(default_factory=lambda: float(_env("CSI_SINK_MAX_AGE", "1.0")))
    session_timeout_s: float = field(
        default_factory=lambda: float(_env("CSI_SESSION_TIMEOUT", "10"))
    )
    """Consumer-group session timeout: how long a dead worker holds its
    partitions before the group moves them (Faust's default is 60 s)."""
    registry: Path | None = field(
        default_factory=lambda: Path(p) if (p := os.environ.get("CSI_REGISTRY")) else None
    )
    """Dealer registry CSV (dealer_id,name,region,brand,group). With one, an
    event of an unlisted dealer is a dead letter; without, region and brand
    are 'unknown'."""
    lateness_days: int = field(default_factory=lambda: int(_env("CSI_LATENESS_DAYS", "35")))
    """How far behind its dealer's newest event an event may arrive and still count."""
    fetch_hold_ms: int = field(default_factory=lambda: int(_env("CSI_FETCH_HOLD_MS", "0")))
    """Client-side wait after an empty fetch, for brokers that do not hold one
    (the embedded noida-db); 0 for Kafka/Redpanda, which wait themselves."""
    log_level: str = field(default_factory=lambda: _env("CSI_LOG_LEVEL", "warning"))
    snapshot_interval_s: float = field(
        default_factory=lambda: float(_env("CSI_SNAPSHOT_INTERVAL", "1.0"))
    )
    """Seconds between re-emissions of the changed windows' snapshots (coalesced
    across batches; stretched under load so snapshots take at most a quarter
    of the time). 0: after every batch."""
    alerts_file: Path | None = field(
        default_factory=lambda: Path(p) if (p := os.environ.get("CSI_ALERTS")) else None
    )
    """TOML file overriding alert defaults (`pipeline.alerts.AlertSettings`)."""
    webhook_url: str | None = field(default_factory=lambda: os.environ.get("CSI_WEBHOOK_URL"))
    """Where alerts and case changes are POSTed (Slack-compatible JSON); unset: no webhook."""
    api_keys: Path | None = field(
        default_factory=lambda: Path(p) if (p := os.environ.get("CSI_API_KEYS")) else None
    )
    """Hashed dealer API keys for `csi serve-http` (`csi keys add` writes them)."""
    webhook_auth: str | None = field(default_factory=lambda: os.environ.get("CSI_WEBHOOK_AUTH"))
    """Authorization header value for the webhook, if it needs one (never logged)."""
