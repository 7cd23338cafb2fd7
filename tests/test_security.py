"""Security and privacy of the configuration (docs/security.md).

* Kafka: ``CSI_KAFKA_*`` -> :class:`KafkaSecurity` -> kafka-python keyword arguments and
  Faust ``broker_credentials``, for every protocol and mechanism; secrets from files;
  clear errors for wrong combinations. A real TLS handshake (mutual, with a CA made here
  by openssl) from kafka-python, from :class:`EventProducer` and from aiokafka with the
  Faust credentials, against a small TLS server standing in for a broker.
* Redaction: no password in a repr, a log line or an error message (Settings, URLs,
  KafkaSecurity, the Kafka clients' DEBUG wire logs).
* ClickHouse: Debian's clickhouse-server with deploy/clickhouse/users.d/csi-users.xml
  (passwords from the server's environment, like compose does) and a TLS port: the writer
  writes, the Grafana user only reads, a wrong password is a clear error without the
  password in it, the password may come from CSI_WAREHOUSE_PASSWORD(_FILE), and
  ``?secure=1&ca_certs=...`` connects over TLS and verifies the certificate.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import (
    KAFKA_SASL_MECHANISMS,
    KAFKA_WIRE_LOGGERS,
    REDACTED,
    ConfigError,
    KafkaSecurity,
    Settings,
    faust_broker_credentials,
    kafka_client_config,
    kafka_ssl_context,
    protect_secrets_in_logs,
    read_secret,
    redact_url,
    warehouse_password_from_env,
)
from pipeline.warehouse import (
    CLICKHOUSE_SECURE_PORT,
    WarehouseError,
    open_warehouse,
    parse_clickhouse_url,
)
from tests.clickhouse_server import (
    LOOPBACK,
    ClickHouseEndpoint,
    _answers,
    _config_xml,
    free_loopback_port,
    require_clickhouse_server,
)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY_USERS_XML = ROOT / "deploy" / "clickhouse" / "users.d" / "csi-users.xml"

SASL_PASSWORD = "kafka-Pa55:w0rd/x"
KEY_PASSWORD = "key-Pa55-phrase"
WRITER_PASSWORD = "writer-S3cret.pw"
READER_PASSWORD = "reader-S3cret.pw"
WRONG_PASSWORD = "not-the-Right-one"
ALL_SECRETS = (SASL_PASSWORD, KEY_PASSWORD, WRITER_PASSWORD, READER_PASSWORD, WRONG_PASSWORD)

SECURITY_VARIABLES = (
    "CSI_KAFKA_SECURITY_PROTOCOL",
    "CSI_KAFKA_SASL_MECHANISM",
    "CSI_KAFKA_SASL_USERNAME",
    "CSI_KAFKA_SASL_PASSWORD",
    "CSI_KAFKA_SASL_PASSWORD_FILE",
    "CSI_KAFKA_SSL_CAFILE",
    "CSI_KAFKA_SSL_CERTFILE",
    "CSI_KAFKA_SSL_KEYFILE",
    "CSI_KAFKA_SSL_KEY_PASSWORD",
    "CSI_KAFKA_SSL_KEY_PASSWORD_FILE",
    "CSI_KAFKA_SSL_CHECK_HOSTNAME",
    "CSI_WAREHOUSE_PASSWORD",
    "CSI_WAREHOUSE_PASSWORD_FILE",
    "CSI_WAREHOUSE",
    "CSI_WEBHOOK_URL",
    "CSI_WEBHOOK_AUTH",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No security setting of the machine running the tests leaks into them."""
    for name in SECURITY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in ALL_SECRETS:
            assert secret not in text, f"a password leaked into: {text[:300]!r}"


def full_error_text(error: BaseException) -> str:
    """Everything Python prints for an exception: message, repr, chained causes, traceback."""
    return "".join(traceback.format_exception(error)) + repr(error)


# ------------------------------------------------------------------------ certificates


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    client_key_encrypted: Path
    """client_key encrypted with KEY_PASSWORD."""
    other_ca: Path
    """A CA that signed nothing here: trusting only it must fail."""


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(directory: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip


def _make_signed(directory: Path, name: str, common_name: str, extensions: str | None) -> None:
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={common_name}",
        cwd=directory,
    )  # fmt: skip
    extra: list[str] = []
    if extensions is not None:
        (directory / f"{name}.ext").write_text(extensions)
        extra = ["-extfile", f"{name}.ext"]
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", *extra,
        cwd=directory,
    )  # fmt: skip


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make test certificates")
    directory = tmp_path_factory.mktemp("certificates")
    _make_ca(directory, "ca")
    _make_ca(directory, "other-ca")
    _make_signed(directory, "server", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _make_signed(directory, "client", "csi-worker", None)
    _openssl(
        "pkey", "-in", "client.key", "-aes256", "-passout", f"pass:{KEY_PASSWORD}",
        "-out", "client-encrypted.key",
        cwd=directory,
    )  # fmt: skip
    for key in directory.glob("*.key"):
        key.chmod(0o644)  # clickhouse-server runs as this user and reads it
    return Certificates(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        client_key_encrypted=directory / "client-encrypted.key",
        other_ca=directory / "other-ca.pem",
    )


# -------------------------------------------------------------- Kafka: settings -> clients


def test_default_is_plaintext_without_credentials() -> None:
    security = KafkaSecurity.from_env({})
    assert security == KafkaSecurity()
    assert kafka_client_config(security) == {"security_protocol": "PLAINTEXT"}
    assert faust_broker_credentials(security) is None
    assert Settings().kafka == security


@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "SASL_SSL"])
@pytest.mark.parametrize("mechanism", KAFKA_SASL_MECHANISMS)
def test_sasl_maps_to_kafka_python_and_faust(
    protocol: str, mechanism: str, certificates: Certificates
) -> None:
    from faust.auth import SASLCredentials
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    env = {
        "CSI_KAFKA_SECURITY_PROTOCOL": protocol.lower(),  # case does not matter
        "CSI_KAFKA_SASL_MECHANISM": mechanism.lower(),
        "CSI_KAFKA_SASL_USERNAME": "csi-worker",
        "CSI_KAFKA_SASL_PASSWORD": SASL_PASSWORD,
    }
    if protocol == "SASL_SSL":
        env["CSI_KAFKA_SSL_CAFILE"] = str(certificates.ca)
    security = KafkaSecurity.from_env(env)
    assert (security.protocol, security.mechanism) == (protocol, mechanism)

    expected: dict[str, Any] = {
        "security_protocol": protocol,
        "sasl_mechanism": mechanism,
        "sasl_plain_username": "csi-worker",
        "sasl_plain_password": SASL_PASSWORD,
    }
    if protocol == "SASL_SSL":
        expected |= {"ssl_check_hostname": True, "ssl_cafile": str(certificates.ca)}
    assert kafka_client_config(security) == expected

    credentials = faust_broker_credentials(security)
    assert isinstance(credentials, SASLCredentials)
    assert (credentials.protocol.value, credentials.mechanism.value) == (protocol, mechanism)
    assert (credentials.username, credentials.password) == ("csi-worker", SASL_PASSWORD)
    # what Faust then gives aiokafka
    auth = credentials_to_aiokafka_auth(credentials)
    assert auth["security_protocol"] == protocol and auth["sasl_mechanism"] == mechanism
    assert auth["sasl_plain_password"] == SASL_PASSWORD
    if protocol == "SASL_SSL":
        context = auth["ssl_context"]
        assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED
    else:
        assert auth["ssl_context"] is None
    assert_no_secret(repr(security), repr(credentials), str(security))


