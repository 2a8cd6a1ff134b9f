"""A small Label Studio 1.23.2 REST client: the endpoints yolodex uses, plain dicts in and out, errors in words.

Why not `label_studio_sdk` here: the SDK takes ~4 s and 150 MB to import (recipe §1), retries POSTs on its own
(recipe §7: a retried `predictions.create` can store a prediction twice) and returns typed objects that our
converters would have to turn back into the JSON they read. The endpoints below are the ones the SDK calls; the
tests run them against a real server. `connect()` authenticates with the legacy token that
`backend.labeling.server` gives the admin user; a Personal Access Token (a JWT) also works and is exchanged for
short-lived access tokens, so the client can talk to a Label Studio that yolodex did not start.

Every failure is a `LabelStudioError` whose message says what to do: `LabelStudioUnavailable` (nothing answers
at the URL), `LabelStudioAuthError` (401/403: the token is wrong or legacy tokens are off), `LabelStudioNotFound`
(404: e.g. a project deleted in Label Studio), `LabelStudioValidationError` (400 with `validation_errors`: the
fields and what Label Studio needs of them, in words: "Label Studio needs a project title of at least 3
characters; 'ab' has 2"), or the base class with Label Studio's own detail.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx

from backend.labeling.server import LabelStudioError, api_url, load_or_create_credentials
from backend.settings import Settings, get_settings

DEFAULT_TIMEOUT_S = 60.0
# Label Studio's task list pages; 1000 per page keeps a 5 000-task project at a handful of requests (recipe §4.6).
TASK_PAGE_SIZE = 1000
# An access token from a PAT lives 300 s; refresh a little before that.
ACCESS_TOKEN_LIFETIME_S = 240.0


class LabelStudioUnavailable(LabelStudioError):
    """Nothing answers at the Label Studio URL (not started, still starting, or stopped)."""


class LabelStudioAuthError(LabelStudioError):
    """Label Studio refused yolodex's token."""


class LabelStudioNotFound(LabelStudioError):
    """A project, task or storage Label Studio does not have (any more)."""


class LabelStudioValidationError(LabelStudioError):
    """Label Studio refused a value (400 with `validation_errors`); the message says which field needs what."""


# Label Studio's field names, as a person knows them.
FIELD_WORDS = {
    "title": "project title",
    "label_config": "labeling configuration",
    "description": "project description",
    "path": "local-files folder",
    "regex_filter": "file filter",
    "result": "annotation",
}
# Django REST framework's stock messages → what they ask for ({0}: the number in the message).
_DJANGO_RULES = (
    (re.compile(r"Ensure this field has at least (\d+) characters?\."), " of at least {0} characters"),
    (re.compile(r"Ensure this field has no more than (\d+) characters?\."), " of at most {0} characters"),
    (re.compile(r"This field is required\."), ""),
    (re.compile(r"This field may not be (?:blank|null)\."), " that is not empty"),
)


def validation_message(errors: Any, body: Any = None) -> str:
    """Label Studio's `validation_errors` (a dict of field → messages) in words, one clause per message, e.g.
    "Label Studio needs a project title of at least 3 characters ('ab' has 2)".

    Args:
        errors: the `validation_errors` of a 400 response.
        body: the JSON that was sent, to quote the length of a refused text.
    """
    if not isinstance(errors, dict):
        return f"Label Studio refused the request: {_flatten(errors)}"
    clauses = []
    for field, messages in errors.items():
        value = body.get(field) if isinstance(body, dict) else None
        for text in messages if isinstance(messages, list) else [messages]:
            clauses.append(_clause(field, _flatten(text), value))
    return "; ".join(clauses) or "Label Studio refused the request (it gave no reason)"


def _clause(field: str, text: str, value: Any) -> str:
    if field == "non_field_errors":
        return f"Label Studio refused the request: {text}"
    noun = FIELD_WORDS.get(field, field.replace("_", " "))
    for pattern, wording in _DJANGO_RULES:
        match = pattern.fullmatch(text)
        if match:
            article = "an" if noun[0] in "aeiou" else "a"
            length = ""
            if isinstance(value, str) and "characters" in wording:
                length = f" ({value!r} has {len(value)})" if len(value) <= 60 else f" (it has {len(value)})"
            return f"Label Studio needs {article} {noun}{wording.format(*match.groups())}{length}"
    return f"Label Studio refused the {noun}: {text}"


def _flatten(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(_flatten(item) for item in value)
    if isinstance(value, dict):
        return "; ".join(f"{key}: {_flatten(item)}" for key, item in value.items())
    return " ".join(str(value).split())


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300].strip() or response.reason_phrase
    if isinstance(body, dict):
        parts = [str(body.get("detail") or "")]
        if body.get("validation_errors"):
            parts.append(json.dumps(body["validation_errors"])[:500])
        return " ".join(part for part in parts if part) or json.dumps(body)[:300]
    return json.dumps(body)[:300]


