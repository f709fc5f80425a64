"""The official `openai` package against a live server: completion, chat, streaming, a memory's round trip."""
from __future__ import annotations

import httpx
import pytest

openai = pytest.importorskip("openai")

from .conftest import MODEL  # noqa: E402


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_models_completion_chat_and_usage(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = client.completions.create(model=MODEL, prompt="The copper key is", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 6 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = client.completions.create(model=MODEL, prompt="The copper key is", max_tokens=6, temperature=0)
    assert again.choices[0].text == r.choices[0].text                       # greedy is deterministic
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Where is the key?"}],
                                       max_tokens=5, temperature=0)
    assert c.choices[0].message.role == "assistant" and c.usage.completion_tokens <= 5
    s1 = client.completions.create(model=MODEL, prompt="Call me", max_tokens=6, temperature=1.0, seed=7)
    s2 = client.completions.create(model=MODEL, prompt="Call me", max_tokens=6, temperature=1.0, seed=7)
    assert s1.choices[0].text == s2.choices[0].text                         # a seed fixes sampling


def test_streaming_gives_the_same_text(client):
    whole = client.completions.create(model=MODEL, prompt="Call me Ishmael.", max_tokens=10, temperature=0)
    parts = list(client.completions.create(model=MODEL, prompt="Call me Ishmael.", max_tokens=10, temperature=0,
                                           stream=True, stream_options={"include_usage": True}))
    assert "".join(p.choices[0].text for p in parts if p.choices) == whole.choices[0].text
    assert parts[-1].usage.completion_tokens == whole.usage.completion_tokens
    chat = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=5, temperature=0, stream=True))
    one = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0)
    assert "".join(p.choices[0].delta.content or "" for p in chat) == one.choices[0].message.content
    assert chat[-1].choices[0].finish_reason == one.choices[0].finish_reason


def test_stop_sequences_cut_the_answer(client):
    full = client.completions.create(model=MODEL, prompt="The lighthouse", max_tokens=12, temperature=0).choices[0].text
    stop = full[3:5]
    cut = client.completions.create(model=MODEL, prompt="The lighthouse", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt="The lighthouse", max_tokens=12, temperature=0, stop=[stop], stream=True)
    assert "".join(p.choices[0].text for p in streamed if p.choices) == cut.choices[0].text


def test_a_memory_round_trip(client, server):
    base = client.completions.create(model=MODEL, prompt="Where is the copper key?", max_tokens=8, temperature=0)
    mem = httpx.post(server.url + "/v1/memories", json={"id": "alice"}).json()
    assert mem["id"] == "alice" and mem["injections"] == 0
    r = httpx.post(server.url + "/v1/memories/alice/inject", json={"text": "The copper key is in the old desk. " * 4}, timeout=60)
    assert r.status_code == 200, r.text
    inj = r.json()
    assert inj["chunks"] >= 2 and inj["injection_ids"] == list(range(inj["chunks"]))
    ask = dict(model=MODEL, prompt="Where is the copper key?", max_tokens=8, temperature=0)
    alice = client.completions.create(**ask, extra_body={"memory_id": "alice"})
    assert client.completions.create(**ask).choices[0].text == base.choices[0].text     # default unchanged
    fork = httpx.post(server.url + "/v1/memories/alice/fork", json={"id": "alice-copy"}).json()
    assert fork["parent"] == "alice" and fork["injections"] == inj["chunks"]
    assert client.completions.create(**ask, extra_body={"memory_id": "alice-copy"}).choices[0].text == alice.choices[0].text
    plain = httpx.post(server.url + "/v1/memories/alice-copy/inject?chunk_tokens=8", content="Call me Ishmael. " * 5,
                       headers={"content-type": "text/plain"}).json()
    assert plain["memory"]["injections"] == inj["chunks"] + plain["chunks"]
    listed = {m["id"] for m in httpx.get(server.url + "/v1/memories").json()["data"]}
    assert {"default", "alice", "alice-copy"} <= listed
    assert httpx.delete(server.url + "/v1/memories/alice-copy").json()["deleted"] is True
    assert httpx.get(server.url + "/v1/memories/alice-copy").status_code == 404
    assert client.completions.create(**ask, extra_body={"memory_id": "alice"}).choices[0].text == alice.choices[0].text
