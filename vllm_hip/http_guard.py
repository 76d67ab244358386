"""ASGI middleware for ``vllm serve``: a JSON request body that is not an object gets a 400.

vLLM 0.26.0's OpenAI server answers a body such as ``[1, 2]`` with a 500: its request
validators call ``data.get(...)`` before pydantic checks the type. A client error reported as a
server error pages the operator and hides the client's bug. Turn it on with

    vllm serve MODEL --attention-backend INFINITEHIP --middleware vllm_hip.http_guard.JsonObjectBody

The check reads only the first non-blank byte of the body: ``{`` goes on to vLLM unchanged, as
does anything that is not JSON at all (vLLM answers that with its own 400); any other JSON value
(array, string, number, true/false/null) is answered here, in vLLM's error format. The body is
buffered before the app sees it (as FastAPI would do anyway) and replayed as it came.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

__all__ = ["JsonObjectBody", "non_object_json"]

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_BLANK = b" \t\r\n"
# First bytes of a JSON value that is not an object: array, string, number, literal.
_NON_OBJECT_START = frozenset(b'["-0123456789tfn')


def non_object_json(body: bytes) -> bool:
    """Whether ``body`` starts like a JSON value other than an object."""
    rest = body.lstrip(_BLANK)
    return bool(rest) and rest[0] in _NON_OBJECT_START


class JsonObjectBody:
    """Answers POST requests with a JSON content type whose body is not a JSON object with 400."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST" or not _is_json(scope):
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        while True:  # the whole body (a disconnect ends it early)
            message = await receive()
            messages.append(message)
            if message.get("type") != "http.request" or not message.get("more_body", False):
                break
        body = b"".join(m.get("body", b"") for m in messages if m.get("type") == "http.request")
        if non_object_json(body):
            await _bad_request(send, "the request body must be a JSON object")
            return

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def _is_json(scope: Scope) -> bool:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-type":
            return b"json" in value.lower()
    return False


async def _bad_request(send: Send, message: str) -> None:
    # vLLM's ErrorResponse shape, so that OpenAI clients raise their BadRequestError
    body = json.dumps({"error": {"message": message, "type": "BadRequestError", "param": None,
                                 "code": 400}}).encode()  # fmt: skip
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})
