"""Bad request bodies and the embedded server's answers to them: one list for both engines.

``tests/test_server_faults.py`` checks the embedded server's answers; ``tests/test_ray_engine.py``
sends the same bodies through Ray Serve's proxy and the Ray ingress and expects the very same
status and JSON error. A case added here is checked on both engines.
"""

from __future__ import annotations

import json

import httpx

URL = "/v1/images/generations"


def _nested(depth: int) -> bytes:
    return b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"


#: name -> (method, path, body)
CASES: dict[str, tuple[str, str, bytes]] = {
    "nested-40": ("POST", URL, _nested(40)),
    "nested-1000": ("POST", URL, _nested(1000)),
    "nested-100000": ("POST", URL, _nested(100_000)),  # 200 kB: past the body limit
    "lone-surrogate": ("POST", URL, json.dumps({"prompt": "a cat \ud800"}).encode()),  # escaped as \ud800
    "oversized": ("POST", URL, json.dumps({"prompt": "x" * (80 * 1024)}).encode()),
    "not-json": ("POST", URL, b'{"prompt": "a cat",'),
    "n-not-a-number": ("POST", URL, json.dumps({"prompt": "a cat", "n": "two"}).encode()),
}
# (an unsupported size is left out: its message lists the sizes the models serve, which differ
# between the tiny test backend and the emulated reference models)


def answer(r: httpx.Response) -> tuple:
    """What must match across engines: status and the JSON error's type, code, param, message."""
    try:
        err = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return (r.status_code, "not a JSON error", r.text[:200])
    return (r.status_code, err.get("type"), err.get("code"), err.get("param"), err.get("message"))


async def embedded_answers() -> dict[str, tuple]:
    """The embedded server's answer to every case (in process, no model ever runs)."""
    from diffserve.server.api import create_app
    from diffserve.server.testing import GatedBackend, hand_plan, tiny_runtime

    backend = GatedBackend()
    rt = tiny_runtime(backend, hand_plan(1, 1))
    await rt.start()
    transport = httpx.ASGITransport(app=create_app(rt, manage_lifecycle=False))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            out = {}
            for name, (method, path, body) in CASES.items():
                r = await client.request(method, path, content=body, headers={"content-type": "application/json"})
                out[name] = answer(r)
    finally:
        await rt.stop()
    assert backend.calls == [], "a bad input reached a model"
    return out