def test_sasl_mechanism_defaults_to_plain() -> None:
    security = KafkaSecurity.from_env(
        {
            "CSI_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "CSI_KAFKA_SASL_USERNAME": "u",
            "CSI_KAFKA_SASL_PASSWORD": SASL_PASSWORD,
        }
    )
    assert security.mechanism == "PLAIN"
    assert kafka_client_config(security)["sasl_mechanism"] == "PLAIN"


def test_ssl_with_client_certificate_maps_to_both_clients(certificates: Certificates) -> None:
    from faust.auth import SSLCredentials
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    security = KafkaSecurity.from_env(
        {
            "CSI_KAFKA_SECURITY_PROTOCOL": "SSL",
            "CSI_KAFKA_SSL_CAFILE": str(certificates.ca),
            "CSI_KAFKA_SSL_CERTFILE": str(certificates.client_cert),
            "CSI_KAFKA_SSL_KEYFILE": str(certificates.client_key_encrypted),
            "CSI_KAFKA_SSL_KEY_PASSWORD": KEY_PASSWORD,
            "CSI_KAFKA_SSL_CHECK_HOSTNAME": "false",
        }
    )
    assert kafka_client_config(security) == {
        "security_protocol": "SSL",
        "ssl_check_hostname": False,
        "ssl_cafile": str(certificates.ca),
        "ssl_certfile": str(certificates.client_cert),
        "ssl_keyfile": str(certificates.client_key_encrypted),
        "ssl_password": KEY_PASSWORD,
    }
    credentials = faust_broker_credentials(security)
    assert isinstance(credentials, SSLCredentials)
    assert credentials.protocol.value == "SSL"
    context = credentials.context
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname is False
    assert credentials_to_aiokafka_auth(credentials) == {
        "security_protocol": "SSL",
        "ssl_context": context,
    }
    assert_no_secret(repr(security), repr(credentials))


def test_ssl_without_a_ca_file_trusts_the_system_cas() -> None:
    security = KafkaSecurity(protocol="SSL")
    assert kafka_client_config(security) == {
        "security_protocol": "SSL",
        "ssl_check_hostname": True,
    }
    context = kafka_ssl_context(security)
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED


def test_wrong_key_password_is_a_clear_error_without_the_password(
    certificates: Certificates,
) -> None:
    security = KafkaSecurity(
        protocol="SSL",
        ssl_certfile=str(certificates.client_cert),
        ssl_keyfile=str(certificates.client_key_encrypted),
        ssl_key_password=WRONG_PASSWORD,
    )
    with pytest.raises(ConfigError, match="cannot load the client certificate") as caught:
        faust_broker_credentials(security)
    assert_no_secret(full_error_text(caught.value))


def test_every_key_is_a_kafka_python_client_argument(certificates: Certificates) -> None:
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.admin import KafkaAdminClient

    security = KafkaSecurity(
        protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="u",
        sasl_password=SASL_PASSWORD,
        ssl_cafile=str(certificates.ca),
        ssl_certfile=str(certificates.client_cert),
        ssl_keyfile=str(certificates.client_key_encrypted),
        ssl_key_password=KEY_PASSWORD,
    )
    keys = set(kafka_client_config(security))
    for client in (KafkaProducer, KafkaConsumer, KafkaAdminClient):
        unknown = keys - set(client.DEFAULT_CONFIG)
        assert not unknown, f"{client.__name__} does not take {unknown}"


