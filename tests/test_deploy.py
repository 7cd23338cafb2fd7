"""The docker compose stack in deploy/, checked without Docker.

There is no Docker engine on the development machines or in CI, and no `docker compose`
plugin, so nothing here starts a container. What is checked instead:

* every YAML file under deploy/ parses; compose.yaml has the services kafka, topics,
  clickhouse, grafana, worker and simulator, pins every image to a version, mounts only
  host paths that exist, declares the named volumes it uses, has healthchecks and the
  depends_on conditions that order the start, and lets the worker scale (no
  container_name, no host port, no shared data dir);
* Kafka's KRaft settings agree with each other and with the clients' bootstrap;
* the worker's CSI_* settings are ones pipeline/config.py (or README's configuration
  table) knows, and its warehouse URL names the ClickHouse user the users file defines;
* the Grafana datasource has the uid and plugin type the dashboards use and logs in as
  the read-only ClickHouse user; the dashboards provider reads where the JSON is mounted;
* the ClickHouse users file parses, the grafana profile is readonly=1 with
  max_execution_time changeable, passwords come from the environment only;
* the Dockerfile's base image is pinned, it runs as a non-root user and installs no
  extras; .env.example holds placeholders, not secrets, and deploy/.gitignore keeps
  deploy/.env out of git;
* deploy/stack.py (the `topics` one-shot and the worker healthcheck) runs: topics against
  the embedded broker, the heartbeat query against chdb.

If `docker compose` is available, `docker compose config -q` validates compose.yaml
against the Compose specification too; otherwise that test is skipped.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from dashboards.model import DATASOURCE, DATASOURCE_UID
from pipeline.broker import BrokerError, TopicMismatchError
from pipeline.topics import ALL_TOPICS
from pipeline.warehouse import parse_clickhouse_url
from tests.broker_fixture import BrokerFactory

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
ENV_EXAMPLE = DEPLOY / ".env.example"
USERS_XML = DEPLOY / "clickhouse" / "users.d" / "csi-users.xml"
CONFIG_XML = DEPLOY / "clickhouse" / "config.d" / "csi.xml"
DATASOURCE_YAML = DEPLOY / "grafana" / "provisioning" / "datasources" / "clickhouse.yaml"
DASHBOARDS_YAML = DEPLOY / "grafana" / "provisioning" / "dashboards" / "csi.yaml"
STACK_PY = DEPLOY / "stack.py"

SERVICES = {"kafka", "topics", "clickhouse", "grafana", "worker", "simulator"}
BUILT = {"topics", "worker", "simulator"}
"""Services that run the image built from deploy/Dockerfile."""
NOT_FOR_THE_WORKER = {
    "CSI_BROKER_KIND": "chooses the embedded broker, which the stack does not run",
    "CSI_FETCH_HOLD_MS": "only for the embedded broker; Kafka holds empty fetches itself",
    "CSI_API_KEYS": "read by `csi serve-http` (the HTTP ingestion endpoint), not by the worker",
}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH|CREDENTIAL|_KEY$")
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")
VERSION_TAG = re.compile(r"^v?\d+(\.\d+)+([-.][0-9A-Za-z.-]+)?$")


# ----------------------------------------------------------------------------- helpers


def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path.relative_to(ROOT)}: not a YAML mapping"
    return data


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose.get("services")
    assert isinstance(found, dict)
    return found


def env_of(service: dict[str, Any]) -> dict[str, str]:
    """A service's `environment`, in either of its forms, as strings."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        pairs = (item.split("=", 1) if "=" in item else (item, "") for item in raw)
        return {key: value for key, value in pairs}
    return {str(key): "" if value is None else str(value) for key, value in raw.items()}


