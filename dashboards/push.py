"""Upload the dashboards and alert rules to a running Grafana over its HTTP API.

For a Grafana that is not provisioned from this repository's files (the docker
compose stack mounts deploy/grafana/provisioning instead). `push` talks to it
with `grafana-client`, in this order, and stops at the first problem with a
`PushError` that says what to do:

1. ``GET /api/health``: reachable, database ok, version 10 or newer (the
   version comes from ``/api/frontend/settings`` when the health answer hides it);
2. ``GET /api/datasources/uid/csi-clickhouse`` and
   ``GET /api/plugins/grafana-clickhouse-datasource/settings``: every panel and
   rule queries that datasource through that plugin;
3. each dashboard's folder and the rule folder: found by their stable uid
   (`dashboards.rules.folder_uid`), else by title, else created;
4. ``POST /api/dashboards/db`` with the dashboard's own uid and
   ``overwrite: true``: a re-push saves a new version of the same dashboard;
5. ``/api/v1/provisioning/alert-rules``: each rule is read by uid, then
   updated (PUT) or created (POST), with ``X-Disable-Provenance`` so the rules
   stay editable in the UI like the dashboards. A rule that Grafana loaded from
   a provisioning file cannot be changed over the API; it is left alone and
   listed in `PushReport.rules_skipped`.

The token needs the Admin role (a service account's token). It is sent as a
bearer token and never appears in logs, messages or the report.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import niquests
from grafana_client.api import GrafanaApi
from grafana_client.client import (
    GrafanaClientError,
    GrafanaException,
    GrafanaServerError,
    GrafanaTimeoutError,
)

from dashboards.model import DATASOURCE, DATASOURCE_UID, Dashboard
from dashboards.rules import RULE_FOLDER, RULE_FOLDER_UID, folder_uid

logger = logging.getLogger(__name__)

MIN_GRAFANA_MAJOR = 10
CLICKHOUSE_PLUGIN = DATASOURCE["type"]
PUSH_MESSAGE = "csi dashboards push"
"""The version message Grafana shows in a dashboard's history."""
REQUIRED_RULE_FIELDS = ("uid", "title", "condition", "data", "folderUID", "ruleGroup")
_MESSAGE_MAX = 300

DATASOURCE_HINT = (
    f"provision it with uid {DATASOURCE_UID!r} and type {CLICKHOUSE_PLUGIN!r} "
    "(deploy/grafana/provisioning/datasources, then restart Grafana), or add it under "
    f"Connections → Data sources and set its uid to {DATASOURCE_UID!r}"
)
PLUGIN_HINT = (
    f"install it (GF_INSTALL_PLUGINS={CLICKHOUSE_PLUGIN}, or "
    f"`grafana cli plugins install {CLICKHOUSE_PLUGIN}`) and restart Grafana"
)


class PushError(RuntimeError):
    """Grafana could not be reached, refused the push, or is not ready for it."""


@dataclass(frozen=True)
class PushReport:
    """What one push did."""

    grafana_version: str
    dashboards: dict[str, int]
    """Dashboard uid → the version Grafana saved (1 when new, one more on every push)."""
    folders_created: list[str]
    """Titles of the folders this push created."""
    rules_created: list[str]
    """Uids of the alert rules created (POST)."""
    rules_updated: list[str]
    """Uids of the alert rules updated in place (PUT)."""
    rules_skipped: list[str] = field(default_factory=list)
    """Uids of rules Grafana provisioned from a file, which the API may not change."""
    folders: dict[str, str] = field(default_factory=dict)
    """Folder title → the uid used (the stable one, or an existing folder's)."""

    def summary(self) -> str:
        """A few lines for the terminal."""
        lines = [
            f"Grafana {self.grafana_version}: "
            f"{len(self.dashboards)} dashboard(s), "
            f"{len(self.rules_created)} rule(s) created, "
            f"{len(self.rules_updated)} rule(s) updated",
        ]
        lines += [f"  dashboard {uid}: version {v}" for uid, v in self.dashboards.items()]
        if self.folders_created:
            lines.append("  folders created: " + ", ".join(self.folders_created))
        if self.rules_skipped:
            lines.append(
                "  rules kept as provisioned from file (not changed): "
                + ", ".join(self.rules_skipped)
            )
        return "\n".join(lines)