def test_the_worker_hands_the_credentials_to_faust(
    certificates: Certificates, tmp_path: Path
) -> None:
    from faust.auth import SASLCredentials

    from pipeline.catalogue import load_catalogue
    from pipeline.warehouse import SinkSet
    from pipeline.worker import make_app

    class NoWarehouse:
        def execute(self, sql: str) -> None: ...

        def query(self, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
            return [], []

        def insert(self, table: str, columns: Sequence[str], rows: Any) -> None: ...

        def close(self) -> None: ...

    security = KafkaSecurity(
        protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-256",
        sasl_username="csi-worker",
        sasl_password=SASL_PASSWORD,
        ssl_cafile=str(certificates.ca),
    )
    settings = Settings(kafka=security, data_dir=tmp_path)
    app = make_app(settings, load_catalogue(), SinkSet(NoWarehouse()))
    credentials = app.conf.broker_credentials
    assert isinstance(credentials, SASLCredentials)
    assert credentials.protocol.value == "SASL_SSL"
    assert credentials.mechanism.value == "SCRAM-SHA-256"
    assert credentials.ssl_context is not None
    plain_settings = Settings(kafka=KafkaSecurity(), data_dir=tmp_path)
    plain = make_app(plain_settings, load_catalogue(), SinkSet(NoWarehouse()))
    assert plain.conf.broker_credentials is None


# --------------------------------------------------------------- Kafka: secrets in files


def test_password_from_a_secret_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "kafka-password"
    secret_file.write_text(SASL_PASSWORD + "\n")  # as `echo pw > file` writes it
    security = KafkaSecurity.from_env(
        {
            "CSI_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "CSI_KAFKA_SASL_USERNAME": "csi",
            "CSI_KAFKA_SASL_PASSWORD_FILE": str(secret_file),
        }
    )
    assert security.sasl_password == SASL_PASSWORD
    # only one trailing newline goes: the rest is the secret
    secret_file.write_text(" spaced \n\n")
    assert read_secret("X", "X_FILE", {"X_FILE": str(secret_file)}) == " spaced \n"
    assert read_secret("X", "X_FILE", {"X": "direct"}) == "direct"
    assert read_secret("X", "X_FILE", {"X": "", "X_FILE": ""}) is None


def test_key_and_warehouse_passwords_from_secret_files(tmp_path: Path) -> None:
    (tmp_path / "key-password").write_text(KEY_PASSWORD)
    (tmp_path / "warehouse-password").write_text(WRITER_PASSWORD + "\r\n")
    assert (
        read_secret(
            "CSI_KAFKA_SSL_KEY_PASSWORD",
            "CSI_KAFKA_SSL_KEY_PASSWORD_FILE",
            {"CSI_KAFKA_SSL_KEY_PASSWORD_FILE": str(tmp_path / "key-password")},
        )
        == KEY_PASSWORD
    )
    env = {"CSI_WAREHOUSE_PASSWORD_FILE": str(tmp_path / "warehouse-password")}
    assert warehouse_password_from_env(env) == WRITER_PASSWORD


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("both", "set CSI_KAFKA_SASL_PASSWORD or CSI_KAFKA_SASL_PASSWORD_FILE, not both"),
        ("missing", r"CSI_KAFKA_SASL_PASSWORD_FILE=.*nope: cannot read the secret file"),
        ("empty", "the secret file is empty"),
        ("directory", "cannot read the secret file"),
    ],
)
def test_secret_file_problems_are_clear(tmp_path: Path, setup: str, message: str) -> None:
    env = {
        "CSI_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "CSI_KAFKA_SASL_USERNAME": "u",
    }
    if setup == "both":
        (tmp_path / "pw").write_text(SASL_PASSWORD)
        env |= {
            "CSI_KAFKA_SASL_PASSWORD": SASL_PASSWORD,
            "CSI_KAFKA_SASL_PASSWORD_FILE": str(tmp_path / "pw"),
        }
    elif setup == "missing":
        env["CSI_KAFKA_SASL_PASSWORD_FILE"] = str(tmp_path / "nope")
    elif setup == "empty":
        (tmp_path / "pw").write_text("\n")
        env["CSI_KAFKA_SASL_PASSWORD_FILE"] = str(tmp_path / "pw")
    else:
        env["CSI_KAFKA_SASL_PASSWORD_FILE"] = str(tmp_path)
    with pytest.raises(ConfigError, match=message) as caught:
        KafkaSecurity.from_env(env)
    assert_no_secret(full_error_text(caught.value))


# ----------------------------------------------------------------- Kafka: wrong settings


