"""vllm_hip.http_guard.JsonObjectBody in front of a small FastAPI app (as vllm serve's
--middleware adds it): non-object JSON bodies get vLLM's 400, everything else reaches the app
with its body unchanged."""

from __future__ import annotations

import json

import pytest

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from vllm_hip.http_guard import JsonObjectBody, non_object_json  # noqa: E402


def _client() -> TestClient:
    app = fastapi.FastAPI()

    @app.post("/v1/completions")
    async def completions(request: fastapi.Request):
        raw = await request.body()
        try:
            data = json.loads(raw)
        except ValueError:
            return fastapi.responses.JSONResponse({"error": "not json"}, status_code=400)
        return {"echo": data, "bytes": len(raw)}

    @app.get("/health")
    async def health():
        return {"ok": True}

    app.add_middleware(JsonObjectBody)  # what vllm serve --middleware does with a class
    return TestClient(app)


@pytest.mark.parametrize("body", ["[1, 2]", '  "text"', "42", "-1", "null", "true", "\n[]"])
def test_non_object_json_is_a_400_in_vllms_error_format(body):
    r = _client().post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "BadRequestError" and err["code"] == 400 and "JSON object" in err["message"]


def test_objects_reach_the_app_unchanged():
    body = {"model": "m", "prompt": "x" * 100_000, "max_tokens": 4}
    r = _client().post("/v1/completions", json=body)
    assert r.status_code == 200 and r.json()["echo"] == body


def test_a_body_in_several_chunks_is_replayed_whole():
    parts = [b'{"model": "m", ', b'"prompt": "', b"y" * 70_000, b'"}']
    r = _client().post("/v1/completions", content=iter(parts), headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["bytes"] == sum(map(len, parts))


def test_what_is_not_json_or_not_a_json_post_is_left_to_the_app():
    c = _client()
    assert c.post("/v1/completions", content='{"model": ', headers={"content-type": "application/json"}).json() == {"error": "not json"}
    assert c.post("/v1/completions", content="[1]", headers={"content-type": "text/plain"}).status_code == 200
    assert c.get("/health").json() == {"ok": True}


def test_first_byte_rule():
    assert [non_object_json(b) for b in (b"{}", b" {", b"", b"  ", b"<x>", b"[", b" 7")] == [
        False, False, False, False, False, True, True]


def test_vllm_serve_middleware_option_can_load_it():
    """vllm serve --middleware resolves "module.attr" and add_middleware()s a class."""
    import importlib
    import inspect

    module_path, name = "vllm_hip.http_guard.JsonObjectBody".rsplit(".", 1)
    assert inspect.isclass(getattr(importlib.import_module(module_path), name))
