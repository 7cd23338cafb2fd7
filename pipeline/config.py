"""Runtime settings, from environment variables (the same names in docker
compose, the embedded `csi run` and tests). CLI flags override them.

Secrets (Kafka SASL password, TLS key password, ClickHouse password) come from the
environment or, with the ``*_FILE`` variant of their variable, from a file (what docker
and Kubernetes secrets mount). They are never written into a ``repr``, a log line or an
error message: :class:`Settings` and :class:`KafkaSecurity` print ``***`` in their place
and :func:`redact_url` masks the password of a URL. docs/security.md has the whole list.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

if TYPE_CHECKING:
    from faust.types.auth import CredentialsT

REDACTED: Final = "***"
"""What a secret is replaced with in reprs, logs and error messages."""

KAFKA_SECURITY_PROTOCOLS: Final = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
KAFKA_SASL_MECHANISMS: Final = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")

# Every variable name is written out once here (tests/test_deploy.py finds the settings by
# these literals and checks the compose worker gets each of them).
ENV_KAFKA_SECURITY_PROTOCOL: Final = "CSI_KAFKA_SECURITY_PROTOCOL"
ENV_KAFKA_SASL_MECHANISM: Final = "CSI_KAFKA_SASL_MECHANISM"
ENV_KAFKA_SASL_USERNAME: Final = "CSI_KAFKA_SASL_USERNAME"
ENV_KAFKA_SASL_PASSWORD: Final = "CSI_KAFKA_SASL_PASSWORD"
ENV_KAFKA_SASL_PASSWORD_FILE: Final = "CSI_KAFKA_SASL_PASSWORD_FILE"
ENV_KAFKA_SSL_CAFILE: Final = "CSI_KAFKA_SSL_CAFILE"
ENV_KAFKA_SSL_CERTFILE: Final = "CSI_KAFKA_SSL_CERTFILE"
ENV_KAFKA_SSL_KEYFILE: Final = "CSI_KAFKA_SSL_KEYFILE"
ENV_KAFKA_SSL_KEY_PASSWORD: Final = "CSI_KAFKA_SSL_KEY_PASSWORD"
ENV_KAFKA_SSL_KEY_PASSWORD_FILE: Final = "CSI_KAFKA_SSL_KEY_PASSWORD_FILE"
ENV_KAFKA_SSL_CHECK_HOSTNAME: Final = "CSI_KAFKA_SSL_CHECK_HOSTNAME"
ENV_WAREHOUSE_PASSWORD: Final = "CSI_WAREHOUSE_PASSWORD"
ENV_WAREHOUSE_PASSWORD_FILE: Final = "CSI_WAREHOUSE_PASSWORD_FILE"

_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})
_SECRET_QUERY_KEY: Final = re.compile(r"pass|secret|token|auth|key$|keypass", re.IGNORECASE)


class ConfigError(ValueError):
    """A setting is missing, malformed or contradicts another one.

    The message names the environment variable at fault and never holds a secret's value.
    A ValueError, so `csi` prints it as ``csi: <message>`` without a traceback.
    """


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def _redacted_repr(obj: object, secrets: Iterable[str], urls: Mapping[str, bool]) -> str:
    """``Class(field=value, ...)`` like a dataclass repr, with secret fields as ***.

    ``urls`` maps URL-valued fields to whether their path is kept (see redact_url).
    """
    secret = set(secrets)
    parts = []
    for item in fields(obj):  # type: ignore[arg-type]
        if not item.repr:
            continue
        value = getattr(obj, item.name)
        if item.name in secret and value:
            shown = REDACTED
        elif item.name in urls and isinstance(value, str):
            shown = repr(redact_url(value, keep_path=urls[item.name]))
        else:
            shown = repr(value)
        parts.append(f"{item.name}={shown}")
    return f"{type(obj).__name__}({', '.join(parts)})"


def redact_url(url: str, *, keep_path: bool = True) -> str:
    """``url`` fit for a log line: its password (and any query value named like a secret)
    replaced by ``***``; scheme, user, host, port and path kept.

    ``keep_path=False`` also masks the path and query, for URLs whose path is the secret
    (Slack-style webhooks). A string that does not parse as a URL is masked whole.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:{REDACTED}@{hostport}" if colon else netloc
    if not keep_path:
        path = "/" + REDACTED if parts.path.strip("/") or parts.query else parts.path
        return urlunsplit((parts.scheme, netloc, path, "", ""))
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, REDACTED if _SECRET_QUERY_KEY.search(k) and v else v) for k, v in pairs],
            safe="/:*",
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def read_secret(name: str, file_name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """A secret from the environment: ``$name``, or the contents of the file ``$file_name``.

    The file is what docker and Kubernetes secrets mount (``/run/secrets/...``); one
    trailing newline is dropped, nothing else. Empty variables count as unset. Setting
    both variables, a file that cannot be read and an empty file are ConfigErrors.
    """
    env = os.environ if environ is None else environ
    value = env.get(name) or None
    path = (env.get(file_name) or "").strip() or None
    if value is not None and path is not None:
        raise ConfigError(f"set {name} or {file_name}, not both")
    if path is None:
        return value
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"{file_name}={path}: cannot read the secret file ({exc.strerror or exc})"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{file_name}={path}: the secret file is not UTF-8 text") from None
    secret = text.removesuffix("\n").removesuffix("\r")
    if not secret:
        raise ConfigError(f"{file_name}={path}: the secret file is empty")
    return secret


def _parse_bool(name: str, raw: str | None, default: bool) -> bool:
    if raw is None:
        return default
    lowered = raw.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r}: expected true or false (1/0, yes/no)")


