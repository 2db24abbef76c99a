"""Error responses in the OpenAI shape (and llama-swap's text variants)."""

from __future__ import annotations

import html
import json

from aiohttp import web

from swapd.server.dialects import is_ollama_path

_TYPES = {
    400: ("invalid_request_error", "bad_request"),
    401: ("authentication_error", "unauthorized"),
    403: ("authentication_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    409: ("invalid_request_error", "conflict"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "gateway_timeout"),
}


def error_body(status: int, message: str, code: str | None = None) -> dict:
    etype, default_code = _TYPES.get(status, ("invalid_request_error" if status < 500 else "server_error", None))
    if default_code is None:
        default_code = "invalid_request" if status < 500 else "internal_error"
    return {
        "src": "swapd",
        "error": {"message": message, "type": etype, "param": None, "code": code or default_code},
    }


def error_response(
    request: web.Request | None,
    status: int,
    message: str,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """Render an error the way the client asked for it.

    JSON (OpenAI's ``{"error": {...}}``) unless the client prefers plain text
    or HTML, as llama-swap does for curl and browsers.
    """
    if request is not None and is_ollama_path(request.path):
        # Ollama's clients read {"error": "..."} (the ollama libraries raise it as ResponseError)
        return web.json_response({"error": message}, status=status, headers=headers)
    accept = request.headers.get("Accept", "") if request is not None else ""
    if "text/plain" in accept:
        return web.Response(status=status, text=f"swapd: {message}", headers=headers)
    if "text/html" in accept and "application/json" not in accept:
        page = f"<html><body><h1>swapd</h1><p>{html.escape(message)}</p></body></html>"
        return web.Response(status=status, text=page, content_type="text/html", headers=headers)
    return web.Response(
        status=status,
        body=json.dumps(error_body(status, message, code)).encode(),
        content_type="application/json",
        headers=headers,
    )


class ClientError(Exception):
    """A request swapd refuses on its own; rendered by the error middleware.

    ``close``: the connection is closed after the error (the client's body was
    cut off mid-way, so what follows on the connection cannot be trusted).
    """

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        *,
        close: bool = False,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.close = close
        self.headers = headers
