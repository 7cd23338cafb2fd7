"""dashboards.push and dashboards.rules: uploading to Grafana, and the alert rules.

Grafana itself cannot run on this machine (no Docker, no Grafana server or
package), so `push` is tested against `FakeGrafana`: a REAL HTTP server on
127.0.0.1 (http.server in a thread, on a free port) that answers the Grafana
HTTP API endpoints `grafana-client` calls, the way Grafana 10/11 answers them,
checks every request (bearer token, the fields Grafana requires) and records
it. What it cannot show is how a real Grafana renders the dashboards or
evaluates the rules; the rules' SQL is run on chdb against the real schema.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from dashboards.model import DATASOURCE_UID, Dashboard, Panel
from dashboards.push import PushError, PushReport, push
from dashboards.rules import (
    PROVISIONING_PATH,
    RULE_FOLDER,
    RULE_FOLDER_UID,
    alert_rules,
    folder_uid,
    main,
    provisioning_up_to_date,
    provisioning_yaml,
    write_provisioning,
)
from pipeline.alerts import Alert, Case
from pipeline.warehouse import (
    ALERTS_COLUMNS,
    ALERTS_TABLE,
    CASES_COLUMNS,
    CASES_TABLE,
    alert_row,
    case_row,
    create_schema,
    open_warehouse,
)

TOKEN = "glsa_s3cr3t-token-for-tests_0123456789"
CLICKHOUSE_PLUGIN = "grafana-clickhouse-datasource"
_UID = re.compile(r"^[a-zA-Z0-9_-]{1,40}$")


# --------------------------------------------------------------------------- the fake


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeGrafana:
    """A stand-in for Grafana (which cannot run here: no Docker, no server):
    a real HTTP server imitating the endpoints `dashboards.push` uses.

    - ``GET /api/health`` (no auth): database and version (hidden with
      `hide_version`, as ``[auth.anonymous] hide_version`` does);
    - ``GET /api/frontend/settings``: buildInfo.version;
    - ``GET /api/datasources/uid/:uid``, ``GET /api/plugins/:id/settings``;
    - ``GET /api/folders``, ``GET /api/folders/:uid``, ``POST /api/folders``
      (409 on a title or uid that exists);
    - ``POST /api/dashboards/db``: version 1 when new, +1 on every overwrite,
      412 on a version mismatch without overwrite or on a title clash;
    - ``GET/POST /api/v1/provisioning/alert-rules``, ``GET/PUT .../:uid``:
      provenance "" with ``X-Disable-Provenance``, "api" without; a rule with
      provenance "file" cannot be changed (400).

    Every request but health must carry ``Authorization: Bearer <token>``
    (else 401); `forbid_writes` answers 403 to POST/PUT like a Viewer's token.
    Request bodies lacking a field Grafana requires get 400 and are listed in
    `violations`, which every test expects to stay empty. `fail` maps
    (method, path) to a forced (status, body); requests to `hang` paths wait
    until the server stops. `prefix` serves under a sub-path (root_url).
    """

    token: str = TOKEN
    version: str = "11.2.0"
    hide_version: bool = False
    datasource_type: str | None = CLICKHOUSE_PLUGIN
    """None: the datasource does not exist."""
    plugin_installed: bool = True
    forbid_writes: bool = False
    prefix: str = ""
    fail: dict[tuple[str, str], tuple[int, Any]] = field(default_factory=dict)
    hang: set[str] = field(default_factory=set)
    folders: dict[str, dict[str, Any]] = field(default_factory=dict)
    dashboards: dict[str, dict[str, Any]] = field(default_factory=dict)
    rules: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[Seen] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    url: str = ""
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _next_id: int = 1

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def add_folder(self, uid: str, title: str) -> None:
        self.folders[uid] = {"id": self.new_id(), "uid": uid, "title": title, "version": 1}

    def calls(self, method: str, path_start: str) -> list[Seen]:
        return [s for s in self.requests if s.method == method and s.path.startswith(path_start)]

    # ------------------------------------------------------------------ dispatch

    def respond(
        self, method: str, target: str, headers: dict[str, str], raw: bytes
    ) -> tuple[int, Any]:
        path = urlsplit(target).path
        if self.prefix:
            if not path.startswith(self.prefix + "/"):
                return 404, {"message": "Not found"}
            path = path[len(self.prefix) :]
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                return self.bad(f"{method} {path}: body is not JSON")
        with self.lock:
            self.requests.append(Seen(method, path, headers, body))
        if path in self.hang:
            self.release.wait(timeout=5)
        if (method, path) in self.fail:
            return self.fail[(method, path)]
        if method == "GET" and path == "/api/health":
            health: dict[str, Any] = {"commit": "0123abc", "database": "ok"}
            if not self.hide_version:
                health["version"] = self.version
            return 200, health
        if headers.get("authorization") != f"Bearer {self.token}":
            return 401, {"message": "Invalid API key", "messageId": "api-keys.invalid"}
        if self.forbid_writes and method in ("POST", "PUT", "DELETE"):
            return 403, {"message": "You'll need additional permissions to perform this action."}
        with self.lock:
            return self.route(method, path, headers, body)

    def bad(self, violation: str) -> tuple[int, Any]:
        self.violations.append(violation)
        return 400, {"message": violation}

    def route(self, method: str, path: str, headers: dict[str, str], body: Any) -> tuple[int, Any]:
        if method == "GET" and path == "/api/frontend/settings":
            return 200, {"buildInfo": {"version": self.version, "commit": "0123abc"}}
        if method == "GET" and path == f"/api/datasources/uid/{DATASOURCE_UID}":
            if self.datasource_type is None:
                return 404, {"message": "Data source not found"}
            return 200, {"id": 1, "uid": DATASOURCE_UID, "type": self.datasource_type}
        if method == "GET" and (match := re.fullmatch(r"/api/plugins/([^/]+)/settings", path)):
            if match.group(1) == CLICKHOUSE_PLUGIN and self.plugin_installed:
                return 200, {"id": CLICKHOUSE_PLUGIN, "type": "datasource", "enabled": True}
            return 404, {"message": "Plugin not found, no installed plugin with that id"}
        if path == "/api/folders" and method == "GET":
            return 200, [{k: f[k] for k in ("id", "uid", "title")} for f in self.folders.values()]
        if path == "/api/folders" and method == "POST":
            return self.create_folder(body)
        if method == "GET" and (match := re.fullmatch(r"/api/folders/([^/]+)", path)):
            found = self.folders.get(match.group(1))
            if found is None:
                return 404, {"message": "folder not found", "status": "not-found"}
            return 200, found
        if method == "POST" and path == "/api/dashboards/db":
            return self.save_dashboard(body)
        rules = "/api/v1/provisioning/alert-rules"
        if path == rules and method == "GET":
            return 200, list(self.rules.values())
        if path == rules and method == "POST":
            return self.save_rule(None, body, headers)
        if match := re.fullmatch(rf"{rules}/([^/]+)", path):
            uid = match.group(1)
            if method == "GET":
                found = self.rules.get(uid)
                return (404, None) if found is None else (200, found)
            if method == "PUT":
                return self.save_rule(uid, body, headers)
        return self.bad(f"unexpected request {method} {path}")

    # ------------------------------------------------------------------ handlers

    def create_folder(self, body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict) or not body.get("title"):
            return self.bad("POST /api/folders without a title")
        uid = body.get("uid")
        if uid is not None and not _UID.match(uid):
            return self.bad(f"POST /api/folders with an invalid uid {uid!r}")
        if uid in self.folders:
            return 409, {"message": "a folder with the same uid already exists"}
        if any(f["title"] == body["title"] for f in self.folders.values()):
            return 409, {"message": "a folder or dashboard with the same name already exists"}
        uid = uid or f"gen{self.new_id()}"
        self.add_folder(uid, body["title"])
        return 200, self.folders[uid]

    def save_dashboard(self, body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("dashboard"), dict):
            return self.bad("POST /api/dashboards/db without a dashboard object")
        dashboard = body["dashboard"]
        uid, title = dashboard.get("uid"), dashboard.get("title")
        if not isinstance(uid, str) or not _UID.match(uid):
            return self.bad(f"dashboard without a valid uid: {uid!r}")
        if not title:
            return self.bad(f"dashboard {uid} without a title")
        if body.get("overwrite") is not True:
            return self.bad(f"dashboard {uid} pushed without overwrite: true")
        folder = body.get("folderUid")
        if not folder:
            return self.bad(f"dashboard {uid} pushed without folderUid")
        if folder not in self.folders:
            return 400, {"message": "folder not found", "status": "not-found"}
        if dashboard.get("id") is not None:
            return self.bad(f"dashboard {uid} pushed with an id; Grafana matches ids, not uids")
        for other_uid, other in self.dashboards.items():
            same_place = other["folderUid"] == folder and other["dashboard"]["title"] == title
            if other_uid != uid and same_place:
                message = "A dashboard with the same name in the folder already exists"
                return 412, {"message": message, "status": "name-exists"}
        stored = self.dashboards.get(uid)
        version = 1 if stored is None else stored["version"] + 1
        entry_id = self.new_id() if stored is None else stored["id"]
        self.dashboards[uid] = {
            "id": entry_id,
            "dashboard": {**dashboard, "id": entry_id, "version": version},
            "version": version,
            "folderUid": folder,
            "message": body.get("message", ""),
        }
        slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
        return 200, {
            "id": entry_id, "uid": uid, "url": f"/d/{uid}/{slug}", "status": "success",
            "version": version, "slug": slug,
        }  # fmt: skip

    def save_rule(
        self, path_uid: str | None, body: Any, headers: dict[str, str]
    ) -> tuple[int, Any]:
        where = "PUT" if path_uid else "POST"
        if not isinstance(body, dict):
            return self.bad(f"{where} alert rule without a JSON object")
        required = (
            "uid", "title", "condition", "data", "folderUID", "ruleGroup", "for",
            "noDataState", "execErrState", "orgID",
        )  # fmt: skip
        missing = [name for name in required if body.get(name) in (None, "", [])]
        if missing:
            return self.bad(f"{where} alert rule {body.get('uid')!r} lacks {missing}")
        uid = body["uid"]
        if not _UID.match(uid):
            return self.bad(f"alert rule uid {uid!r} is not a valid uid")
        refs = [item.get("refId") for item in body["data"]]
        if body["condition"] not in refs:
            return self.bad(f"alert rule {uid}: condition {body['condition']} is not a refId")
        for item in body["data"]:
            if not item.get("datasourceUid") or not isinstance(item.get("model"), dict):
                return self.bad(f"alert rule {uid}: query {item.get('refId')} is incomplete")
        if body["folderUID"] not in self.folders:
            return 400, {"message": f"folder {body['folderUID']} does not exist"}
        provenance = "" if headers.get("x-disable-provenance") == "true" else "api"
        stored = self.rules.get(uid)
        if path_uid is None:
            if stored is not None:
                self.violations.append(f"POST of alert rule {uid}, which exists: a duplicate")
                return 409, {"message": "conflict: rule with this uid already exists"}
            self.rules[uid] = {**body, "id": self.new_id(), "provenance": provenance}
            return 201, self.rules[uid]
        if uid != path_uid:
            return self.bad(f"PUT /alert-rules/{path_uid} with a body for {uid}")
        if stored is None:
            return 404, None
        if stored["provenance"] == "file":
            return 400, {"message": f"cannot change provenance from 'file' to '{provenance}'"}
        self.rules[uid] = {**body, "id": stored["id"], "provenance": provenance}
        return 200, self.rules[uid]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    fake: FakeGrafana

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        # a client that gave up (the timeout test) closes its end first: not a fault
        if not isinstance(error, ConnectionError):
            self.fake.violations.append(f"the fake itself failed: {error!r}")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        # answer at once: headers and body are two writes, which Nagle would hold back
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        headers = {name.lower(): value for name, value in self.headers.items()}
        status, payload = self.server.fake.respond(self.command, self.path, headers, raw)
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def running(fake: FakeGrafana) -> Iterator[FakeGrafana]:
    server = _Server(("127.0.0.1", 0), _Handler)
    server.fake = fake
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}{fake.prefix}"
    try:
        yield fake
    finally:
        fake.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def grafana() -> Iterator[FakeGrafana]:
    with running(FakeGrafana()) as fake:
        yield fake
    assert fake.violations == [], "requests Grafana would reject"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# --------------------------------------------------------------------------- dashboards

PANEL = Panel(
    title="Open alerts",
    kind="stat",
    sql="SELECT count() AS open_alerts FROM csi.alerts FINAL WHERE status = 'open'",
    columns=("open_alerts",),
    w=6,
    h=4,
    x=0,
    y=0,
)
LOCAL_DASHBOARDS = (
    Dashboard("csi-test-overview", "Test overview", folder="CSI overview", panels=(PANEL,)),
    Dashboard("csi-test-dealers", "Test dealers", folder="Dealer network", panels=(PANEL,)),
)
RULE_UIDS = [rule["uid"] for rule in alert_rules()]


def assert_token_absent(error: BaseException) -> None:
    seen: BaseException | None = error
    while seen is not None:
        assert TOKEN not in str(seen)
        assert TOKEN not in repr(seen)
        seen = seen.__cause__ or seen.__context__


# --------------------------------------------------------------------------- push


def test_first_push_creates_folders_dashboards_and_rules(grafana: FakeGrafana) -> None:
    report = push(grafana.url, TOKEN, LOCAL_DASHBOARDS, alert_rules(), timeout=5)

    assert report.grafana_version == "11.2.0"
    assert report.dashboards == {"csi-test-overview": 1, "csi-test-dealers": 1}
    assert report.folders_created == ["CSI overview", "Dealer network", RULE_FOLDER]
    assert report.folders == {
        "CSI overview": "csi-overview",
        "Dealer network": "csi-dealer-network",
        RULE_FOLDER: "csi-alert-rules",
    }
    assert report.rules_created == RULE_UIDS
    assert report.rules_updated == [] and report.rules_skipped == []
    assert grafana.violations == []

    assert {uid: f["title"] for uid, f in grafana.folders.items()} == {
        "csi-overview": "CSI overview",
        "csi-dealer-network": "Dealer network",
        "csi-alert-rules": RULE_FOLDER,
    }
    stored = grafana.dashboards["csi-test-overview"]
    assert stored["folderUid"] == "csi-overview"
    assert grafana.dashboards["csi-test-dealers"]["folderUid"] == "csi-dealer-network"
    assert stored["dashboard"]["panels"][0]["targets"][0]["rawSql"] == PANEL.sql
    assert stored["message"] == "csi dashboards push"
    assert set(grafana.rules) == set(RULE_UIDS)
    assert {rule["folderUID"] for rule in grafana.rules.values()} == {"csi-alert-rules"}
    assert {rule["provenance"] for rule in grafana.rules.values()} == {""}
    # health first, version before anything is written
    assert grafana.requests[0].path == "/api/health"
    assert TOKEN not in repr(report) and TOKEN not in report.summary()


def test_second_push_makes_new_versions_and_updates_rules_in_place(
    grafana: FakeGrafana,
) -> None:
    push(grafana.url, TOKEN, LOCAL_DASHBOARDS, alert_rules(), timeout=5)
    first_requests = len(grafana.requests)
    folders_before = dict(grafana.folders)
    rule_ids = {uid: rule["id"] for uid, rule in grafana.rules.items()}

    report = push(grafana.url, TOKEN, LOCAL_DASHBOARDS, alert_rules(), timeout=5)

    assert report.dashboards == {"csi-test-overview": 2, "csi-test-dealers": 2}
    assert report.folders_created == []
    assert report.rules_created == [] and report.rules_updated == RULE_UIDS
    assert grafana.folders == folders_before
    assert set(grafana.dashboards) == {"csi-test-overview", "csi-test-dealers"}
    assert {uid: rule["id"] for uid, rule in grafana.rules.items()} == rule_ids
    second = grafana.requests[first_requests:]
    assert not [s for s in second if s.method == "POST" and "alert-rules" in s.path]
    assert [s.path for s in second if s.method == "PUT"] == [
        f"/api/v1/provisioning/alert-rules/{uid}" for uid in RULE_UIDS
    ]
    assert not [s for s in second if s.method == "POST" and s.path == "/api/folders"]
    assert grafana.violations == []


def test_every_request_is_authenticated_and_rules_disable_provenance(
    grafana: FakeGrafana,
) -> None:
    push(grafana.url, TOKEN, LOCAL_DASHBOARDS, alert_rules(), timeout=5)
    for seen in grafana.requests:
        assert seen.headers.get("authorization") == f"Bearer {TOKEN}", seen.path
    for seen in grafana.calls("POST", "/api/v1/provisioning/alert-rules"):
        assert seen.headers.get("x-disable-provenance") == "true"
    for seen in grafana.calls("POST", "/api/dashboards/db"):
        assert seen.body["overwrite"] is True
        assert seen.body["dashboard"]["id"] is None


def test_folders_with_the_same_title_are_reused(grafana: FakeGrafana) -> None:
    grafana.add_folder("made-by-hand", RULE_FOLDER)
    report = push(grafana.url, TOKEN, LOCAL_DASHBOARDS, alert_rules(), timeout=5)
    assert RULE_FOLDER not in report.folders_created
    assert report.folders[RULE_FOLDER] == "made-by-hand"
    assert {rule["folderUID"] for rule in grafana.rules.values()} == {"made-by-hand"}
    assert grafana.violations == []


def test_rules_provisioned_from_a_file_are_left_alone(grafana: FakeGrafana) -> None:
    grafana.add_folder(RULE_FOLDER_UID, RULE_FOLDER)
    first = alert_rules()[0]
    grafana.rules[first["uid"]] = {**first, "id": 99, "provenance": "file"}
    report = push(grafana.url, TOKEN, [], alert_rules(), timeout=5)
    assert report.rules_skipped == [first["uid"]]
    assert report.rules_created == RULE_UIDS[1:]
    assert grafana.rules[first["uid"]]["provenance"] == "file"
    assert "provisioned from file" in report.summary()


def test_grafana_under_a_sub_path() -> None:
    with running(FakeGrafana(prefix="/grafana")) as fake:
        report = push(fake.url + "/", TOKEN, LOCAL_DASHBOARDS, alert_rules(), timeout=5)
    assert report.dashboards == {"csi-test-overview": 1, "csi-test-dealers": 1}
    assert fake.violations == []


def test_hidden_version_is_read_from_build_info() -> None:
    with running(FakeGrafana(hide_version=True, version="10.4.3")) as fake:
        report = push(fake.url, TOKEN, LOCAL_DASHBOARDS, [], timeout=5)
    assert report.grafana_version == "10.4.3"
    assert fake.calls("GET", "/api/frontend/settings")


def test_wrong_token_is_refused_without_showing_it(grafana: FakeGrafana) -> None:
    wrong = TOKEN + "-revoked"
    with pytest.raises(PushError, match=r"HTTP 401") as caught:
        push(grafana.url, wrong, LOCAL_DASHBOARDS, alert_rules(), timeout=5)
    assert "--token" in str(caught.value)
    assert wrong not in str(caught.value)
    assert_token_absent(caught.value)
    assert grafana.dashboards == {} and grafana.folders == {}


def test_token_without_admin_rights_is_refused(grafana: FakeGrafana) -> None:
    grafana.forbid_writes = True
    with pytest.raises(PushError, match=r"HTTP 403.*Admin") as caught:
        push(grafana.url, TOKEN, LOCAL_DASHBOARDS, alert_rules(), timeout=5)
    assert_token_absent(caught.value)


def test_empty_token_is_refused_before_any_request(grafana: FakeGrafana) -> None:
    with pytest.raises(PushError, match="--token"):
        push(grafana.url, "", LOCAL_DASHBOARDS, alert_rules(), timeout=5)
    assert grafana.requests == []


def test_grafana_9_is_refused_naming_the_version() -> None:
    with (
        running(FakeGrafana(version="9.5.3")) as fake,
        pytest.raises(PushError, match=r"version 9\.5\.3.*Grafana 10 or newer"),
    ):
        push(fake.url, TOKEN, LOCAL_DASHBOARDS, alert_rules(), timeout=5)
    assert [s.method for s in fake.requests] == ["GET"]


def test_missing_datasource_gives_the_provisioning_hint() -> None:
    with running(FakeGrafana(datasource_type=None)) as fake, pytest.raises(PushError) as caught:
        push(fake.url, TOKEN, LOCAL_DASHBOARDS, alert_rules(), timeout=5)
    message = str(caught.value)
    assert DATASOURCE_UID in message
    assert "deploy/grafana/provisioning/datasources" in message
    assert fake.dashboards == {}


def test_datasource_of_another_type_is_refused() -> None:
    with (
        running(FakeGrafana(datasource_type="vertamedia-clickhouse-datasource")) as fake,
        pytest.raises(PushError, match="vertamedia-clickhouse-datasource"),
    ):
        push(fake.url, TOKEN, LOCAL_DASHBOARDS, alert_rules(), timeout=5)


def test_missing_clickhouse_plugin_says_how_to_install_it() -> None:
    with (
        running(FakeGrafana(plugin_installed=False)) as fake,
        pytest.raises(PushError, match=rf"GF_INSTALL_PLUGINS={CLICKHOUSE_PLUGIN}"),
    ):
        push(fake.url, TOKEN, LOCAL_DASHBOARDS, alert_rules(), timeout=5)


def test_server_down_names_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(PushError) as caught:
        push(url, TOKEN, LOCAL_DASHBOARDS, alert_rules(), timeout=5)
    assert url in str(caught.value)
    assert "cannot reach Grafana" in str(caught.value)
    assert_token_absent(caught.value)


def test_credentials_in_the_url_are_not_repeated() -> None:
    url = f"http://admin:hunter2@127.0.0.1:{free_port()}"
    with pytest.raises(PushError) as caught:
        push(url, TOKEN, LOCAL_DASHBOARDS, alert_rules(), timeout=5)
    assert "hunter2" not in str(caught.value)


def test_a_grafana_that_does_not_answer_times_out() -> None:
    with (
        running(FakeGrafana(hang={"/api/health"})) as fake,
        pytest.raises(PushError, match=r"did not answer within 0\.3 s"),
    ):
        push(fake.url, TOKEN, LOCAL_DASHBOARDS, alert_rules(), timeout=0.3)


def test_other_http_errors_name_status_and_message(grafana: FakeGrafana) -> None:
    grafana.fail[("POST", "/api/dashboards/db")] = (500, {"message": "database is locked"})
    with pytest.raises(PushError, match=r"HTTP 500 while saving dashboard.*database is locked"):
        push(grafana.url, TOKEN, LOCAL_DASHBOARDS, alert_rules(), timeout=5)


def test_a_title_clash_in_grafana_is_reported(grafana: FakeGrafana) -> None:
    grafana.add_folder("csi-overview", "CSI overview")
    grafana.dashboards["someone-elses"] = {
        "id": 7,
        "dashboard": {"uid": "someone-elses", "title": "Test overview"},
        "version": 3,
        "folderUid": "csi-overview",
    }
    with pytest.raises(PushError, match=r"HTTP 412.*same name"):
        push(grafana.url, TOKEN, LOCAL_DASHBOARDS, [], timeout=5)


def test_not_grafana_at_all(grafana: FakeGrafana) -> None:
    grafana.fail[("GET", "/api/health")] = (404, {"message": "Not found"})
    with pytest.raises(PushError, match=r"HTTP 404 while checking health.*root URL"):
        push(grafana.url, TOKEN, LOCAL_DASHBOARDS, [], timeout=5)


def test_duplicate_uids_are_refused_before_any_request(grafana: FakeGrafana) -> None:
    twice = (LOCAL_DASHBOARDS[0], LOCAL_DASHBOARDS[0])
    with pytest.raises(ValueError, match="csi-test-overview"):
        push(grafana.url, TOKEN, twice, [], timeout=5)
    rules = alert_rules()
    with pytest.raises(ValueError, match=rules[0]["uid"]):
        push(grafana.url, TOKEN, [], [rules[0], rules[0]], timeout=5)
    assert grafana.requests == []


def test_push_the_real_dashboards(grafana: FakeGrafana) -> None:
    definitions = pytest.importorskip("dashboards.definitions")
    dashboards: tuple[Dashboard, ...] = definitions.DASHBOARDS
    assert dashboards, "dashboards.definitions.DASHBOARDS is empty"

    report: PushReport = push(grafana.url, TOKEN, dashboards, alert_rules(), timeout=5)

    assert grafana.violations == []
    assert report.dashboards == {d.uid: 1 for d in dashboards}
    folder_titles = list(dict.fromkeys([d.folder for d in dashboards] + [RULE_FOLDER]))
    assert report.folders_created == folder_titles
    for d in dashboards:
        stored = grafana.dashboards[d.uid]
        assert stored["folderUid"] == folder_uid(d.folder)
        assert stored["dashboard"]["title"] == d.title
    assert report.rules_created == RULE_UIDS


# --------------------------------------------------------------------------- rules


def test_folder_uids_are_stable_and_valid() -> None:
    assert folder_uid("CSI alerts") == "csi-alerts"
    assert folder_uid(RULE_FOLDER) == "csi-alert-rules" == RULE_FOLDER_UID
    assert folder_uid("Dealer network") == "csi-dealer-network"
    assert folder_uid("CSI") == "csi"
    long = folder_uid("A very long folder title that goes on and on for ever")
    assert _UID.match(long) and len(long) <= 40
    with pytest.raises(ValueError):
        folder_uid("—")


def test_rules_are_well_formed() -> None:
    rules = alert_rules()
    uids = [rule["uid"] for rule in rules]
    assert len(uids) == len(set(uids)) == 4
    titles = [rule["title"] for rule in rules]
    assert len(set(titles)) == 4
    for rule in rules:
        assert _UID.match(rule["uid"])
        assert rule["folderUID"] == RULE_FOLDER_UID and rule["ruleGroup"] == "csi"
        assert rule["condition"] == "C"
        assert (rule["noDataState"], rule["execErrState"], rule["for"]) == ("OK", "Error", "5m")
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert set(rule["annotations"]) == {"summary", "description"}
        query, reduce, threshold = rule["data"]
        assert query["refId"] == "A" and query["datasourceUid"] == DATASOURCE_UID
        model = query["model"]
        assert (model["format"], model["editorType"], model["refId"]) == (1, "sql", "A")
        assert model["datasource"] == {"type": CLICKHOUSE_PLUGIN, "uid": DATASOURCE_UID}
        assert re.search(r"\bFROM csi\.(alerts|cases) FINAL\b", model["rawSql"])
        assert (reduce["refId"], reduce["datasourceUid"]) == ("B", "__expr__")
        assert reduce["model"]["type"] == "reduce" and reduce["model"]["expression"] == "A"
        assert (threshold["refId"], threshold["datasourceUid"]) == ("C", "__expr__")
        assert threshold["model"]["type"] == "threshold"
        assert threshold["model"]["expression"] == "B"
        assert threshold["model"]["conditions"][0]["evaluator"] == {"type": "gt", "params": [0]}
    assert alert_rules() == rules and alert_rules() is not rules


def test_provisioning_yaml_parses_to_the_file_format() -> None:
    text = provisioning_yaml()
    assert text.startswith("# Generated by")
    assert "$" not in text, "Grafana would expand $… as an environment variable"
    document = yaml.safe_load(text)
    assert document["apiVersion"] == 1
    [group] = document["groups"]
    assert (group["orgId"], group["name"], group["folder"], group["interval"]) == (
        1, "csi", RULE_FOLDER, "1m",
    )  # fmt: skip
    api_rules = alert_rules()
    assert [r["uid"] for r in group["rules"]] == [r["uid"] for r in api_rules]
    for file_rule, api_rule in zip(group["rules"], api_rules, strict=True):
        assert not {"orgID", "folderUID", "ruleGroup"} & set(file_rule)
        assert file_rule == {
            k: v for k, v in api_rule.items() if k not in ("orgID", "folderUID", "ruleGroup")
        }
        assert re.search(r"FROM csi\.(alerts|cases) FINAL", file_rule["data"][0]["model"]["rawSql"])


def test_committed_provisioning_file_is_up_to_date() -> None:
    assert PROVISIONING_PATH.is_file(), "run `python -m dashboards.rules` and commit the file"
    assert provisioning_up_to_date(), "run `python -m dashboards.rules` and commit the file"
    assert main(["--check"]) == 0


def test_check_fails_on_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "alerting" / "csi-alerts.yaml"
    assert main(["--check", "--path", str(path)]) == 1  # missing
    assert write_provisioning(path) == path
    assert main(["--check", "--path", str(path)]) == 0
    path.write_text(path.read_text().replace("for: 5m", "for: 1m"))
    assert main(["--check", "--path", str(path)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert main(["--path", str(path)]) == 0
    assert provisioning_up_to_date(path)


# ------------------------------------------------------------- the rules' SQL on chdb

NOW = datetime.now(UTC).replace(microsecond=0)


def make_alert(alert_id: str, kind: str, status: str) -> Alert:
    at = NOW - timedelta(days=2)
    return Alert(
        alert_id=alert_id, kind=kind, status=status, scope="dealer", key="D001",
        region="North", brand="Astra", department="service", metric="csi",
        detected_at=at, updated_at=at if status == "open" else NOW, baseline=820.0,
        current=700.0, n=30, method="cusum", statistic=12.0, threshold=11.0,
        chance_per_year=0.5, message=f"{kind} at D001",
    )  # fmt: skip


def make_case(case_id: str, status: str, contact_due_at: datetime, seq: int = 1) -> Case:
    opened = contact_due_at - timedelta(hours=24)
    return Case(
        case_id=case_id, dealer_id="D001", region="North", brand="Astra",
        department="service", customer_ref="c1", reasons=["overall"], source_event_id="e1",
        opened_at=opened, contact_due_at=contact_due_at,
        resolve_due_at=opened + timedelta(hours=168), status=status, seq=seq,
        updated_at=opened,
    )  # fmt: skip


def test_rule_queries_count_what_they_say_on_chdb(tmp_path: Path) -> None:
    alerts = [
        make_alert("d1", "drop", "open"),
        make_alert("d2", "drop", "open"),
        make_alert("d2", "drop", "closed"),  # closed later: FINAL keeps the closed row
        make_alert("d3", "drop", "open"),
        make_alert("h1", "hot", "open"),  # hot alerts are watched through their cases
        make_alert("s1", "complaint_sla", "open"),
        make_alert("s2", "complaint_sla", "closed"),
        *(make_alert(f"m{i}", "mystery_shop", "open") for i in range(3)),
    ]
    cases = [
        make_case("c1", "open", NOW - timedelta(hours=3)),  # overdue
        make_case("c2", "open", NOW + timedelta(hours=3)),  # not due yet
        make_case("c3", "open", NOW - timedelta(hours=5)),
        make_case("c3", "contacted", NOW - timedelta(hours=5), seq=2),  # contacted in time
        make_case("c4", "open", NOW - timedelta(days=3)),  # overdue
    ]
    expected = {
        "csi-open-drop-alerts": 2,
        "csi-hot-cases-overdue": 2,
        "csi-complaint-sla-breaches": 1,
        "csi-failed-mystery-shops": 3,
    }
    warehouse = open_warehouse(f"chdb://{tmp_path / 'warehouse'}")
    try:
        create_schema(warehouse)
        warehouse.insert(ALERTS_TABLE, ALERTS_COLUMNS, [alert_row(a) for a in alerts])
        warehouse.insert(CASES_TABLE, CASES_COLUMNS, [case_row(c) for c in cases])
        counts = {}
        for rule in alert_rules():
            _, rows = warehouse.query(rule["data"][0]["model"]["rawSql"])
            [(counts[rule["uid"]],)] = rows
    finally:
        warehouse.close()
    assert counts == expected
