"""Every bad request gets an OpenAI-style error object with a clear message, and no memory changes."""
from __future__ import annotations

import httpx
import pytest

from .conftest import MODEL

C = "/v1/completions"
BAD = [
    ("post", C, {"model": MODEL, "prompt": "x", "bogus": 1}, 400, "bogus: unknown field"),
    ("post", C, {"model": "gpt-4", "prompt": "x"}, 404, "model 'gpt-4' not found"),
    ("post", C, {"model": MODEL}, 400, "prompt: Field required"),
    ("post", C, {"model": MODEL, "prompt": "x", "max_tokens": 10**6}, 400, "above this server's limit"),
    ("post", C, {"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("post", C, {"model": MODEL, "prompt": "x", "temperature": 5}, 400, "temperature"),
    ("post", C, {"model": MODEL, "prompt": [1, 2, 99999]}, 400, "outside the vocabulary"),
    ("post", C, {"model": MODEL, "prompt": ""}, 400, "holds no tokens"),
    ("post", C, {"model": MODEL, "prompt": "x", "memory_id": "../etc"}, 400, "not a valid memory id"),
    ("post", C, {"model": MODEL, "prompt": "x", "memory_id": "nobody"}, 404, "memory 'nobody' not found"),
    ("post", C, {"model": MODEL, "prompt": "x", "stop": [""]}, 400, "stop must be"),
    ("post", C, {"model": MODEL, "prompt": "x", "frequency_penalty": 1}, 400, "frequency_penalty"),
    ("post", C, {"model": MODEL, "prompt": ["a", "b"], "stream": True}, 400, "streaming supports one prompt"),
    ("post", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("post", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("post", "/v1/memories", {"id": "default"}, 409, "already exists"),
    ("post", "/v1/memories", {"id": "a/b"}, 400, "not a valid memory id"),
    ("post", "/v1/memories/default/inject", {"text": "x", "ids": [1]}, 400, "exactly one of text or ids"),
    ("post", "/v1/memories/default/inject", {"ids": [5, 6, 10**6]}, 400, "outside the vocabulary"),
    ("post", "/v1/memories/default/inject", {"ids": []}, 400, "holds no tokens"),
    ("post", "/v1/memories/nobody/inject", {"text": "x"}, 404, "not found"),
    ("post", "/v1/memories/nobody/fork", {}, 404, "not found"),
    ("delete", "/v1/memories/default", None, 400, "cannot be deleted"),
    ("get", "/v1/nothing", None, 404, "Not Found"),
]


def memories(server):
    return httpx.get(server.url + "/v1/memories").json()["data"]


@pytest.mark.parametrize("method,path,body,status,message", BAD, ids=[f"{i}:{b[4][:20]}" for i, b in enumerate(BAD)])
def test_bad_request_is_an_openai_error_and_changes_nothing(server, method, path, body, status, message):
    before = memories(server)
    r = httpx.request(method, server.url + path, json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and set(err) == {"message", "type", "param", "code"}
    assert memories(server) == before


def test_bodies_that_are_not_json_or_too_large(server):
    r = httpx.post(server.url + C, content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + C, content=b"x" * (2 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(server.url + "/v1/memories/default/inject", content=b"\xff\xfe", headers={"content-type": "text/plain"})
    assert r.status_code == 400 and "not UTF-8" in r.json()["error"]["message"]


def test_api_key_and_queue_limit(make_server):
    s = make_server("--api-key", "s3cret-key", "--max-queue", "1").start()
    assert httpx.get(s.url + "/v1/models").status_code == 401
    assert httpx.get(s.url + "/v1/models", headers={"authorization": "Bearer wrong-key"}).json()["error"]["code"] == "invalid_api_key"
    auth = {"authorization": "Bearer s3cret-key"}
    assert httpx.get(s.url + "/v1/models", headers=auth).status_code == 200
    import concurrent.futures as cf
    body = {"model": MODEL, "prompt": "Call me", "max_tokens": 200, "temperature": 0}
    with cf.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: httpx.post(s.url + C, json=body, headers=auth, timeout=120).status_code, range(8)))
    assert codes.count(200) >= 2 and set(codes) <= {200, 429} and 429 in codes, codes