def _validation_errors(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("validation_errors") or None if isinstance(body, dict) else None


class LabelStudioClient:
    """The Label Studio API of one server, authenticated as one user.

    Args:
        base_url: e.g. "http://127.0.0.1:8080" (no trailing path).
        token: the user's legacy API token (40 hex) or a Personal Access Token (a JWT refresh token).
        timeout: seconds per request (exports of large projects take tens of seconds, recipe §4.6).
    """

    def __init__(self, base_url: str, token: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise LabelStudioError(f"Label Studio URL {base_url!r} must start with http:// or https://")
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._is_pat = token.count(".") == 2  # a JWT: header.payload.signature
        self._access: tuple[str, float] | None = None
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LabelStudioClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------------------------------

    def _authorization(self) -> str:
        if not self._is_pat:
            return f"Token {self._token}"
        if self._access is None or time.monotonic() > self._access[1]:
            response = self._send("POST", "/api/token/refresh/", {}, json_body={"refresh": self._token})
            self._access = (response.json()["access"], time.monotonic() + ACCESS_TOKEN_LIFETIME_S)
        return f"Bearer {self._access[0]}"

    def _send(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        *,
        params: dict[str, Any] | None = None,
        json_body: Any = None,
    ) -> httpx.Response:
        try:
            response = self._http.request(method, path, params=params, json=json_body, headers=headers)
        except (httpx.ConnectError, httpx.RemoteProtocolError) as error:
            raise LabelStudioUnavailable(
                f"Label Studio is not answering at {self.base_url} ({error}): start it with "
                "`yolodex labelstudio start` (or `make run`); a first start takes about two minutes"
            ) from error
        except httpx.TimeoutException as error:
            raise LabelStudioUnavailable(
                f"Label Studio at {self.base_url} did not answer {method} {path} in time: it may be busy "
                "(a large import or export) or still starting; try again in a minute"
            ) from error
        if response.status_code in (401, 403):
            raise LabelStudioAuthError(
                f"Label Studio at {self.base_url} refused yolodex's token ({response.status_code}: "
                f"{_detail(response)}). If yolodex did not start this server, put its admin's API token in "
                "storage/labelstudio/credentials.json; if it did, run `yolodex labelstudio status` for the fix"
            )
        if response.status_code == 404:
            raise LabelStudioNotFound(f"Label Studio has no {path} (404: {_detail(response)})")
        validation = _validation_errors(response) if response.status_code == 400 else None
        if validation is not None:
            raise LabelStudioValidationError(validation_message(validation, json_body))
        if response.status_code >= 400:
            raise LabelStudioError(
                f"Label Studio refused {method} {path} ({response.status_code}: {_detail(response)})"
            )
        return response

    def request(self, method: str, path: str, *, params: dict[str, Any] | None = None, json_body: Any = None) -> Any:
        """One authenticated call; returns the decoded JSON body (None for an empty one)."""
        response = self._send(
            method, path, {"Authorization": self._authorization()}, params=params, json_body=json_body
        )
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError as error:
            raise LabelStudioError(f"Label Studio answered {method} {path} with something that is not JSON") from error

    # -- users and projects --------------------------------------------------------------------------------------

    def whoami(self) -> dict[str, Any]:
        return self.request("GET", "/api/current-user/whoami")

    def list_projects(self) -> list[dict[str, Any]]:
        projects: list[dict[str, Any]] = []
        page = 1
        while True:
            body = self.request("GET", "/api/projects", params={"page": page, "page_size": 100})
            if isinstance(body, list):  # older servers answer without pagination
                return body
            projects.extend(body.get("results", []))
            if not body.get("next"):
                return projects
            page += 1

    def create_project(self, title: str, label_config: str, description: str = "") -> dict[str, Any]:
        return self.request(
            "POST",
            "/api/projects",
            json_body={"title": title, "label_config": label_config, "description": description},
        )

    def get_project(self, project_id: int) -> dict[str, Any]:
        return self.request("GET", f"/api/projects/{project_id}")

    def update_project(self, project_id: int, **fields: Any) -> dict[str, Any]:
        return self.request("PATCH", f"/api/projects/{project_id}", json_body=fields)

    def labels_in_use(self, project_id: int) -> dict[str, int]:
        """{label value: number of annotation results using it} over the project's annotations (its summary)."""
        summary = self.request("GET", f"/api/projects/{project_id}/summary/") or {}
        counts: dict[str, int] = {}
        for per_control in (summary.get("created_labels") or {}).values():
            for label, count in (per_control or {}).items():
                counts[label] = counts.get(label, 0) + int(count or 0)
        return {label: count for label, count in counts.items() if count > 0}

    # -- local-files import storage ------------------------------------------------------------------------------

    def list_local_storages(self, project_id: int) -> list[dict[str, Any]]:
        return self.request("GET", "/api/storages/localfiles", params={"project": project_id})

    def create_local_storage(self, project_id: int, path: str, regex_filter: str, title: str) -> dict[str, Any]:
        return self.request(
            "POST",
            "/api/storages/localfiles",
            json_body={
                "project": project_id,
                "path": path,
                "regex_filter": regex_filter,
                "use_blob_urls": True,  # one task per file, its URL in data.image
                "title": title,
            },
        )

    def sync_local_storage(self, storage_id: int) -> dict[str, Any]:
        """Scans the folder and creates a task for each new file (Label Studio skips files it already has)."""
        return self.request("POST", f"/api/storages/localfiles/{storage_id}/sync")

    # -- tasks, annotations, predictions -------------------------------------------------------------------------

    def iter_tasks(self, project_id: int, fields: str = "all") -> Iterator[dict[str, Any]]:
        """Every task of the project (paged), with annotations and predictions when `fields="all"`."""
        page = 1
        while True:
            try:
                body = self.request(
                    "GET",
                    "/api/tasks",
                    params={"project": project_id, "page": page, "page_size": TASK_PAGE_SIZE, "fields": fields},
                )
            except LabelStudioNotFound:
                return  # Label Studio answers 404 for a page past the end
            tasks = body.get("tasks", []) if isinstance(body, dict) else body
            yield from tasks
            total = body.get("total") if isinstance(body, dict) else None
            if not tasks or (total is not None and page * TASK_PAGE_SIZE >= total):
                return
            page += 1

    def update_task_data(self, task_id: int, data: dict[str, Any]) -> dict[str, Any]:
        return self.request("PATCH", f"/api/tasks/{task_id}", json_body={"data": data})

    def export_tasks(self, project_id: int) -> list[dict[str, Any]]:
        """Every task with its full annotations (Label Studio's JSON export, the format `convert` reads)."""
        return self.request(
            "GET",
            f"/api/projects/{project_id}/export",
            params={"exportType": "JSON", "download_all_tasks": "true", "download_resources": "false"},
        )

    def export_raw(self, project_id: int, export_type: str) -> bytes:
        """Label Studio's own export in `export_type` ("COCO", "YOLO", ...) of the annotated tasks: zip bytes."""
        response = self._send(
            "GET",
            f"/api/projects/{project_id}/export",
            {"Authorization": self._authorization()},
            params={"exportType": export_type, "download_all_tasks": "false", "download_resources": "false"},
        )
        return response.content

    def create_annotation(self, task_id: int, result: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
        return self.request("POST", f"/api/tasks/{task_id}/annotations", json_body={"result": result, **fields})

    def list_predictions(self, task_id: int) -> list[dict[str, Any]]:
        return self.request("GET", "/api/predictions", params={"task": task_id})

    def create_prediction(
        self, task_id: int, result: list[dict[str, Any]], score: float, model_version: str
    ) -> dict[str, Any]:
        return self.request(
            "POST",
            "/api/predictions",
            json_body={"task": task_id, "result": result, "score": score, "model_version": model_version},
        )

    def delete_prediction(self, prediction_id: int) -> None:
        self.request("DELETE", f"/api/predictions/{prediction_id}")

    # -- Data Manager views (tabs) -------------------------------------------------------------------------------

    def list_views(self, project_id: int) -> list[dict[str, Any]]:
        return self.request("GET", "/api/dm/views", params={"project": project_id})

    def create_view(self, project_id: int, data: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/api/dm/views", json_body={"project": project_id, "data": data})

    def update_view(self, view_id: int, project_id: int, data: dict[str, Any]) -> dict[str, Any]:
        return self.request("PUT", f"/api/dm/views/{view_id}", json_body={"project": project_id, "data": data})


def connect(settings: Settings | None = None, *, token: str | None = None, timeout: float = DEFAULT_TIMEOUT_S):
    """A client for yolodex's Label Studio (the URL from the settings, the token from its credentials file).

    Args:
        settings: defaults to the environment's.
        token: overrides the stored token (a Label Studio yolodex did not start).

    Returns:
        A `LabelStudioClient`; it has not made a request yet (use `whoami()` to check the connection).
    """
    settings = settings or get_settings()
    return LabelStudioClient(api_url(settings), token or load_or_create_credentials(settings).token, timeout=timeout)
