"""yolodex's Label Studio client: `label_studio_sdk` (2.1.2, the SDK Label Studio 1.23.2 ships with) behind the few
methods yolodex calls, plain dicts in and out, errors in words.

Every request goes through one `label_studio_sdk.LabelStudio` per client: projects, tasks, annotations,
predictions, Data Manager views, local-files import storage, exports and the current user are the SDK's calls. The
one endpoint SDK 2.1.2 has no call for (a project's label summary, `labels_in_use`) and the checks the tests make
(`request`, `fetch`) go through the SDK's own HTTP client (`LabelStudio._client_wrapper.httpx_client`: its base
URL, authorization and timeout), not a second client. The SDK turns a legacy token into `Authorization: Token ...`
and a Personal Access Token (a JWT) into short-lived access tokens by itself, so the client also talks to a Label
Studio that yolodex did not start. The facts relied on are in docs/label_studio.md.

Import cost: `import label_studio_sdk` takes about 1.3 s and 120 MB (it imports pandas, jsonschema and its label
interface; docs/label_studio.md has the measurement). This module does not import it at load time: the first
request of the first client in a process does, so a page that only reads our database never pays for it, and
later clients reuse the loaded module.

Retries: the SDK retries POSTs as well as GETs (after a connection error, a 5xx, 408, 409 or 429), and a retried
POST whose first answer was lost stores its object twice. The client therefore turns the SDK's retries off
(`max_retries=0`, as yolodex's own client never retried) and retries only `create_prediction`, after looking for
the prediction the lost answer may have stored (see there).

Every failure is a `LabelStudioError` whose message says what to do: `LabelStudioUnavailable` (nothing answers
at the URL), `LabelStudioAuthError` (401/403: the token is wrong or legacy tokens are off), `LabelStudioNotFound`
(404: e.g. a project deleted in Label Studio), `LabelStudioValidationError` (400 with `validation_errors`: the
fields and what Label Studio needs of them, in words: "Label Studio needs a project title of at least 3
characters; 'ab' has 2"), or the base class with Label Studio's own detail.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from backend.labeling.server import LabelStudioError, api_url, load_or_create_credentials
from backend.settings import Settings, get_settings

if TYPE_CHECKING:  # imported on first use (see the module docstring)
    import httpx
    from label_studio_sdk import LabelStudio
    from label_studio_sdk.core.pagination import SyncPager
    from label_studio_sdk.core.request_options import RequestOptions
    from label_studio_sdk.types import PaginatedRoleBasedTaskList, RoleBasedTask

DEFAULT_TIMEOUT_S = 60.0
# Label Studio's task list pages; 1000 per page keeps a 5 000-task project at a handful of requests.
TASK_PAGE_SIZE = 1000
PROJECT_PAGE_SIZE = 100
# `create_prediction`: the first post and at most one more after an answer was lost.
PREDICTION_ATTEMPTS = 2
# Per-request option for the SDK: never resend a request on its own (see the module docstring).
NO_RETRY: RequestOptions = {"max_retries": 0}

T = TypeVar("T")


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


def _detail(body: Any) -> str:
    """Label Studio's reason in an error body (the SDK's `ApiError.body`: decoded JSON, or text)."""
    if isinstance(body, dict):
        parts = [str(body.get("detail") or "")]
        if body.get("validation_errors"):
            parts.append(json.dumps(body["validation_errors"])[:500])
        return " ".join(part for part in parts if part) or json.dumps(body, default=str)[:300]
    if isinstance(body, list):
        return json.dumps(body, default=str)[:300]
    return " ".join(str(body or "").split())[:300] or "no detail"


def _plain(value: Any) -> Any:
    """An SDK object (a pydantic model, maybe nested, with datetimes) as the JSON Label Studio sent: dicts, lists,
    strings and numbers, the form `convert` and `sync` read."""
    from label_studio_sdk.core.jsonable_encoder import jsonable_encoder  # the SDK: 1-2 s to import, see _make_sdk

    return jsonable_encoder(value)


def _response_body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


class LabelStudioClient:
    """The Label Studio API of one server, authenticated as one user, on `label_studio_sdk.LabelStudio`.

    Creating one makes no request and does not import the SDK; the first call does both.

    Args:
        base_url: e.g. "http://127.0.0.1:8080" (no trailing path).
        token: the user's legacy API token (40 hex) or a Personal Access Token (a JWT refresh token).
        timeout: seconds per request (exports of large projects take tens of seconds).
        httpx_client: an `httpx.Client` for the SDK to send through (a proxy, a custom transport); by default the
            client makes its own and closes it in `close()`.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        httpx_client: httpx.Client | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise LabelStudioError(f"Label Studio URL {base_url!r} must start with http:// or https://")
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._timeout = timeout
        self._httpx_client = httpx_client
        self._owns_httpx_client = httpx_client is None
        self._sdk: LabelStudio | None = None

    @property
    def sdk(self) -> LabelStudio:
        """The `label_studio_sdk.LabelStudio` every request goes through (made, and the SDK imported, on first use).

        Raises:
            LabelStudioAuthError: the token is a Personal Access Token that has expired (the SDK checks at once).
        """
        if self._sdk is None:
            self._sdk = self._call("connect", self._make_sdk)
        return self._sdk

    def _make_sdk(self) -> LabelStudio:
        # The SDK (and httpx with it) costs 1-2 s to import: loaded at a client's first request, never by a page
        # rerun that makes no request (docs/label_studio.md).
        import httpx
        from label_studio_sdk import LabelStudio

        if self._httpx_client is None:
            self._httpx_client = httpx.Client(timeout=self._timeout, follow_redirects=True)
        return LabelStudio(
            base_url=self.base_url,
            api_key=self._token,  # explicit: the SDK's default reads LABEL_STUDIO_API_KEY when it is imported
            timeout=self._timeout,
            max_retries=0,
            httpx_client=self._httpx_client,
        )

    def close(self) -> None:
        if self._owns_httpx_client and self._httpx_client is not None:
            self._httpx_client.close()
            self._httpx_client = None
            self._sdk = None

    def __enter__(self) -> LabelStudioClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------------------------------

    def _call(self, what: str, send: Callable[[], T], body: Any = None) -> T:
        """Runs one SDK call; the SDK's and httpx's errors become yolodex's (`what`: e.g. "GET /api/projects/3")."""
        try:
            return send()
        except Exception as error:  # translated below; anything else is re-raised unchanged
            translated = self._translate(what, error, body)
            if translated is None:
                raise
            raise translated from error

    def _translate(self, what: str, error: Exception, body: Any) -> LabelStudioError | None:
        import httpx  # loaded with the SDK at the first request (_make_sdk)
        from label_studio_sdk.core.api_error import ApiError

        if isinstance(error, (httpx.ConnectError, httpx.RemoteProtocolError)):
            return LabelStudioUnavailable(
                f"Label Studio is not answering at {self.base_url} ({error}): start it with "
                "`yolodex labelstudio start` (or `make run`); a first start takes about two minutes"
            )
        if isinstance(error, httpx.TimeoutException):
            return LabelStudioUnavailable(
                f"Label Studio at {self.base_url} did not answer {what} in time: it may be busy "
                "(a large import or export) or still starting; try again in a minute"
            )
        if isinstance(error, httpx.HTTPError):
            return LabelStudioError(f"Label Studio at {self.base_url} could not be reached for {what}: {error}")
        if not isinstance(error, ApiError):
            return None
        status = error.status_code
        if status in (401, 403):
            return LabelStudioAuthError(
                f"Label Studio at {self.base_url} refused yolodex's token ({status}: "
                f"{_detail(error.body)}). If yolodex did not start this server, put its admin's API token in "
                "storage/labelstudio/credentials.json; if it did, run `yolodex labelstudio status` for the fix"
            )
        if status == 404:
            return LabelStudioNotFound(f"Label Studio has no {what.split(' ', 1)[-1]} (404: {_detail(error.body)})")
        validation = error.body.get("validation_errors") if isinstance(error.body, dict) else None
        if status == 400 and validation:
            return LabelStudioValidationError(validation_message(validation, body))
        if status is None:
            return LabelStudioError(f"Label Studio client for {self.base_url}: {_detail(error.body)}")
        return LabelStudioError(f"Label Studio refused {what} ({status}: {_detail(error.body)})")

    def _sdk_call(self, what: str, send: Callable[[LabelStudio], Any], body: Any = None) -> Any:
        """One SDK call (`send(sdk)`), its answer as plain JSON."""
        sdk = self.sdk
        return _plain(self._call(what, lambda: send(sdk), body))

    def _raw(self, method: str, path: str, *, params: dict[str, Any] | None = None, json_body: Any = None):
        """One request through the SDK's own HTTP client (for what SDK 2.1.2 has no call for); raises as the SDK's
        calls do for an error status. Returns the `httpx.Response`."""
        from label_studio_sdk.core.api_error import ApiError  # loaded with the SDK at the first request (_make_sdk)

        sdk = self.sdk

        def send():
            response = sdk._client_wrapper.httpx_client.request(
                path, method=method, params=params, json=json_body, request_options=NO_RETRY
            )
            if response.status_code >= 400:
                raise ApiError(
                    status_code=response.status_code, headers=dict(response.headers), body=_response_body(response)
                )
            return response

        return self._call(f"{method} {path}", send, json_body)

    def request(self, method: str, path: str, *, params: dict[str, Any] | None = None, json_body: Any = None) -> Any:
        """One authenticated call to any endpoint (`path` from the server root, e.g. "/api/tasks"), through the
        SDK's HTTP client; returns the decoded JSON body (None for an empty one)."""
        response = self._raw(method, path, params=params, json_body=json_body)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError as error:
            raise LabelStudioError(f"Label Studio answered {method} {path} with something that is not JSON") from error

    def fetch(self, path: str) -> bytes:
        """The bytes Label Studio serves at `path` with yolodex's token, e.g. a task's image URL."""
        return self._raw("GET", path).content

    # -- users and projects --------------------------------------------------------------------------------------

    def whoami(self) -> dict[str, Any]:
        return self._sdk_call("GET /api/current-user/whoami", lambda sdk: sdk.users.whoami(request_options=NO_RETRY))

    def list_projects(self) -> list[dict[str, Any]]:
        return self._sdk_call(
            "GET /api/projects",
            lambda sdk: list(sdk.projects.list(page_size=PROJECT_PAGE_SIZE, request_options=NO_RETRY)),
        )

    def create_project(self, title: str, label_config: str, description: str = "") -> dict[str, Any]:
        fields = {"title": title, "label_config": label_config, "description": description}
        return self._sdk_call(
            "POST /api/projects",
            lambda sdk: sdk.projects.create(
                title=title, label_config=label_config, description=description, request_options=NO_RETRY
            ),
            fields,
        )

    def get_project(self, project_id: int) -> dict[str, Any]:
        return self._sdk_call(
            f"GET /api/projects/{project_id}", lambda sdk: sdk.projects.get(project_id, request_options=NO_RETRY)
        )

    def update_project(self, project_id: int, **fields: Any) -> dict[str, Any]:
        return self._sdk_call(
            f"PATCH /api/projects/{project_id}",
            lambda sdk: sdk.projects.update(project_id, **fields, request_options=NO_RETRY),
            fields,
        )

    def labels_in_use(self, project_id: int) -> dict[str, int]:
        """{label value: number of annotation results using it} over the project's annotations (its summary).

        SDK 2.1.2 has no call for `/api/projects/{id}/summary/`: one request through its HTTP client.
        """
        summary = self.request("GET", f"/api/projects/{project_id}/summary/") or {}
        counts: dict[str, int] = {}
        for per_control in (summary.get("created_labels") or {}).values():
            for label, count in (per_control or {}).items():
                counts[label] = counts.get(label, 0) + int(count or 0)
        return {label: count for label, count in counts.items() if count > 0}

    # -- local-files import storage ------------------------------------------------------------------------------

    def list_local_storages(self, project_id: int) -> list[dict[str, Any]]:
        return self._sdk_call(
            "GET /api/storages/localfiles",
            lambda sdk: sdk.import_storage.local.list(project=project_id, request_options=NO_RETRY),
        )

    def create_local_storage(self, project_id: int, path: str, regex_filter: str, title: str) -> dict[str, Any]:
        fields = {
            "project": project_id,
            "path": path,
            "regex_filter": regex_filter,
            "use_blob_urls": True,  # one task per file, its URL in data.image
            "title": title,
        }
        return self._sdk_call(
            "POST /api/storages/localfiles",
            lambda sdk: sdk.import_storage.local.create(**fields, request_options=NO_RETRY),
            fields,
        )

    def sync_local_storage(self, storage_id: int) -> dict[str, Any]:
        """Scans the folder and creates a task for each new file (Label Studio skips files it already has)."""
        return self._sdk_call(
            f"POST /api/storages/localfiles/{storage_id}/sync",
            lambda sdk: sdk.import_storage.local.sync(storage_id, request_options=NO_RETRY),
        )

    # -- tasks, annotations, predictions -------------------------------------------------------------------------

    def iter_tasks(self, project_id: int, fields: str = "all") -> Iterator[dict[str, Any]]:
        """Every task of the project (paged), with annotations and predictions when `fields="all"`."""
        what = f"GET /api/tasks?project={project_id}"
        sdk = self.sdk
        pager: SyncPager[RoleBasedTask, PaginatedRoleBasedTaskList] = self._call(
            what,
            lambda: sdk.tasks.list(
                project=project_id, page_size=TASK_PAGE_SIZE, fields=fields, request_options=NO_RETRY
            ),
        )
        pages = iter(pager)  # the SDK's pager asks for the next page as it goes; a 404 past the end ends it
        while True:
            try:
                task = self._call(what, lambda: next(pages))
            except StopIteration:
                return
            yield _plain(task)

    def update_task_data(self, task_id: int, data: dict[str, Any]) -> dict[str, Any]:
        return self._sdk_call(
            f"PATCH /api/tasks/{task_id}",
            lambda sdk: sdk.tasks.update(str(task_id), data=data, request_options=NO_RETRY),
            {"data": data},
        )

    def _export(self, project_id: int, export_type: str, all_tasks: bool) -> bytes:
        def download(sdk: LabelStudio) -> bytes:
            chunks = sdk.projects.exports.download_sync(
                project_id,
                export_type=export_type,
                download_all_tasks=all_tasks,
                download_resources=False,
                request_options={**NO_RETRY, "timeout": max(self._timeout, DEFAULT_TIMEOUT_S)},
            )
            return b"".join(chunks)

        sdk = self.sdk
        return self._call(f"GET /api/projects/{project_id}/export", lambda: download(sdk))

    def export_tasks(self, project_id: int) -> list[dict[str, Any]]:
        """Every task with its full annotations (Label Studio's JSON export, the format `convert` reads)."""
        content = self._export(project_id, "JSON", all_tasks=True)
        try:
            return json.loads(content)
        except ValueError as error:
            raise LabelStudioError(
                f"Label Studio's JSON export of project {project_id} is not JSON ({len(content)} bytes)"
            ) from error

    def export_raw(self, project_id: int, export_type: str) -> bytes:
        """Label Studio's own export in `export_type` ("COCO", "YOLO", ...) of the annotated tasks: zip bytes."""
        return self._export(project_id, export_type, all_tasks=False)

    def create_annotation(self, task_id: int, result: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
        return self._sdk_call(
            f"POST /api/tasks/{task_id}/annotations",
            lambda sdk: sdk.annotations.create(task_id, result=result, **fields, request_options=NO_RETRY),
            {"result": result, **fields},
        )

    def list_predictions(self, task_id: int) -> list[dict[str, Any]]:
        return self._sdk_call(
            f"GET /api/predictions?task={task_id}",
            lambda sdk: sdk.predictions.list(task=task_id, request_options=NO_RETRY),
        )

    def create_prediction(
        self, task_id: int, result: list[dict[str, Any]], score: float, model_version: str
    ) -> dict[str, Any]:
        """Stores one prediction on a task, exactly once.

        When a post fails without an answer (the connection broke, or no answer in time) the server may still
        have stored it. Before posting again the client lists the task's predictions and returns the one of
        `model_version` with this result, if the lost post stored it; so a retried request never stores a
        prediction twice.
        """
        fields = {"task": task_id, "result": result, "score": score, "model_version": model_version}
        sent = json.loads(json.dumps(result))  # what Label Studio stores: the result as JSON
        for attempt in range(PREDICTION_ATTEMPTS):
            if attempt:
                for stored in self.list_predictions(task_id):
                    if stored.get("model_version") == model_version and stored.get("result") == sent:
                        return stored
            try:
                return self._sdk_call(
                    "POST /api/predictions",
                    lambda sdk: sdk.predictions.create(**fields, request_options=NO_RETRY),
                    fields,
                )
            except LabelStudioUnavailable:
                if attempt + 1 == PREDICTION_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    def delete_prediction(self, prediction_id: int) -> None:
        self._sdk_call(
            f"DELETE /api/predictions/{prediction_id}",
            lambda sdk: sdk.predictions.delete(prediction_id, request_options=NO_RETRY),
        )

    # -- Data Manager views (tabs) -------------------------------------------------------------------------------

    def list_views(self, project_id: int) -> list[dict[str, Any]]:
        return self._sdk_call(
            "GET /api/dm/views", lambda sdk: sdk.views.list(project=project_id, request_options=NO_RETRY)
        )

    def create_view(self, project_id: int, data: dict[str, Any]) -> dict[str, Any]:
        return self._sdk_call(
            "POST /api/dm/views",
            lambda sdk: sdk.views.create(project=project_id, data=data, request_options=NO_RETRY),
            {"project": project_id, "data": data},
        )

    def update_view(self, view_id: int, project_id: int, data: dict[str, Any]) -> dict[str, Any]:
        return self._sdk_call(
            f"PUT /api/dm/views/{view_id}",
            lambda sdk: sdk.views.update(str(view_id), project=project_id, data=data, request_options=NO_RETRY),
            {"project": project_id, "data": data},
        )


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