def _write(path: Path) -> str:
    path.write_text("-----BEGIN CERTIFICATE-----\n")
    return str(path)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"CSI_KAFKA_SECURITY_PROTOCOL": "TLS"},
            "CSI_KAFKA_SECURITY_PROTOCOL='TLS' is not one of PLAINTEXT, SSL, SASL_PLAINTEXT, "
            "SASL_SSL",
        ),
        (
            {
                "CSI_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                "CSI_KAFKA_SASL_PASSWORD": SASL_PASSWORD,
            },
            "CSI_KAFKA_SECURITY_PROTOCOL=SASL_SSL needs CSI_KAFKA_SASL_USERNAME",
        ),
        (
            {"CSI_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "CSI_KAFKA_SASL_USERNAME": "u"},
            "needs CSI_KAFKA_SASL_PASSWORD or CSI_KAFKA_SASL_PASSWORD_FILE",
        ),
        (
            {
                "CSI_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                "CSI_KAFKA_SASL_MECHANISM": "GSSAPI",
                "CSI_KAFKA_SASL_USERNAME": "u",
                "CSI_KAFKA_SASL_PASSWORD": SASL_PASSWORD,
            },
            "CSI_KAFKA_SASL_MECHANISM='GSSAPI' is not supported; use one of PLAIN, "
            "SCRAM-SHA-256, SCRAM-SHA-512",
        ),
        (
            {"CSI_KAFKA_SASL_USERNAME": "u", "CSI_KAFKA_SASL_PASSWORD": SASL_PASSWORD},
            "CSI_KAFKA_SASL_USERNAME, CSI_KAFKA_SASL_PASSWORD set, but "
            "CSI_KAFKA_SECURITY_PROTOCOL=PLAINTEXT does not use SASL",
        ),
        (
            {"CSI_KAFKA_SECURITY_PROTOCOL": "SSL", "CSI_KAFKA_SASL_MECHANISM": "PLAIN"},
            "CSI_KAFKA_SASL_MECHANISM set, but CSI_KAFKA_SECURITY_PROTOCOL=SSL does not use SASL",
        ),
        (
            {"CSI_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "CSI_KAFKA_SSL_CAFILE": "ca.pem"},
            "does not use SASL|needs CSI_KAFKA_SASL_USERNAME",
        ),
        (
            {"CSI_KAFKA_SSL_CAFILE": "ca.pem"},
            "CSI_KAFKA_SSL_CAFILE set, but CSI_KAFKA_SECURITY_PROTOCOL=PLAINTEXT does not use TLS",
        ),
        (
            {"CSI_KAFKA_SSL_KEY_PASSWORD": KEY_PASSWORD},
            "CSI_KAFKA_SSL_KEY_PASSWORD set, but .* does not use TLS",
        ),
        (
            {"CSI_KAFKA_SECURITY_PROTOCOL": "SSL", "CSI_KAFKA_SSL_CAFILE": "/no/such/ca.pem"},
            "CSI_KAFKA_SSL_CAFILE=/no/such/ca.pem: no such file",
        ),
        (
            {"CSI_KAFKA_SECURITY_PROTOCOL": "SSL", "CSI_KAFKA_SSL_KEYFILE": "KEYFILE"},
            "belong to a client certificate: set CSI_KAFKA_SSL_CERTFILE too",
        ),
        (
            {"CSI_KAFKA_SECURITY_PROTOCOL": "SSL", "CSI_KAFKA_SSL_CHECK_HOSTNAME": "maybe"},
            "CSI_KAFKA_SSL_CHECK_HOSTNAME='maybe': expected true or false",
        ),
    ],
)
def test_wrong_combinations_are_refused_with_the_variable_named(
    env: dict[str, str], message: str, tmp_path: Path
) -> None:
    env = {k: _write(tmp_path / "client.key") if v == "KEYFILE" else v for k, v in env.items()}
    with pytest.raises(ConfigError, match=message) as caught:
        KafkaSecurity.from_env(env)
    assert_no_secret(full_error_text(caught.value))


def test_settings_refuse_a_wrong_kafka_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CSI_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    with pytest.raises(ConfigError, match="needs CSI_KAFKA_SASL_USERNAME"):
        Settings()
    # ConfigError is a ValueError: `csi` prints "csi: <message>" and exits 2, no traceback
    assert issubclass(ConfigError, ValueError)


def test_the_cli_reports_a_configuration_error_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.cli import main

    monkeypatch.setenv("CSI_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("CSI_KAFKA_SASL_USERNAME", "csi")
    monkeypatch.setenv("CSI_KAFKA_SASL_PASSWORD", SASL_PASSWORD)
    monkeypatch.setenv("CSI_KAFKA_SASL_MECHANISM", "MD5")
    assert main(["case", "contact", "D017/3fa9c01b2e", "--by", "tester"]) == 2
    err = capsys.readouterr().err
    assert "CSI_KAFKA_SASL_MECHANISM='MD5' is not supported" in err
    assert "Traceback" not in err
    assert_no_secret(err)


# ------------------------------------------------------------------------------ redaction


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("clickhouse://csi:pw@db:9000/csi", "clickhouse://csi:***@db:9000/csi"),
        ("clickhouse://csi@db:9000/csi", "clickhouse://csi@db:9000/csi"),
        ("clickhouse://db/csi?secure=1&ca_certs=/c.pem", "clickhouse://db/csi?secure=1&ca_certs=/c.pem"),
        ("clickhouse://u:p%40ss@db/csi?password=x", "clickhouse://u:***@db/csi?password=***"),
        ("chdb://.csi/warehouse", "chdb://.csi/warehouse"),
        ("https://u:tok@hooks.example/x", "https://u:***@hooks.example/x"),
        ("http://[::1", REDACTED),  # does not parse: all of it goes
    ],
)  # fmt: skip
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_webhook_urls_lose_their_path() -> None:
    url = "https://hooks.slack.com/services/T000/B000/XXXXSECRET"
    assert redact_url(url, keep_path=False) == "https://hooks.slack.com/***"
    assert redact_url("https://example.com/", keep_path=False) == "https://example.com/"