# ------------------------------------------------------------------------- log redaction

KAFKA_WIRE_LOGGERS: Final = (
    "kafka.protocol.parser",
    "kafka.net.connection",
    "kafka.admin.client",
    "aiokafka.conn",
)
"""Loggers of kafka-python and aiokafka that can print a password at DEBUG level: whole
requests, the SASL PLAIN authentication request (``\\x00user\\x00password``) included,
and KafkaAdminClient's configuration."""


class SecretRedactingFilter(logging.Filter):
    """Replaces registered secrets in log records with ``***``.

    A secret is looked for as text and as it appears inside a ``repr`` of bytes or str,
    which is how the Kafka clients' DEBUG lines show request payloads. Only records that
    are actually emitted pass through a filter, so it costs nothing at the usual levels.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._forms: tuple[str, ...] = ()

    def add(self, secret: str) -> None:
        forms = {secret, repr(secret)[1:-1], repr(secret.encode("utf-8"))[2:-1]}
        with self._lock:
            self._forms = tuple(
                sorted({*self._forms, *(form for form in forms if form)}, key=len, reverse=True)
            )

    def redact(self, text: str) -> str:
        for form in self._forms:
            text = text.replace(form, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if self._forms:
            message = record.getMessage()
            redacted = self.redact(message)
            if redacted != message:
                record.msg, record.args = redacted, None
        return True


SECRET_LOG_FILTER: Final = SecretRedactingFilter()
"""The filter on :data:`KAFKA_WIRE_LOGGERS`; :func:`protect_secrets_in_logs` feeds it."""


def protect_secrets_in_logs(*secrets: str | None) -> None:
    """Mask these secrets in the Kafka clients' DEBUG output (see :data:`KAFKA_WIRE_LOGGERS`).

    Called for the SASL and key passwords whenever a Kafka client is configured
    (:meth:`KafkaSecurity.client_config`, :meth:`KafkaSecurity.faust_credentials`).
    """
    for secret in secrets:
        if secret:
            SECRET_LOG_FILTER.add(secret)
    for name in KAFKA_WIRE_LOGGERS:
        logger = logging.getLogger(name)
        if SECRET_LOG_FILTER not in logger.filters:
            logger.addFilter(SECRET_LOG_FILTER)


# ------------------------------------------------------------------------- Kafka security


@dataclass(frozen=True, repr=False)
class KafkaSecurity:
    """How every Kafka client of the pipeline authenticates and encrypts.

    One value configures the Faust worker (:func:`faust_broker_credentials`) and every
    kafka-python producer, consumer and admin client (:func:`kafka_client_config`), so
    they cannot disagree. :meth:`from_env` reads the variables named below; the
    constructor validates the combination and raises :class:`ConfigError`.
    """

    protocol: str = "PLAINTEXT"
    """``CSI_KAFKA_SECURITY_PROTOCOL``: PLAINTEXT (default), SSL, SASL_PLAINTEXT or SASL_SSL.
    SASL_PLAINTEXT authenticates but does not encrypt; with PLAIN it sends the password
    in clear text, so use it only on a trusted network."""
    sasl_mechanism: str | None = None
    """``CSI_KAFKA_SASL_MECHANISM``: PLAIN (default with SASL), SCRAM-SHA-256 or SCRAM-SHA-512."""
    sasl_username: str | None = None
    """``CSI_KAFKA_SASL_USERNAME``: required with SASL_PLAINTEXT and SASL_SSL."""
    sasl_password: str | None = None
    """``CSI_KAFKA_SASL_PASSWORD`` or ``CSI_KAFKA_SASL_PASSWORD_FILE`` (a file holding it):
    required with SASL. Never printed."""
    ssl_cafile: str | None = None
    """``CSI_KAFKA_SSL_CAFILE``: PEM file of the CA(s) that signed the brokers' certificates;
    unset: the system's trusted CAs. SSL and SASL_SSL only."""
    ssl_certfile: str | None = None
    """``CSI_KAFKA_SSL_CERTFILE``: client certificate (PEM) for mutual TLS; may hold the key too."""
    ssl_keyfile: str | None = None
    """``CSI_KAFKA_SSL_KEYFILE``: the client certificate's private key (PEM), if not in the
    certificate file."""
    ssl_key_password: str | None = None
    """``CSI_KAFKA_SSL_KEY_PASSWORD`` or ``CSI_KAFKA_SSL_KEY_PASSWORD_FILE``: the password
    of an encrypted private key. Never printed."""
    ssl_check_hostname: bool = True
    """``CSI_KAFKA_SSL_CHECK_HOSTNAME``: check that the broker's certificate names the host
    connected to (default true). The certificate chain is verified either way."""

    def __post_init__(self) -> None:
        if self.protocol not in KAFKA_SECURITY_PROTOCOLS:
            raise ConfigError(
                f"{ENV_KAFKA_SECURITY_PROTOCOL}={self.protocol!r} is not one of "
                + ", ".join(KAFKA_SECURITY_PROTOCOLS)
            )
        if self.uses_sasl:
            if self.mechanism not in KAFKA_SASL_MECHANISMS:
                raise ConfigError(
                    f"{ENV_KAFKA_SASL_MECHANISM}={self.sasl_mechanism!r} is not supported; "
                    "use one of " + ", ".join(KAFKA_SASL_MECHANISMS)
                )
            if not self.sasl_username:
                raise ConfigError(
                    f"{ENV_KAFKA_SECURITY_PROTOCOL}={self.protocol} needs {ENV_KAFKA_SASL_USERNAME}"
                )
            if not self.sasl_password:
                raise ConfigError(
                    f"{ENV_KAFKA_SECURITY_PROTOCOL}={self.protocol} needs "
                    f"{ENV_KAFKA_SASL_PASSWORD} or {ENV_KAFKA_SASL_PASSWORD_FILE}"
                )
        else:
            stray = [
                name
                for name, value in (
                    (ENV_KAFKA_SASL_MECHANISM, self.sasl_mechanism),
                    (ENV_KAFKA_SASL_USERNAME, self.sasl_username),
                    (ENV_KAFKA_SASL_PASSWORD, self.sasl_password),
                )
                if value
            ]
            if stray:
                # Refuse rather than connect without the authentication the operator asked for.
                raise ConfigError(
                    f"{', '.join(stray)} set, but {ENV_KAFKA_SECURITY_PROTOCOL}="
                    f"{self.protocol} does not use SASL (use SASL_SSL or SASL_PLAINTEXT)"
                )
        tls_files = (
            (ENV_KAFKA_SSL_CAFILE, self.ssl_cafile),
            (ENV_KAFKA_SSL_CERTFILE, self.ssl_certfile),
            (ENV_KAFKA_SSL_KEYFILE, self.ssl_keyfile),
        )
        if not self.uses_ssl:
            stray = [name for name, value in tls_files if value]
            if self.ssl_key_password:
                stray.append(ENV_KAFKA_SSL_KEY_PASSWORD)
            if stray:
                raise ConfigError(
                    f"{', '.join(stray)} set, but {ENV_KAFKA_SECURITY_PROTOCOL}="
                    f"{self.protocol} does not use TLS (use SSL or SASL_SSL)"
                )
            return
        if (self.ssl_keyfile or self.ssl_key_password) and not self.ssl_certfile:
            raise ConfigError(
                f"{ENV_KAFKA_SSL_KEYFILE} and {ENV_KAFKA_SSL_KEY_PASSWORD} belong to a client "
                f"certificate: set {ENV_KAFKA_SSL_CERTFILE} too"
            )
        for name, value in tls_files:
            if value and not Path(value).is_file():
                raise ConfigError(f"{name}={value}: no such file")

    def __repr__(self) -> str:
        return _redacted_repr(self, ("sasl_password", "ssl_key_password"), {})

    @property
    def uses_sasl(self) -> bool:
        return self.protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    @property
    def uses_ssl(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @property
    def mechanism(self) -> str | None:
        """The SASL mechanism in effect (PLAIN unless set); None without SASL."""
        return (self.sasl_mechanism or "PLAIN") if self.uses_sasl else None

    def client_config(self) -> dict[str, Any]:
        """kafka-python keyword arguments (:func:`kafka_client_config`); also masks the
        passwords in the Kafka clients' DEBUG logs (:func:`protect_secrets_in_logs`)."""
        protect_secrets_in_logs(self.sasl_password, self.ssl_key_password)
        return kafka_client_config(self)

    def faust_credentials(self) -> CredentialsT | None:
        """``faust.App(broker_credentials=...)`` (:func:`faust_broker_credentials`); also
        masks the passwords in the Kafka clients' DEBUG logs."""
        protect_secrets_in_logs(self.sasl_password, self.ssl_key_password)
        return faust_broker_credentials(self)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KafkaSecurity:
        """Read the ``CSI_KAFKA_*`` variables (see the fields); ConfigError if they clash.

        Protocol and mechanism are case-insensitive; empty variables count as unset.
        """
        env = os.environ if environ is None else environ

        def text(name: str) -> str | None:
            return (env.get(name) or "").strip() or None

        protocol = text(ENV_KAFKA_SECURITY_PROTOCOL)
        mechanism = text(ENV_KAFKA_SASL_MECHANISM)
        return cls(
            protocol=protocol.upper() if protocol else "PLAINTEXT",
            sasl_mechanism=mechanism.upper() if mechanism else None,
            sasl_username=text(ENV_KAFKA_SASL_USERNAME),
            sasl_password=read_secret(ENV_KAFKA_SASL_PASSWORD, ENV_KAFKA_SASL_PASSWORD_FILE, env),
            ssl_cafile=text(ENV_KAFKA_SSL_CAFILE),
            ssl_certfile=text(ENV_KAFKA_SSL_CERTFILE),
            ssl_keyfile=text(ENV_KAFKA_SSL_KEYFILE),
            ssl_key_password=read_secret(
                ENV_KAFKA_SSL_KEY_PASSWORD, ENV_KAFKA_SSL_KEY_PASSWORD_FILE, env
            ),
            ssl_check_hostname=_parse_bool(
                ENV_KAFKA_SSL_CHECK_HOSTNAME, text(ENV_KAFKA_SSL_CHECK_HOSTNAME), True
            ),
        )


def kafka_client_config(security: KafkaSecurity) -> dict[str, Any]:
    """Keyword arguments for kafka-python's KafkaProducer, KafkaConsumer and KafkaAdminClient.

    PLAINTEXT gives ``{"security_protocol": "PLAINTEXT"}`` (kafka-python's default), so
    the result can always be splatted into a client's arguments.
    """
    config: dict[str, Any] = {"security_protocol": security.protocol}
    if security.uses_sasl:
        # kafka-python takes the SCRAM credentials in the sasl_plain_* arguments too.
        config["sasl_mechanism"] = security.mechanism
        config["sasl_plain_username"] = security.sasl_username
        config["sasl_plain_password"] = security.sasl_password
    if security.uses_ssl:
        config["ssl_check_hostname"] = security.ssl_check_hostname
        optional = {
            "ssl_cafile": security.ssl_cafile,
            "ssl_certfile": security.ssl_certfile,
            "ssl_keyfile": security.ssl_keyfile,
            "ssl_password": security.ssl_key_password,
        }
        config.update({key: value for key, value in optional.items() if value})
    return config


def kafka_ssl_context(security: KafkaSecurity) -> ssl.SSLContext:
    """The client TLS context for ``security`` (CA file or system CAs, client certificate).

    Verifies the broker's certificate chain always and its host name unless
    ``ssl_check_hostname`` is off, like kafka-python does with the same settings.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=security.ssl_cafile)
    context.check_hostname = security.ssl_check_hostname
    if security.ssl_certfile:
        try:
            context.load_cert_chain(
                security.ssl_certfile,
                keyfile=security.ssl_keyfile,
                password=security.ssl_key_password,
            )
        except ssl.SSLError as exc:
            raise ConfigError(
                f"cannot load the client certificate {ENV_KAFKA_SSL_CERTFILE}="
                f"{security.ssl_certfile} (key {security.ssl_keyfile or 'in the same file'}): "
                f"{exc.reason or exc} (a wrong {ENV_KAFKA_SSL_KEY_PASSWORD} looks like this too)"
            ) from None
    return context


def faust_broker_credentials(security: KafkaSecurity) -> CredentialsT | None:
    """``broker_credentials`` for ``faust.App``: None for PLAINTEXT (Faust's default),
    ``SSLCredentials`` for SSL, ``SASLCredentials`` for SASL_PLAINTEXT and SASL_SSL (with
    the TLS context for the latter). Faust hands them to every aiokafka client it makes."""
    if security.protocol == "PLAINTEXT":
        return None
    from faust.auth import SASLCredentials, SSLCredentials

    context = kafka_ssl_context(security) if security.uses_ssl else None
    if not security.uses_sasl:
        return SSLCredentials(context)
    credentials: CredentialsT = SASLCredentials(
        username=security.sasl_username,
        password=security.sasl_password,
        ssl_context=context,
        mechanism=security.mechanism,
    )
    return credentials


def warehouse_password_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """``CSI_WAREHOUSE_PASSWORD`` or the contents of ``CSI_WAREHOUSE_PASSWORD_FILE``."""
    return read_secret(ENV_WAREHOUSE_PASSWORD, ENV_WAREHOUSE_PASSWORD_FILE, environ)


# ------------------------------------------------------------------------------- settings


@dataclass(frozen=True, repr=False)
class Settings:
    bootstrap: str = field(default_factory=lambda: _env("CSI_BOOTSTRAP", "127.0.0.1:9092"))
    """Kafka bootstrap servers, host:port[,host:port]."""
    warehouse: str = field(default_factory=lambda: _env("CSI_WAREHOUSE", "chdb://.csi/warehouse"))
    """`chdb://PATH` (embedded) or
    `clickhouse://[user[:pw]@]host[:port]/db[?secure=1&verify=1&ca_certs=PATH]` (a
    ClickHouse server; `pipeline.warehouse.parse_clickhouse_url`). Printed with its
    password masked."""
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
    """Where alerts and case changes are POSTed (Slack-compatible JSON); unset: no webhook.
    Printed as scheme://host/*** (a Slack webhook's path is its secret)."""
    api_keys: Path | None = field(
        default_factory=lambda: Path(p) if (p := os.environ.get("CSI_API_KEYS")) else None
    )
    """Hashed dealer API keys for `csi serve-http` (`csi keys add` writes them)."""
    webhook_auth: str | None = field(default_factory=lambda: os.environ.get("CSI_WEBHOOK_AUTH"))
    """Authorization header value for the webhook, if it needs one (never logged)."""
    instance_id: str | None = field(default_factory=lambda: os.environ.get("CSI_INSTANCE_ID"))
    """A stable name for this worker in its consumer group (Kafka static
    membership): a worker restarted under the same name takes its partitions
    back at once instead of waiting for the group to expire the dead member.
    Unset: dynamic membership."""

    warehouse_password: str | None = field(default_factory=warehouse_password_from_env)
    """`CSI_WAREHOUSE_PASSWORD`, or the contents of the file `CSI_WAREHOUSE_PASSWORD_FILE`:
    the ClickHouse password for a `clickhouse://` URL that carries none, so it need not be
    in the URL (a different password in the URL is an error). Never printed."""
    kafka: KafkaSecurity = field(default_factory=KafkaSecurity.from_env)
    """Kafka authentication and TLS, from `CSI_KAFKA_SECURITY_PROTOCOL`,
    `CSI_KAFKA_SASL_MECHANISM`, `CSI_KAFKA_SASL_USERNAME`, `CSI_KAFKA_SASL_PASSWORD`
    (`_FILE`), `CSI_KAFKA_SSL_CAFILE`, `CSI_KAFKA_SSL_CERTFILE`, `CSI_KAFKA_SSL_KEYFILE`,
    `CSI_KAFKA_SSL_KEY_PASSWORD` (`_FILE`) and `CSI_KAFKA_SSL_CHECK_HOSTNAME`; see
    :class:`KafkaSecurity`. Default: PLAINTEXT, no authentication."""

    def __repr__(self) -> str:
        return _redacted_repr(
            self,
            ("warehouse_password", "webhook_auth"),
            {"warehouse": True, "webhook_url": False},
        )