def volume_mounts(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(kind, source, target) of each volume entry; kind "bind" or "volume"."""
    mounts = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            mounts.append((entry["type"], str(entry.get("source", "")), str(entry["target"])))
            continue
        source, target = str(entry).split(":")[:2]
        kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        mounts.append((kind, source, target))
    return mounts


def image_tag(image: str) -> str | None:
    """The tag of an image reference (None without one); a digest is ignored."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.rsplit(":", 1)[1] if ":" in last else None


def interpolate(text: str, values: dict[str, str]) -> str:
    """Compose-style ${VAR}, ${VAR:-default}, ${VAR:?error} with `values` as the env."""

    def one(match: re.Match[str]) -> str:
        name, operator, argument = match.group(1), match.group(2), match.group(3)
        value = values.get(name)
        if operator in (":-", "-") and not value:
            return argument or ""
        if operator in (":?", "?") and not value:
            raise KeyError(f"{name} is required: {argument}")
        return value or ""

    return INTERPOLATION.sub(one, text)


def strings_in(node: Any) -> Iterator[str]:
    """Every string value in a parsed YAML document (what compose interpolates)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings_in(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings_in(value)


def env_example() -> tuple[dict[str, str], set[str]]:
    """(active assignments, names of commented-out `# NAME=value` examples)."""
    active: dict[str, str] = {}
    commented: set[str] = set()
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if match := re.fullmatch(r"#\s*([A-Z][A-Z0-9_]*)=.*", stripped):
            commented.add(match.group(1))
        elif stripped and not stripped.startswith("#"):
            name, sep, value = stripped.partition("=")
            assert sep, f".env.example: not NAME=value: {line!r}"
            active[name.strip()] = value.strip()
    return active, commented


def known_settings() -> set[str]:
    """CSI_* names pipeline/config.py reads or README's configuration table lists."""
    config = (ROOT / "pipeline" / "config.py").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    names = set(re.findall(r"[\"'](CSI_[A-Z0-9_]+)[\"']", config))
    table = "\n".join(line for line in readme.splitlines() if line.startswith("| `CSI_"))
    names |= set(re.findall(r"`(CSI_[A-Z0-9_]+)`", table))
    assert {"CSI_BOOTSTRAP", "CSI_WAREHOUSE", "CSI_REGISTRY"} <= names
    return names


def load_stack() -> ModuleType:
    spec = importlib.util.spec_from_file_location("csi_deploy_stack", STACK_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dockerfile_lines() -> list[str]:
    """Instructions of the Dockerfile, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    return [
        line.strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")
    ]


def users_xml() -> ET.Element:
    root = ET.parse(USERS_XML).getroot()
    assert root.tag == "clickhouse"
    return root


# ------------------------------------------------------------------------- the files


def test_every_yaml_file_under_deploy_parses() -> None:
    files = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert COMPOSE in files and DATASOURCE_YAML in files and DASHBOARDS_YAML in files
    for path in files:
        load_yaml(path)


def test_compose_has_the_services_and_no_version_key(compose: dict[str, Any]) -> None:
    assert "version" not in compose, "the Compose specification has no version key"
    assert set(services(compose)) == SERVICES


def test_every_image_is_pinned_to_a_version(compose: dict[str, Any]) -> None:
    for name, service in services(compose).items():
        image = service.get("image")
        assert image, f"{name}: no image"
        tag = image_tag(str(image))
        assert tag is not None, f"{name}: {image} has no tag"
        assert tag != "latest" and VERSION_TAG.match(tag), f"{name}: {image} is not pinned"


def test_built_services_share_the_image_tagged_with_the_package_version(
    compose: dict[str, Any],
) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for name in BUILT:
        service = services(compose)[name]
        assert service["image"] == f"dealer-csi:{version}", name
        build = service["build"]
        context = (DEPLOY / build["context"]).resolve()
        assert context == ROOT, f"{name}: build context {context}"
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    for name in SERVICES - BUILT:
        assert "build" not in services(compose)[name], name


def test_bind_mounts_and_env_files_exist_and_named_volumes_are_declared(
    compose: dict[str, Any],
) -> None:
    declared = set(compose.get("volumes") or {})
    used: set[str] = set()
    for name, service in services(compose).items():
        for kind, source, target in volume_mounts(service):
            assert target.startswith("/"), f"{name}: {target}"
            if kind == "bind":
                path = (DEPLOY / source).resolve()
                assert path.exists(), f"{name}: bind mount source {source} ({path}) is missing"
            else:
                used.add(source)
        env_files = service.get("env_file") or []
        for entry in [env_files] if isinstance(env_files, str | dict) else env_files:
            path_text = entry["path"] if isinstance(entry, dict) else entry
            if Path(path_text).name == ".env":  # not committed: its template is
                assert ENV_EXAMPLE.is_file()
            else:
                assert (DEPLOY / path_text).is_file(), f"{name}: env_file {path_text}"
    assert used <= declared, f"named volumes used but not declared: {used - declared}"
    assert {"kafka-data", "clickhouse-data", "grafana-data"} <= used


def test_compose_variables_come_from_env_example(compose: dict[str, Any]) -> None:
    """Compose reads deploy/.env (a copy of .env.example) for every ${VAR}."""
    values = list(strings_in(compose))
    active, commented = env_example()
    for match in INTERPOLATION.finditer("\n".join(values)):
        name, operator = match.group(1), match.group(2)
        assert name in active or name in commented, f"${{{name}}} is not in .env.example"
        if operator in (":?", "?"):
            assert active.get(name), f"{name} is required: .env.example must set it"
    # and with .env.example as .env, every value resolves
    for value in values:
        interpolate(value, active)


def test_deploy_env_is_ignored_by_git() -> None:
    ignored = (DEPLOY / ".gitignore").read_text(encoding="utf-8").splitlines()
    assert ".env" in [line.strip() for line in ignored]
    assert ".env.example" not in [line.strip() for line in ignored]


def test_healthchecks(compose: dict[str, Any]) -> None:
    for name in ("kafka", "clickhouse", "grafana", "worker"):
        check = services(compose)[name].get("healthcheck")
        assert check and check.get("test"), f"{name}: no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
        assert not check.get("disable"), name


def test_start_order(compose: dict[str, Any]) -> None:
    def conditions(name: str) -> dict[str, str]:
        depends = services(compose)[name].get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        return {other: spec["condition"] for other, spec in depends.items()}

    assert conditions("topics") == {"kafka": "service_healthy"}
    assert conditions("worker") == {
        "kafka": "service_healthy",
        "clickhouse": "service_healthy",
        "topics": "service_completed_successfully",
    }
    assert conditions("simulator") == {
        "kafka": "service_healthy",
        "topics": "service_completed_successfully",
    }
    assert conditions("grafana") == {"clickhouse": "service_healthy"}
    for one_shot in ("topics", "simulator"):
        assert services(compose)[one_shot]["restart"] == "no"
    for long_running in ("kafka", "clickhouse", "grafana", "worker"):
        assert services(compose)[long_running]["restart"] == "unless-stopped"


def test_the_simulator_runs_only_with_its_profile(compose: dict[str, Any]) -> None:
    simulator = services(compose)["simulator"]
    assert simulator["profiles"] == ["simulator"]
    command = simulator["command"]
    assert command[0] == "simulate"
    assert command[command.index("--bootstrap") + 1] == "kafka:9092"
    for name, service in services(compose).items():
        if name != "simulator":
            assert "profiles" not in service, f"{name} must start by default"
    # the flags exist
    from pipeline.cli import build_parser

    active, _ = env_example()
    args = build_parser().parse_args([interpolate(str(part), active) for part in command])
    assert args.bootstrap == "kafka:9092" and args.dealers == 50 and args.rate == 200


# ------------------------------------------------------------------- kafka and topics


def test_kafka_runs_kraft_with_auto_creation_off(compose: dict[str, Any]) -> None:
    kafka = services(compose)["kafka"]
    env = env_of(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["CLUSTER_ID"] and env["KAFKA_NODE_ID"] == "1"
    node, controller = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split("@")
    assert node == env["KAFKA_NODE_ID"]
    listeners = dict(
        item.split("://") for item in env["KAFKA_LISTENERS"].split(",")
    )  # name -> host:port
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    assert controller == "kafka" + listeners["CONTROLLER"]
    advertised = dict(item.split("://") for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert advertised["PLAINTEXT"] == "kafka:9092" == "kafka" + listeners["PLAINTEXT"]
    assert "CONTROLLER" not in advertised
    protocols = dict(
        item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    assert set(listeners) == set(protocols)
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert ("volume", "kafka-data", env["KAFKA_LOG_DIRS"]) in volume_mounts(kafka)
    # the published port is the EXTERNAL listener, advertised with the same port
    published = kafka["ports"][0]
    active, _ = env_example()
    host_port, container_port = interpolate(published, active).split(":")[-2:]
    assert ":" + container_port == listeners["EXTERNAL"]
    assert interpolate(advertised["EXTERNAL"], active).endswith(":" + host_port)


def test_clients_bootstrap_from_the_in_network_listener(compose: dict[str, Any]) -> None:
    assert env_of(services(compose)["topics"])["CSI_BOOTSTRAP"] == "kafka:9092"
    assert env_of(services(compose)["worker"])["CSI_BOOTSTRAP"] == "kafka:9092"


def test_topics_service_runs_the_stack_script_from_the_image(compose: dict[str, Any]) -> None:
    topics = services(compose)["topics"]
    assert topics["entrypoint"] == ["python", "/opt/csi/stack.py"]
    assert topics["command"] == ["topics"]
    assert "COPY deploy/stack.py /opt/csi/stack.py" in dockerfile_lines()
    healthcheck = services(compose)["worker"]["healthcheck"]["test"]
    assert healthcheck[1:4] == ["python", "/opt/csi/stack.py", "healthcheck"]


# ------------------------------------------------------------------------ the worker


def test_worker_scales(compose: dict[str, Any]) -> None:
    worker = services(compose)["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker
    assert all(kind == "bind" for kind, _, _ in volume_mounts(worker)), (
        "a named volume would be shared by every replica"
    )
    data_dir = env_of(worker)["CSI_DATA_DIR"]
    tmpfs = [str(entry).split(":", 1) for entry in worker["tmpfs"]]
    assert [path for path, *_ in tmpfs] == [data_dir]
    options = dict(opt.split("=") for opt in tmpfs[0][1].split(","))
    user = next(line.split()[1] for line in dockerfile_lines() if line.startswith("USER "))
    uid, gid = user.split(":")
    assert options["uid"] == uid and options["gid"] == gid and uid != "0"


def test_worker_settings_are_known_and_complete(compose: dict[str, Any]) -> None:
    known = known_settings()
    env = env_of(services(compose)["worker"])
    assert set(env) <= known, f"unknown settings: {set(env) - known}"
    missing = known - set(NOT_FOR_THE_WORKER) - set(env)
    assert not missing, (
        f"settings the worker does not get: {sorted(missing)}; pass them in "
        "deploy/compose.yaml (and .env.example) or add them to NOT_FOR_THE_WORKER"
    )


def test_worker_writes_as_the_csi_user(compose: dict[str, Any]) -> None:
    active, _ = env_example()
    url = interpolate(env_of(services(compose)["worker"])["CSI_WAREHOUSE"], active)
    address = parse_clickhouse_url(url)
    assert (address.host, address.port, address.database) == ("clickhouse", 9000, "csi")
    assert address.user == "csi"
    assert address.password == active["CLICKHOUSE_CSI_PASSWORD"]
    assert users_xml().find("users/csi") is not None


def test_every_csi_variable_in_env_example_is_a_known_setting() -> None:
    active, commented = env_example()
    names = {name for name in (*active, *commented) if name.startswith("CSI_")}
    assert names, ".env.example documents no worker setting"
    unknown = names - known_settings()
    assert not unknown, f"not settings of pipeline/config.py or README: {sorted(unknown)}"


def test_env_example_holds_placeholders_not_secrets() -> None:
    active, _ = env_example()
    for name, value in active.items():
        if SECRET_NAME.search(name):
            assert value == "" or "change-me" in value, f"{name} looks like a real secret"
        if name.endswith("PASSWORD"):
            # it goes into a clickhouse:// URL unencoded
            assert re.fullmatch(r"[A-Za-z0-9._~-]+", value), name


def test_no_password_is_written_into_compose_or_provisioning(compose: dict[str, Any]) -> None:
    for name, service in services(compose).items():
        for key, value in env_of(service).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{[^}]+\}", value), f"{name}: {key} is not from .env"
    datasource = load_yaml(DATASOURCE_YAML)["datasources"][0]
    for key, value in (datasource.get("secureJsonData") or {}).items():
        assert re.fullmatch(r"\$\{?[A-Z_][A-Z0-9_]*\}?", str(value)), key


# ------------------------------------------------------------------------ clickhouse


def test_clickhouse_mounts_its_users_and_config(compose: dict[str, Any]) -> None:
    mounts = {
        (DEPLOY / source).resolve(): target
        for kind, source, target in volume_mounts(services(compose)["clickhouse"])
        if kind == "bind"
    }
    assert mounts[USERS_XML] == "/etc/clickhouse-server/users.d/csi-users.xml"
    assert mounts[CONFIG_XML] == "/etc/clickhouse-server/config.d/csi.xml"


def test_clickhouse_users() -> None:
    root = users_xml()
    users = root.find("users")
    assert users is not None
    for name in ("csi", "grafana"):
        user = users.find(name)
        assert user is not None, name
        databases = [d.text for d in user.findall("allow_databases/database")]
        assert databases == ["csi"], f"{name} is limited to database csi"
    grafana_profile = users.findtext("grafana/profile")
    profile = root.find(f"profiles/{grafana_profile}")
    assert profile is not None
    assert profile.findtext("readonly") == "1"
    constraint = profile.find("constraints/max_execution_time")
    assert constraint is not None and constraint.find("changeable_in_readonly") is not None
    writer = root.find(f"profiles/{users.findtext('csi/profile')}")
    assert writer is not None and writer.findtext("readonly") in (None, "0")
    # the default user answers the healthcheck inside the container only
    assert sorted(ip.text or "" for ip in users.findall("default/networks/ip")) == [
        "127.0.0.1",
        "::1",
    ]
    config = ET.parse(CONFIG_XML).getroot()
    assert (
        config.findtext("access_control_improvements/settings_constraints_replace_previous")
        == "true"
    ), "changeable_in_readonly needs settings_constraints_replace_previous"


def test_clickhouse_passwords_come_from_the_environment(compose: dict[str, Any]) -> None:
    env = env_of(services(compose)["clickhouse"])
    users = users_xml().find("users")
    assert users is not None
    for user in users:
        for element in user:
            if element.tag.startswith("password"):
                assert element.tag == "password" and not (element.text or "").strip(), (
                    f"{user.tag}: a password is written in the file"
                )
                assert element.get("from_env") in env, f"{user.tag}: env not passed"
    assert {users.findtext("csi/password"), users.findtext("grafana/password")} <= {None, ""}


# --------------------------------------------------------------------------- grafana


def test_grafana_installs_the_pinned_clickhouse_plugin(compose: dict[str, Any]) -> None:
    plugins = env_of(services(compose)["grafana"])["GF_INSTALL_PLUGINS"].split(",")
    ids = {}
    for plugin in plugins:
        plugin_id, version = plugin.strip().split(" ")
        assert VERSION_TAG.match(version), plugin
        ids[plugin_id] = version
    assert DATASOURCE["type"] in ids


def test_datasource_is_the_one_dashboards_use_with_the_read_only_user(
    compose: dict[str, Any],
) -> None:
    provisioning = load_yaml(DATASOURCE_YAML)
    assert provisioning["apiVersion"] == 1
    (datasource,) = provisioning["datasources"]
    assert datasource["uid"] == DATASOURCE_UID == "csi-clickhouse"
    assert datasource["type"] == DATASOURCE["type"] == "grafana-clickhouse-datasource"
    assert datasource["name"] == "ClickHouse" and datasource["editable"] is False
    data = datasource["jsonData"]
    assert (data["host"], data["port"], data["protocol"]) == ("clickhouse", 9000, "native")
    assert data["defaultDatabase"] == "csi"
    assert data["username"] == "grafana"
    readonly = users_xml().find(f"profiles/{users_xml().findtext('users/grafana/profile')}")
    assert readonly is not None and readonly.findtext("readonly") == "1"
    # the query timeout is sent as max_execution_time, which the profile caps
    limit = readonly.findtext("constraints/max_execution_time/max")
    assert limit is None or int(data.get("queryTimeout", 60)) <= int(limit)
    # the password variable reaches the grafana container
    (variable,) = re.findall(r"[A-Z_][A-Z0-9_]*", datasource["secureJsonData"]["password"])
    grafana_env = env_of(services(compose)["grafana"])
    assert variable in grafana_env
    password_env = users_xml().find("users/grafana/password")
    assert password_env is not None
    assert (
        grafana_env[variable]
        == env_of(services(compose)["clickhouse"])[str(password_env.get("from_env"))]
    ), "Grafana and ClickHouse must get the same grafana password"


def test_dashboards_provider_reads_the_mounted_json(compose: dict[str, Any]) -> None:
    (provider,) = load_yaml(DASHBOARDS_YAML)["providers"]
    assert provider["type"] == "file"
    assert provider["allowUiUpdates"] is False
    assert provider["options"]["foldersFromFilesStructure"] is True
    assert "folder" not in provider or not provider["folder"]
    mounts = {
        target: (kind, source)
        for kind, source, target in volume_mounts(services(compose)["grafana"])
    }
    kind, source = mounts[provider["options"]["path"]]
    assert kind == "bind" and (DEPLOY / source).resolve() == ROOT / "dashboards" / "json"
    assert any((ROOT / "dashboards" / "json").rglob("*.json")), (
        "dashboards/json holds no dashboard: generate them (dashboards package)"
    )
    assert mounts["/etc/grafana/provisioning"] == ("bind", "./grafana/provisioning")


# ------------------------------------------------------------------------ dockerfile


def test_dockerfile() -> None:
    lines = dockerfile_lines()
    froms = [line.split()[1] for line in lines if line.upper().startswith("FROM ")]
    assert froms, "no FROM"
    for image in froms:
        tag = image_tag(image)
        assert tag and re.match(r"^3\.11\.\d+-slim", tag), f"{image}: pin python:3.11.X-slim"
    installs = [line for line in lines if "pip install" in line]
    assert installs and all("[" not in line for line in installs), "the worker needs no extra"
    user = [line for line in lines if line.startswith("USER ")]
    assert user and user[-1].split()[1].split(":")[0] not in ("0", "root")
    assert lines[-2:] == ['ENTRYPOINT ["csi"]', 'CMD ["worker"]']
    # what the Dockerfile copies is in the build context (not ignored)
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for line in lines:
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert source in kept, f"{source} is excluded from the build context"
                assert (ROOT / source).exists(), source


# ---------------------------------------------------------------------- deploy/stack.py


def test_ensure_topics_retries_a_broker_that_is_not_ready() -> None:
    stack = load_stack()
    calls: list[str] = []
    pauses: list[float] = []

    def flaky(bootstrap: str) -> None:
        calls.append(bootstrap)
        if len(calls) < 3:
            raise BrokerError("not ready")

    assert stack.ensure_topics("k:9092", create=flaky, sleep=pauses.append, pause_s=2) == 3
    assert calls == ["k:9092"] * 3 and pauses == [2, 2]

    def never(bootstrap: str) -> None:
        raise BrokerError("down")

    with pytest.raises(BrokerError, match="down"):
        stack.ensure_topics("k:9092", attempts=2, create=never, sleep=pauses.append)

    def mismatch(bootstrap: str) -> None:
        calls.append("mismatch")
        raise TopicMismatchError("csi.events.visit has 2 partitions, expected 4")

    calls.clear()
    with pytest.raises(TopicMismatchError):
        stack.ensure_topics("k:9092", create=mismatch, sleep=pauses.append)
    assert calls == ["mismatch"], "a wrong partition count is not retried"


def test_heartbeat_query_quotes_the_hostname() -> None:
    stack = load_stack()
    sql = stack.heartbeat_query("host'x\\", 60)
    assert "startsWith(worker, 'host\\'x\\\\:')" in sql
    assert "INTERVAL 60 SECOND" in sql and "csi.pipeline_health" in sql


@pytest.fixture
def chdb_warehouse(tmp_path: Path) -> Iterator[Any]:
    pytest.importorskip("chdb", reason="chdb (the embedded extra) is not installed")
    from pipeline.warehouse import create_schema, open_warehouse

    warehouse = open_warehouse(f"chdb://{tmp_path / 'warehouse'}")
    try:
        create_schema(warehouse)
        yield warehouse
    finally:
        warehouse.close()


def test_worker_healthcheck_sees_only_its_own_recent_heartbeat(chdb_warehouse: Any) -> None:
    from pipeline.warehouse import PIPELINE_HEALTH_COLUMNS, PIPELINE_HEALTH_TABLE

    stack = load_stack()
    now = datetime.now(UTC)
    chdb_warehouse.insert(
        PIPELINE_HEALTH_TABLE,
        PIPELINE_HEALTH_COLUMNS,
        [
            (now, "a1b2c3:7", stack.HEARTBEAT_METRIC, "events", 10.0),
            (now - timedelta(minutes=5), "old:7", stack.HEARTBEAT_METRIC, "events", 1.0),
            (now, "lag:7", "consumer_lag", "csi.events.visit", 0.0),
        ],
    )
    assert stack.worker_is_alive(chdb_warehouse, "a1b2c3", 60)
    assert not stack.worker_is_alive(chdb_warehouse, "a1b2c", 60), "hostname prefix"
    assert not stack.worker_is_alive(chdb_warehouse, "old", 60), "too old"
    assert stack.worker_is_alive(chdb_warehouse, "old", 600)
    assert not stack.worker_is_alive(chdb_warehouse, "lag", 60), "not a heartbeat metric"
    assert not stack.worker_is_alive(chdb_warehouse, "it's", 60)


@pytest.mark.integration
def test_topics_command_creates_the_topics_on_a_broker(broker_factory: BrokerFactory) -> None:
    broker = broker_factory("noida")
    broker.start()
    env = {**os.environ, "CSI_BOOTSTRAP": broker.bootstrap}
    for _ in range(2):  # the second run finds them all and changes nothing
        done = subprocess.run(
            [sys.executable, str(STACK_PY), "topics", "--attempts", "1"],
            env=env, capture_output=True, text=True, timeout=120, cwd=ROOT,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "topics: ready" in done.stdout
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        described = admin.describe_topics([spec.name for spec in ALL_TOPICS])
    finally:
        admin.close()
    counts = {topic["name"]: len(topic["partitions"]) for topic in described}
    assert counts == {spec.name: spec.partitions for spec in ALL_TOPICS}


# -------------------------------------------------------------------- docker compose


def _compose_command() -> list[str] | None:
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for command in candidates:
        probe = subprocess.run(
            [*command, "version", "--short"], capture_output=True, text=True, timeout=30
        )
        if probe.returncode == 0 and probe.stdout.strip().lstrip("v").startswith("2"):
            return command
    return None


def test_docker_compose_accepts_the_file(tmp_path: Path) -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("no Docker Compose v2 here (no `docker compose` plugin); YAML checked above")
    env_file = tmp_path / "env"
    shutil.copy(ENV_EXAMPLE, env_file)
    for profile in ([], ["--profile", "simulator"]):
        done = subprocess.run(
            [*command, "--env-file", str(env_file), "-f", str(COMPOSE), *profile, "config", "-q"],
            capture_output=True, text=True, timeout=60, cwd=DEPLOY,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
