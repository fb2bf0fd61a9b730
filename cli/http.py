"""The CLI's HTTP side: one client, and every failure turned into one line that says the fix.

A user mistake must never end in a traceback: a path that does not exist, a server that is not
running, a missing or refused key, an unknown model or job. Each becomes a ``CliError`` carrying a
message and an exit code; ``cli.main.main`` prints it as ``error: <message>`` and exits.

Exit codes (also in ``lorafleet --help``):

==== =====================================================================================
0    success (``watch``/``submit --watch``: the job succeeded)
1    the job failed; or an unexpected error (``LORAFLEET_DEBUG=1`` shows its traceback)
2    invalid input: a bad flag or file, or the server refused the request (4xx)
3    the job was cancelled
4    the downloaded adapter does not match its checksum
5    the server is not reachable, or answered with a server error (5xx)
6    no API key, or the key was refused
130  interrupted (Ctrl-C)
==== =====================================================================================
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_INVALID = 2
EXIT_CANCELLED = 3
EXIT_CHECKSUM = 4
EXIT_UNREACHABLE = 5
EXIT_AUTH = 6
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = (
    "Exit codes: 0 success; 1 job failed (or unexpected error); 2 invalid input or request "
    "refused; 3 job cancelled; 4 checksum mismatch; 5 server not reachable or server error; "
    "6 API key missing or refused; 130 interrupted."
)
KEY_HINT = "create one with `lorafleet keys create --owner NAME` on the server"


class CliError(Exception):
    """A failure to report as one line, with the exit code it ends the command with."""

    def __init__(self, message: str, code: int = EXIT_INVALID) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def _detail(response: httpx.Response) -> tuple[str, dict[str, Any]]:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or response.reason_phrase, {}
    if not isinstance(body, dict):
        return str(body)[:300], {}
    error: dict[str, Any] = body["error"] if isinstance(body.get("error"), dict) else {}
    detail = body.get("detail")
    message = detail if isinstance(detail, str) else str(error.get("message") or body)[:300]
    return message, error


class Api:
    """An authenticated client of one lorafleet server that raises ``CliError`` on failure."""

    def __init__(self, url: str, key: str | None) -> None:
        self.url = url.rstrip("/")
        self.key = key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=60.0)

    def close(self) -> None:
        self.http.close()

    def unreachable(self, exc: Exception) -> CliError:
        reason = type(exc).__name__
        if isinstance(exc, httpx.ConnectError):
            reason = "connection refused or host unknown"
        elif isinstance(exc, httpx.TimeoutException):
            reason = "timed out"
        return CliError(
            f"lorafleet server not reachable at {self.url} ({reason}); start it with "
            "`lorafleet up`, or set LORAFLEET_API_URL (or --api-url) to where it runs",
            EXIT_UNREACHABLE,
        )

    def check(self, response: httpx.Response) -> Any:
        """The response's JSON, or a ``CliError`` worded for the status."""
        if response.status_code < 400:
            return response.json() if response.content else None
        message, error = _detail(response)
        status = response.status_code
        if status == 401:
            if not self.key:
                raise CliError(
                    f"no API key: set LORAFLEET_API_KEY (or --api-key); {KEY_HINT}", EXIT_AUTH
                )
            raise CliError(
                f"the API key was refused ({message}); set LORAFLEET_API_KEY to a live key; "
                f"{KEY_HINT}",
                EXIT_AUTH,
            )
        if status == 403:
            raise CliError(f"{message} (HTTP 403)", EXIT_AUTH)
        if status >= 500:
            raise CliError(
                f"the server failed ({message}, HTTP {status}); its log has the details",
                EXIT_UNREACHABLE,
            )
        error_obj = CliError(f"{message} (HTTP {status})", EXIT_INVALID)
        error_obj.param = error.get("param")  # type: ignore[attr-defined]
        raise error_obj

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from None
        return self.check(response)

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Any:
        return self.request("DELETE", path, **kwargs)

    @contextmanager
    def stream(self, method: str, path: str) -> Iterator[httpx.Response]:
        """A streamed response, already checked (its body not read yet on success)."""
        try:
            with self.http.stream(method, path) as response:
                if response.status_code >= 400:
                    response.read()
                    self.check(response)
                yield response
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from None


@contextmanager
def connect(url: str, key: str | None) -> Iterator[Api]:
    """``Api`` for the duration of a command."""
    api = Api(url, key)
    try:
        yield api
    finally:
        api.close()