def test_settings_never_show_a_secret(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    (tmp_path / "key").write_text(KEY_PASSWORD)
    monkeypatch.setenv("CSI_WAREHOUSE", f"clickhouse://csi:{WRITER_PASSWORD}@db:9000/csi")
    monkeypatch.setenv("CSI_WAREHOUSE_PASSWORD", READER_PASSWORD)
    monkeypatch.setenv("CSI_WEBHOOK_URL", f"https://hooks.example.com/services/{WRONG_PASSWORD}")
    monkeypatch.setenv("CSI_WEBHOOK_AUTH", f"Bearer {SASL_PASSWORD}x")
    monkeypatch.setenv("CSI_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("CSI_KAFKA_SASL_USERNAME", "csi-worker")
    monkeypatch.setenv("CSI_KAFKA_SASL_PASSWORD", SASL_PASSWORD)
    settings = Settings()
    assert settings.kafka.sasl_password == SASL_PASSWORD  # the value is there ...
    assert settings.warehouse_password == READER_PASSWORD
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("csi.test").info("settings: %s / %r", settings, settings)
        logging.getLogger("csi.test").info(f"settings: {settings}")
    shown = repr(settings)
    assert_no_secret(shown, str(settings), caplog.text)  # ... and never shown
    assert "warehouse='clickhouse://csi:***@db:9000/csi'" in shown
    assert "webhook_url='https://hooks.example.com/***'" in shown
    assert "webhook_auth=***" in shown and "warehouse_password=***" in shown
    assert "sasl_username='csi-worker'" in shown and "sasl_password=***" in shown


def test_clickhouse_address_and_url_errors_never_show_the_password() -> None:
    address = parse_clickhouse_url(f"clickhouse://csi:{WRITER_PASSWORD}@db/csi")
    assert address.password == WRITER_PASSWORD
    assert_no_secret(repr(address), str(address))
    for url in (
        f"clickhouse://csi:{WRITER_PASSWORD}@:9000/csi",
        f"clickhouse://csi:{WRITER_PASSWORD}@db:port/csi",
        f"clickhouse://csi:{WRITER_PASSWORD}@db/a/b",
        f"clickhouse://csi:{WRITER_PASSWORD}@db/csi?sekure=1",
        f"clickhouse://csi:{WRITER_PASSWORD}@db/csi?verify=0",
        f"clickhouse://csi:{WRITER_PASSWORD}@db/csi#frag",
        f"mysql://csi:{WRITER_PASSWORD}@db/csi",
    ):
        with pytest.raises(ValueError) as caught:
            open_warehouse(url)
        assert_no_secret(full_error_text(caught.value))
        assert "csi:***@" in str(caught.value)


def test_clickhouse_url_tls_options() -> None:
    plain = parse_clickhouse_url("clickhouse://db/csi")
    assert (plain.port, plain.secure, plain.verify, plain.ca_certs) == (9000, False, True, None)
    tls = parse_clickhouse_url("clickhouse://db/csi?secure=1&ca_certs=/etc/csi/ca.pem")
    assert (tls.port, tls.secure, tls.verify, tls.ca_certs) == (
        CLICKHOUSE_SECURE_PORT,
        True,
        True,
        "/etc/csi/ca.pem",
    )
    assert parse_clickhouse_url("clickhouse://db:9441/csi?secure=true&verify=0").port == 9441
    assert not parse_clickhouse_url("clickhouse://db/csi?secure=1&verify=false").verify
    mutual = parse_clickhouse_url("clickhouse://db/csi?secure=1&certfile=/c.pem&keyfile=/c.key")
    assert (mutual.certfile, mutual.keyfile) == ("/c.pem", "/c.key")
    for url, problem in (
        ("clickhouse://db/csi?secure=2", "secure='2' is not 0 or 1"),
        ("clickhouse://db/csi?secure=1&secure=0", "given twice"),
        ("clickhouse://db/csi?ca_certs=/ca.pem", "apply to TLS only: add secure=1"),
        ("clickhouse://db/csi?secure=1&keyfile=/k", "keyfile needs certfile"),
        ("clickhouse://db/csi?secure=1&ca_certs=", "ca_certs is empty"),
        ("clickhouse://db/csi?password=x", "option 'password' is unknown"),
    ):
        with pytest.raises(ValueError, match=re.escape(problem)):
            parse_clickhouse_url(url)


def test_two_different_warehouse_passwords_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CSI_WAREHOUSE_PASSWORD", READER_PASSWORD)
    with pytest.raises(ValueError, match="two different ClickHouse passwords") as caught:
        open_warehouse(f"clickhouse://csi:{WRITER_PASSWORD}@127.0.0.1:1/csi")
    assert "CSI_WAREHOUSE_PASSWORD" in str(caught.value)
    assert_no_secret(full_error_text(caught.value))
    with pytest.raises(ValueError, match="the password argument"):
        open_warehouse(f"clickhouse://csi:{WRITER_PASSWORD}@127.0.0.1:1/csi", password="other")


def test_kafka_wire_debug_logs_never_show_the_sasl_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """kafka-python and aiokafka print whole requests at DEBUG, SASL PLAIN's included."""
    from kafka.protocol.parser import KafkaProtocol
    from kafka.protocol.sasl import SaslAuthenticateRequest

    security = KafkaSecurity(
        protocol="SASL_PLAINTEXT", sasl_username="csi", sasl_password=SASL_PASSWORD
    )
    security.client_config()  # what every client set-up does
    for name in KAFKA_WIRE_LOGGERS:
        assert any(f is not None for f in logging.getLogger(name).filters), name
    token = b"\x00csi\x00" + SASL_PASSWORD.encode()
    with caplog.at_level(logging.DEBUG):
        protocol = KafkaProtocol(client_id="csi-test")
        protocol.send_request(SaslAuthenticateRequest(token, version=1))
        assert SASL_PASSWORD.encode() in protocol.send_bytes()  # it is on the wire ...
        # the line aiokafka writes for every request (aiokafka.conn, DEBUG)
        logging.getLogger("aiokafka.conn").debug("Request to %s:%d %d: %s", "k", 9092, 1, token)
    assert "SaslAuthenticateRequest" in caplog.text and "Send:" in caplog.text
    assert_no_secret(caplog.text)  # ... but not in the logs
    assert REDACTED in caplog.text


@pytest.mark.integration
def test_a_kafka_admin_client_at_debug_level_does_not_log_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from kafka.admin import KafkaAdminClient
    from kafka.errors import KafkaError

    security = KafkaSecurity(
        protocol="SASL_PLAINTEXT", sasl_username="csi", sasl_password=SASL_PASSWORD
    )
    nobody = f"{LOOPBACK}:{free_loopback_port()}"  # nothing listens: bootstrap fails fast
    with caplog.at_level(logging.DEBUG), pytest.raises(KafkaError) as caught:
        KafkaAdminClient(
            bootstrap_servers=nobody, bootstrap_timeout_ms=500, **security.client_config()
        )
    assert "Starting KafkaAdminClient with configuration" in caplog.text
    assert "'sasl_plain_password': '***'" in caplog.text
    assert_no_secret(caplog.text, full_error_text(caught.value))


def test_protect_secrets_in_logs_masks_text_and_reprs(caplog: pytest.LogCaptureFixture) -> None:
    protect_secrets_in_logs(KEY_PASSWORD, None, "")
    logger = logging.getLogger(KAFKA_WIRE_LOGGERS[0])
    with caplog.at_level(logging.DEBUG, logger=KAFKA_WIRE_LOGGERS[0]):
        logger.debug(
            "plain %s, repr %r, bytes %r", KEY_PASSWORD, KEY_PASSWORD, KEY_PASSWORD.encode()
        )
        logger.debug("nothing secret here: %d", 42)
    assert_no_secret(caplog.text)
    assert caplog.text.count(REDACTED) == 3 and "nothing secret here: 42" in caplog.text


# -------------------------------------------------------- Kafka: a real TLS handshake


def _common_name(certificate: Any) -> str:
    """The CN of a certificate as ``SSLSocket.getpeercert()`` returns it."""
    for rdn in certificate["subject"]:
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


class TlsBrokerStandIn:
    """A TLS server on loopback that records each client's certificate and first request.

    It speaks no Kafka: after the handshake it reads the client's first request (an
    ApiVersions request) and hangs up, so the client fails to bootstrap *after* TLS
    succeeded, which is what these tests look at.
    """

    def __init__(self, certificates: Certificates) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=certificates.ca)
        context.load_cert_chain(certificates.server_cert, certificates.server_key)
        context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: the client must show a cert
        self._context = context
        self._listener = socket.create_server((LOOPBACK, 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self.clients: list[str] = []
        self.first_requests: list[bytes] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            connection.settimeout(5)
            try:
                with self._context.wrap_socket(connection, server_side=True) as tls:
                    self.clients.append(_common_name(tls.getpeercert()))
                    self.first_requests.append(tls.recv(4096))
            except (ssl.SSLError, OSError) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                connection.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()


@pytest.fixture
def tls_broker(certificates: Certificates) -> Iterator[TlsBrokerStandIn]:
    server = TlsBrokerStandIn(certificates)
    try:
        yield server
    finally:
        server.close()


def _mutual_tls(certificates: Certificates, *, ca: Path | None = None) -> KafkaSecurity:
    return KafkaSecurity(
        protocol="SSL",
        ssl_cafile=str(ca or certificates.ca),
        ssl_certfile=str(certificates.client_cert),
        ssl_keyfile=str(certificates.client_key_encrypted),
        ssl_key_password=KEY_PASSWORD,
    )


def _api_versions_request(data: bytes) -> bool:
    # size (int32), api_key (int16) = 18 for ApiVersions
    return len(data) >= 6 and int.from_bytes(data[4:6], "big") == 18


@pytest.mark.integration
def test_kafka_python_clients_do_mutual_tls_with_these_settings(
    tls_broker: TlsBrokerStandIn, certificates: Certificates
) -> None:
    from kafka.admin import KafkaAdminClient
    from kafka.errors import KafkaError

    config = _mutual_tls(certificates).client_config()
    with pytest.raises(KafkaError):  # the stand-in hangs up after the handshake
        KafkaAdminClient(
            bootstrap_servers=f"localhost:{tls_broker.port}", bootstrap_timeout_ms=1000, **config
        )
    assert tls_broker.clients and set(tls_broker.clients) == {"csi-worker"}
    assert all(_api_versions_request(data) for data in tls_broker.first_requests)


@pytest.mark.integration
def test_the_event_producer_takes_its_tls_settings_from_the_environment(
    tls_broker: TlsBrokerStandIn, certificates: Certificates, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kafka.errors import KafkaError

    from pipeline.producer import EventProducer

    monkeypatch.setenv("CSI_KAFKA_SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("CSI_KAFKA_SSL_CAFILE", str(certificates.ca))
    monkeypatch.setenv("CSI_KAFKA_SSL_CERTFILE", str(certificates.client_cert))
    monkeypatch.setenv("CSI_KAFKA_SSL_KEYFILE", str(certificates.client_key))
    with pytest.raises(KafkaError):
        EventProducer(f"localhost:{tls_broker.port}", bootstrap_timeout_ms=1000, max_block_ms=1000)
    assert "csi-worker" in tls_broker.clients


@pytest.mark.integration
def test_a_broker_certificate_from_an_untrusted_ca_is_refused(
    tls_broker: TlsBrokerStandIn, certificates: Certificates
) -> None:
    from kafka.errors import KafkaError

    from pipeline.producer import EventProducer

    security = _mutual_tls(certificates, ca=certificates.other_ca)
    with pytest.raises(KafkaError):
        EventProducer(
            f"localhost:{tls_broker.port}",
            security=security,
            bootstrap_timeout_ms=1000,
            max_block_ms=1000,
        )
    assert tls_broker.clients == [], "the client must not finish the handshake"
    assert tls_broker.failures  # the client hung up during the handshake


@pytest.mark.integration
def test_aiokafka_does_mutual_tls_with_the_faust_credentials(
    tls_broker: TlsBrokerStandIn, certificates: Certificates
) -> None:
    from aiokafka import AIOKafkaClient
    from aiokafka.errors import KafkaConnectionError
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    credentials = _mutual_tls(certificates).faust_credentials()
    auth = credentials_to_aiokafka_auth(credentials)

    async def bootstrap() -> None:
        client = AIOKafkaClient(bootstrap_servers=f"localhost:{tls_broker.port}", **auth)
        try:
            await client.bootstrap()
        finally:
            await client.close()

    with pytest.raises(KafkaConnectionError):
        asyncio.run(bootstrap())
    assert "csi-worker" in tls_broker.clients
    assert any(_api_versions_request(data) for data in tls_broker.first_requests)


# -------------------------------------------- ClickHouse: users, passwords and TLS, for real


@dataclass(frozen=True)
class SecuredClickHouse:
    port: int
    tls_port: int

    def url(self, user: str, password: str | None = None, database: str = "csi") -> str:
        credentials = user if password is None else f"{user}:{password}"
        return f"clickhouse://{credentials}@{LOOPBACK}:{self.port}/{database}"


def _server_config(root: Path, port: int, tls_port: int, certificates: Certificates) -> str:
    return _config_xml(
        root, port,
        f"""
    <tcp_port_secure>{tls_port}</tcp_port_secure>
    <openSSL>
        <server>
            <certificateFile>{certificates.server_cert}</certificateFile>
            <privateKeyFile>{certificates.server_key}</privateKeyFile>
            <verificationMode>none</verificationMode>
            <loadDefaultCAFile>false</loadDefaultCAFile>
            <disableProtocols>sslv2,sslv3,tlsv1,tlsv1_1</disableProtocols>
        </server>
    </openSSL>""",
    )  # fmt: skip


_BASE_USERS = """<?xml version="1.0"?>
<yandex>
    <profiles><default><max_memory_usage>2000000000</max_memory_usage></default></profiles>
    <users>
        <default>
            <password></password>
            <networks><ip>127.0.0.1</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas><default><interval>
        <duration>3600</duration><queries>0</queries><errors>0</errors>
        <result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time>
    </interval></default></quotas>
</yandex>
"""


def deploy_users_for_old_servers() -> str:
    """deploy's users file as Debian's ClickHouse 18.16 accepts it.

    Setting constraints (``<constraints>``: keep max_execution_time changeable for the
    read-only Grafana user) came with ClickHouse 19.14; 18.16 rejects the profile that has
    them, so they are dropped here. Users, passwords from the environment, networks,
    profiles and readonly=1 are the deploy file's own.
    """
    tree = ET.parse(DEPLOY_USERS_XML)
    for profile in tree.getroot().iterfind("profiles/*"):
        for constraints in profile.findall("constraints"):
            profile.remove(constraints)
    return ET.tostring(tree.getroot(), encoding="unicode")


def _start_server(
    binary: str, root: Path, certificates: Certificates, env: Mapping[str, str]
) -> tuple[subprocess.Popen[bytes], SecuredClickHouse] | None:
    port, tls_port = free_loopback_port(), free_loopback_port()
    for subdir in ("data", "tmp", "user_files", "format_schemas", "log", "users.d"):
        (root / subdir).mkdir(parents=True, exist_ok=True)
    (root / "config.xml").write_text(_server_config(root, port, tls_port, certificates))
    (root / "users.xml").write_text(_BASE_USERS)
    (root / "users.d" / "csi-users.xml").write_text(deploy_users_for_old_servers())
    with (root / "stdout.log").open("wb") as stdout:
        process = subprocess.Popen(
            [binary, f"--config-file={root / 'config.xml'}"],
            cwd=root, env={**os.environ, **env}, stdin=subprocess.DEVNULL,
            stdout=stdout, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            errors = root / "log" / "clickhouse-server.err.log"
            text = errors.read_text(errors="replace") if errors.exists() else ""
            if "Address already in use" in text:
                return None
            raise RuntimeError(f"clickhouse-server exited with {process.returncode}:\n{text}")
        if _answers(ClickHouseEndpoint(LOOPBACK, port)):
            return process, SecuredClickHouse(port, tls_port)
        time.sleep(0.1)
    process.kill()
    process.wait(timeout=15)
    raise RuntimeError("clickhouse-server did not answer within 60 s")


@contextmanager
def secured_clickhouse(
    binary: str, directory: Path, certificates: Certificates
) -> Iterator[SecuredClickHouse]:
    # The server reads the passwords from its environment, as in deploy/compose.yaml.
    env = {
        "CLICKHOUSE_CSI_PASSWORD": WRITER_PASSWORD,
        "CLICKHOUSE_GRAFANA_PASSWORD": READER_PASSWORD,
    }
    for attempt in range(3):
        started = _start_server(binary, directory / f"attempt-{attempt}", certificates, env)
        if started is not None:
            break
    else:
        raise RuntimeError("clickhouse-server found no free ports in 3 tries")
    process, server = started
    try:
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


@pytest.fixture(scope="module")
def clickhouse(
    tmp_path_factory: pytest.TempPathFactory, certificates: Certificates
) -> Iterator[SecuredClickHouse]:
    """clickhouse-server with deploy's users (csi writes, grafana reads) and a TLS port."""
    binary = require_clickhouse_server()
    with secured_clickhouse(
        binary, tmp_path_factory.mktemp("secured-clickhouse"), certificates
    ) as server:
        admin = open_warehouse(server.url("default", database="default"))
        try:
            admin.execute("CREATE DATABASE IF NOT EXISTS csi")
            admin.execute(
                "CREATE TABLE IF NOT EXISTS csi.scores (dealer_id String, score Float64) "
                "ENGINE = MergeTree() ORDER BY dealer_id"
            )
            admin.execute("CREATE TABLE IF NOT EXISTS default.other (x UInt8) ENGINE = Memory")
        finally:
            admin.close()
        yield server


@pytest.mark.integration
def test_the_writer_writes_and_the_grafana_user_only_reads(clickhouse: SecuredClickHouse) -> None:
    writer = open_warehouse(clickhouse.url("csi", WRITER_PASSWORD))
    try:
        writer.insert("csi.scores", ["dealer_id", "score"], [("D001", 900.0), ("D002", 750.5)])
    finally:
        writer.close()
    reader = open_warehouse(clickhouse.url("grafana", READER_PASSWORD))
    try:
        assert reader.query("SELECT count() AS n FROM csi.scores")[1][0][0] >= 2
        _, rows = reader.query("SELECT value FROM system.settings WHERE name = 'readonly'")
        assert rows == [("1",)]
        for statement in (
            "INSERT INTO csi.scores VALUES ('D003', 1.0)",
            "CREATE TABLE csi.sneaky (x UInt8) ENGINE = Memory",
            "DROP TABLE csi.scores",
        ):
            with pytest.raises(WarehouseError, match="readonly"):
                reader.execute(statement)
    finally:
        reader.close()


@pytest.mark.integration
def test_users_are_limited_to_database_csi(clickhouse: SecuredClickHouse) -> None:
    for user, password in (("csi", WRITER_PASSWORD), ("grafana", READER_PASSWORD)):
        warehouse = open_warehouse(clickhouse.url(user, password))
        try:
            with pytest.raises(WarehouseError, match=r"(?i)access denied to database default"):
                warehouse.query("SELECT count() FROM default.other")
        finally:
            warehouse.close()


@pytest.mark.integration
@pytest.mark.parametrize("password", [WRONG_PASSWORD, None])
def test_a_wrong_or_missing_password_is_a_clear_error_without_the_password(
    clickhouse: SecuredClickHouse, caplog: pytest.LogCaptureFixture, password: str | None
) -> None:
    with caplog.at_level(logging.DEBUG), pytest.raises(WarehouseError) as caught:
        open_warehouse(clickhouse.url("csi", password))
    message = str(caught.value)
    assert "refused user 'csi'" in message and "wrong password or unknown user" in message
    assert ("a password given" if password else "no password given") in message
    assert "CSI_WAREHOUSE_PASSWORD" in message and "Stack trace" not in message
    assert_no_secret(full_error_text(caught.value), caplog.text)


@pytest.mark.integration
def test_the_password_may_come_from_the_environment_or_a_file(
    clickhouse: SecuredClickHouse, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CSI_WAREHOUSE_PASSWORD", WRITER_PASSWORD)
    warehouse = open_warehouse(clickhouse.url("csi"))  # no password in the URL
    warehouse.close()
    monkeypatch.delenv("CSI_WAREHOUSE_PASSWORD")
    secret = tmp_path / "clickhouse_csi_password"
    secret.write_text(WRITER_PASSWORD + "\n")
    monkeypatch.setenv("CSI_WAREHOUSE_PASSWORD_FILE", str(secret))
    warehouse = open_warehouse(clickhouse.url("csi"))
    try:
        assert warehouse.query("SELECT 1 AS one") == (["one"], [(1,)])
    finally:
        warehouse.close()
    # the same password in the URL too is not a conflict
    open_warehouse(clickhouse.url("csi", WRITER_PASSWORD)).close()


@pytest.mark.integration
def test_tls_to_clickhouse_verifies_the_server_certificate(
    clickhouse: SecuredClickHouse, certificates: Certificates, caplog: pytest.LogCaptureFixture
) -> None:
    base = f"clickhouse://csi:{WRITER_PASSWORD}@{LOOPBACK}:{clickhouse.tls_port}/csi?secure=1"
    warehouse = open_warehouse(f"{base}&ca_certs={certificates.ca}")
    try:
        assert warehouse.query("SELECT 40 + 2 AS answer") == (["answer"], [(42,)])
    finally:
        warehouse.close()
    # A CA that did not sign the server's certificate: refused, and said so.
    with caplog.at_level(logging.DEBUG), pytest.raises(WarehouseError) as caught:
        open_warehouse(f"{base}&ca_certs={certificates.other_ca}")
    assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)
    assert f"{LOOPBACK}:{clickhouse.tls_port} (TLS)" in str(caught.value)
    assert_no_secret(full_error_text(caught.value), caplog.text)
    # verify=0 skips the check (testing only)
    open_warehouse(f"{base}&verify=0").close()
    with pytest.raises(WarehouseError, match=r"ca_certs file .* does not exist"):
        open_warehouse(f"{base}&ca_certs=/no/such/ca.pem")


# ------------------------------------------------------------------------------ deploy/


def _compose_services() -> dict[str, Any]:
    import yaml

    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text(encoding="utf-8"))
    services: dict[str, Any] = compose["services"]
    return services


def test_every_kafka_client_of_the_stack_gets_the_security_settings() -> None:
    kafka_settings = {name for name in SECURITY_VARIABLES if name.startswith("CSI_KAFKA_")}
    for name in ("worker", "topics", "simulator"):
        service = _compose_services()[name]
        environment = service.get("environment") or {}
        assert kafka_settings <= set(environment), f"{name}: {kafka_settings - set(environment)}"
        for variable in kafka_settings:
            # from deploy/.env, empty (PLAINTEXT) unless set there
            assert environment[variable] == f"${{{variable}:-}}", (name, variable)
        # the files those settings name are in deploy/config, mounted here
        assert "./config:/etc/csi:ro" in service.get("volumes", []), name


def test_env_example_keeps_every_secret_a_placeholder() -> None:
    text = (ROOT / "deploy" / ".env.example").read_text(encoding="utf-8")
    for line in text.splitlines():
        name, sep, value = line.lstrip("# ").partition("=")
        if sep and re.search(r"PASSWORD$|AUTH$", name):
            assert value == "" or value.startswith("change-me"), line
    ignored = (ROOT / "deploy" / ".gitignore").read_text(encoding="utf-8").splitlines()
    assert {".env", "config/*.pem", "config/*.key", "config/*password*"} <= set(ignored)


def test_the_topics_job_skips_a_secured_cluster_and_reports_bad_settings(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "csi_stack_security", ROOT / "deploy" / "stack.py"
    )
    assert spec is not None and spec.loader is not None
    stack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stack)

    monkeypatch.setenv("CSI_KAFKA_SECURITY_PROTOCOL", "SSL")
    assert stack.main(["topics", "--attempts", "1"]) == 0
    assert "skipped, CSI_KAFKA_SECURITY_PROTOCOL=SSL" in capsys.readouterr().err
    monkeypatch.setenv("CSI_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("CSI_KAFKA_SASL_PASSWORD", SASL_PASSWORD)
    assert stack.main(["topics", "--attempts", "1"]) == 1
    err = capsys.readouterr().err
    assert "needs CSI_KAFKA_SASL_USERNAME" in err
    assert_no_secret(err)