def _display_url(url: str) -> str:
    """The URL without any user:password part, for messages."""
    parts = urlsplit(url.strip())
    netloc = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=netloc, query="", fragment="").geturl().rstrip("/")


def _grafana_version_major(version: str) -> int | None:
    match = re.match(r"\s*v?(\d+)\.", version)
    return int(match.group(1)) if match else None


def _connection_reason(error: Exception) -> str:
    match = re.search(r"\[Errno -?\d+\] [^)\]'\"]+", str(error))
    return match.group(0).strip() if match else type(error).__name__


class _Grafana:
    """One push's connection: every call goes through `call`, which turns the
    client's exceptions into `PushError`s naming the URL and the step."""

    def __init__(self, url: str, token: str, timeout: float) -> None:
        self.url = _display_url(url)
        self.timeout = timeout
        self._token = token
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PushError(
                f"not a Grafana URL: {self.url!r} (expected http(s)://host[:port][/path])"
            )
        try:
            port = parts.port
        except ValueError as error:
            raise PushError(f"not a Grafana URL: {self.url!r} ({error})") from None
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        prefix = parts.path.strip("/")
        self.api = GrafanaApi(
            auth=token,
            host=host,
            port=port,
            url_path_prefix=f"{prefix}/" if prefix else "",
            protocol=parts.scheme,
            timeout=timeout,
        )

    def close(self) -> None:
        self.api.client.s.close()

    def _error(self, text: str) -> PushError:
        if self._token:
            text = text.replace(self._token, "***")
        return PushError(text)

    def call(self, action: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``function(*args, **kwargs)``; ``action`` ("saving dashboard x") names the step."""
        try:
            return function(*args, **kwargs)
        except GrafanaTimeoutError as error:
            raise self._error(
                f"Grafana at {self.url} did not answer within {self.timeout:g} s while {action}"
            ) from error
        except (GrafanaClientError, GrafanaServerError) as error:
            raise self._http_error(action, error) from error
        except GrafanaException as error:  # a transport error the client wrapped
            raise self._error(
                f"cannot talk to Grafana at {self.url} while {action}: {error.message}"
            ) from error
        except niquests.exceptions.ConnectionError as error:
            raise self._error(
                f"cannot reach Grafana at {self.url} ({_connection_reason(error)}): "
                "is it running, and is the URL right?"
            ) from error
        except niquests.exceptions.JSONDecodeError as error:
            raise self._error(
                f"{self.url} did not answer JSON while {action}: is this Grafana's URL?"
            ) from error
        except niquests.exceptions.RequestException as error:
            raise self._error(
                f"request to Grafana at {self.url} failed while {action}: {error}"
            ) from error

    def get_or_none(
        self, action: str, function: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        """Like `call`, but None when Grafana answers 404."""
        try:
            return self.call(action, function, *args, **kwargs)
        except PushError as error:
            cause = error.__cause__
            if isinstance(cause, GrafanaClientError) and cause.status_code == 404:
                return None
            raise

    def _http_error(self, action: str, error: GrafanaException) -> PushError:
        status = error.status_code
        if status == 401:
            return self._error(
                f"Grafana refused the token (HTTP 401) at {self.url} while {action}: "
                "check --token (a service-account token of this Grafana that has not expired)"
            )
        if status == 403:
            return self._error(
                f"Grafana refused the token (HTTP 403) at {self.url} while {action}: "
                "its service account needs the Admin role (datasources, folders, dashboards "
                "and alert-rule provisioning)"
            )
        response = error.response
        if isinstance(response, dict):
            message = str(response.get("message") or response)
        else:
            message = str(response or "").strip()
        message = message[:_MESSAGE_MAX] or "(no message)"
        return self._error(
            f"Grafana at {self.url} answered HTTP {status} while {action}: {message}"
        )

    # ---------------------------------------------------------------- the steps

    def version(self) -> str:
        health = self.call(
            f"checking health (GET /api/health; is {self.url} Grafana's root URL?)",
            self.api.client.GET,
            "/health",
        )
        if not isinstance(health, dict):
            raise self._error(
                f"{self.url}/api/health did not answer Grafana's health JSON: "
                "is this Grafana's URL?"
            )
        database = health.get("database", "ok")
        if database != "ok":
            raise self._error(f"Grafana at {self.url} is not healthy: database {database}")
        version = health.get("version")
        if not version:  # hidden from anonymous requests ([auth.anonymous] hide_version)
            build = self.call("reading Grafana's build info", self.api.health.check)
            version = build.get("version") if isinstance(build, dict) else None
        if not version:
            raise self._error(f"Grafana at {self.url} does not tell its version")
        version = str(version)
        major = _grafana_version_major(version)
        if major is None:
            raise self._error(f"cannot read Grafana's version {version!r} at {self.url}")
        if major < MIN_GRAFANA_MAJOR:
            raise self._error(
                f"Grafana at {self.url} is version {version}; the CSI dashboards and alert "
                f"rules need Grafana {MIN_GRAFANA_MAJOR} or newer (dashboard schema 39, "
                "alert-rule provisioning API): upgrade Grafana"
            )
        return version

    def check_datasource(self) -> None:
        datasource = self.get_or_none(
            f"reading datasource {DATASOURCE_UID!r}",
            self.api.datasource.get_datasource_by_uid,
            DATASOURCE_UID,
        )
        if datasource is None:
            raise self._error(
                f"Grafana at {self.url} has no datasource with uid {DATASOURCE_UID!r}, which "
                f"every panel and rule queries: {DATASOURCE_HINT}"
            )
        kind = datasource.get("type") if isinstance(datasource, dict) else None
        if kind != CLICKHOUSE_PLUGIN:
            raise self._error(
                f"datasource {DATASOURCE_UID!r} at {self.url} is of type {kind!r}, not "
                f"{CLICKHOUSE_PLUGIN!r}: {DATASOURCE_HINT}"
            )
        plugin = self.get_or_none(
            f"reading plugin {CLICKHOUSE_PLUGIN!r}",
            self.api.client.GET,
            f"/plugins/{CLICKHOUSE_PLUGIN}/settings",
        )
        if plugin is None:
            raise self._error(
                f"Grafana at {self.url} does not have the ClickHouse plugin "
                f"{CLICKHOUSE_PLUGIN!r} installed: {PLUGIN_HINT}"
            )

    def find_or_create_folder(self, title: str) -> tuple[str, bool]:
        """The folder's uid, and whether it was created now."""
        uid = folder_uid(title)
        if self.get_or_none(f"reading folder {title!r}", self.api.folder.get_folder, uid):
            return uid, False
        # The same title under another uid: made by hand or by file provisioning.
        listing = self.call("listing folders", self.api.folder.get_all_folders)
        for folder in listing if isinstance(listing, list) else []:
            if isinstance(folder, dict) and folder.get("title") == title and folder.get("uid"):
                return str(folder["uid"]), False
        self.call(f"creating folder {title!r}", self.api.folder.create_folder, title, uid)
        logger.info("created Grafana folder %r (uid %s)", title, uid)
        return uid, True

    def folder_exists(self, uid: str) -> bool:
        found = self.get_or_none(f"reading folder {uid!r}", self.api.folder.get_folder, uid)
        return found is not None

    def save_dashboard(self, dashboard: Dashboard, folder: str) -> int:
        body = {
            "dashboard": {**dashboard.to_grafana(), "id": None},
            "folderUid": folder,
            "overwrite": True,
            "message": PUSH_MESSAGE,
        }
        action = f"saving dashboard {dashboard.uid!r} ({dashboard.title})"
        saved = self.call(action, self.api.dashboard.update_dashboard, body)
        if not isinstance(saved, dict) or not isinstance(saved.get("version"), int):
            raise self._error(f"Grafana at {self.url} answered {action} without a version")
        if saved.get("uid", dashboard.uid) != dashboard.uid:
            raise self._error(
                f"Grafana at {self.url} saved dashboard {dashboard.uid!r} under uid "
                f"{saved.get('uid')!r}"
            )
        version: int = saved["version"]
        logger.info("saved dashboard %s, version %d", dashboard.uid, version)
        return version

    def upsert_rule(self, rule: dict[str, Any]) -> str:
        """Create or update one rule; "created", "updated" or "skipped"."""
        uid = str(rule["uid"])
        provisioning = self.api.alertingprovisioning
        existing = self.get_or_none(f"reading alert rule {uid!r}", provisioning.get_alertrule, uid)
        if existing is None:
            self.call(
                f"creating alert rule {uid!r}",
                provisioning.create_alertrule,
                rule,
                disable_provenance=True,
            )
            return "created"
        if isinstance(existing, dict) and existing.get("provenance") == "file":
            logger.warning("alert rule %s is provisioned from a file; left unchanged", uid)
            return "skipped"
        self.call(
            f"updating alert rule {uid!r}",
            provisioning.update_alertrule,
            uid,
            rule,
            disable_provenance=True,
        )
        return "updated"


def _check_inputs(dashboards: Sequence[Dashboard], rules: Sequence[dict[str, Any]]) -> None:
    seen: set[str] = set()
    for dashboard in dashboards:
        if dashboard.uid in seen:
            raise ValueError(f"two dashboards have uid {dashboard.uid!r}")
        seen.add(dashboard.uid)
    seen = set()
    for index, rule in enumerate(rules):
        missing = [name for name in REQUIRED_RULE_FIELDS if not rule.get(name)]
        if missing:
            raise ValueError(f"alert rule {index} ({rule.get('uid')!r}) lacks {missing}")
        if rule["uid"] in seen:
            raise ValueError(f"two alert rules have uid {rule['uid']!r}")
        seen.add(rule["uid"])


def push(
    url: str,
    token: str,
    dashboards: Sequence[Dashboard],
    rules: Sequence[dict[str, Any]],
    *,
    timeout: float = 10.0,
) -> PushReport:
    """Upload ``dashboards`` and alert ``rules`` to the Grafana at ``url``.

    Idempotent: dashboards keep their uids (Grafana saves a new version of
    each), rules are updated by uid, folders are reused. Rules in the rule
    folder (`dashboards.rules.RULE_FOLDER_UID`) go to the "CSI alert rules" folder
    (created when missing); other rules' folders must exist.

    Raises `PushError` (never containing the token) when Grafana cannot be
    reached, refuses the token, is older than 10, lacks the ClickHouse
    datasource or plugin, or rejects a request; `ValueError` for duplicate
    uids or rules missing required fields.
    """
    _check_inputs(dashboards, rules)
    if not token:
        raise PushError(
            "no Grafana token given: pass --token (a service-account token with the Admin role)"
        )
    grafana = _Grafana(url, token, timeout)
    try:
        version = grafana.version()
        grafana.check_datasource()

        folders: dict[str, str] = {}
        created: list[str] = []

        def folder(title: str) -> str:
            if title not in folders:
                folders[title], new = grafana.find_or_create_folder(title)
                if new:
                    created.append(title)
            return folders[title]

        versions = {d.uid: grafana.save_dashboard(d, folder(d.folder)) for d in dashboards}

        outcome: dict[str, list[str]] = {"created": [], "updated": [], "skipped": []}
        for rule in rules:
            body = dict(rule)
            if body["folderUID"] == RULE_FOLDER_UID:
                body["folderUID"] = folder(RULE_FOLDER)
            elif not grafana.folder_exists(str(body["folderUID"])):
                raise PushError(
                    f"alert rule {body['uid']!r} names folder uid {body['folderUID']!r}, "
                    f"which Grafana at {grafana.url} does not have"
                )
            outcome[grafana.upsert_rule(body)].append(str(body["uid"]))
    finally:
        grafana.close()
    return PushReport(
        grafana_version=version,
        dashboards=versions,
        folders_created=created,
        rules_created=outcome["created"],
        rules_updated=outcome["updated"],
        rules_skipped=outcome["skipped"],
        folders=folders,
    )
