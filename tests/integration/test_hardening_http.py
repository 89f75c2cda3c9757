"""The checklist's Body and HTTP rows against the live server: each row's status and error shape, and
a normal request succeeding right after it."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.support.chat_request import CHAT, GOOD, assert_healthy
from tests.support.checks import assert_openai_error
from tests.support.live_server import SERVED_MODEL, LiveServer
from tests.support.probes import peak_rss, raw_exchange


def _post_raw(base_url: str, content: bytes, **headers: str) -> httpx.Response:
    return httpx.post(base_url + CHAT, content=content, headers={"content-type": "application/json", **headers})


BODY_ROWS: list[tuple[str, bytes, int, str | None]] = [
    ("malformed json", b'{"model": "x", "messages": [', 400, None),
    ("empty body", b"", 400, None),
    ("array body", b"[]", 400, None),
    ("number body", b"42", 400, None),
    ("null body", b"null", 400, None),
    ("string body", b'"hello"', 400, None),
    ("missing messages", json.dumps({"model": SERVED_MODEL}).encode(), 400, "messages"),
    ("empty messages", json.dumps({"model": SERVED_MODEL, "messages": []}).encode(), 400, "messages"),
    ("messages not a list", json.dumps({"model": SERVED_MODEL, "messages": "hi"}).encode(), 400, "messages"),
    ("missing model", json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), 400, "model"),
    (
        "model not a string",
        json.dumps({"model": 7, "messages": [{"role": "user", "content": "x"}]}).encode(),
        400,
        "model",
    ),
    (
        "unknown role",
        json.dumps({"model": SERVED_MODEL, "messages": [{"role": "wizard", "content": "x"}]}).encode(),
        400,
        None,
    ),
    (
        "content a number",
        json.dumps({"model": SERVED_MODEL, "messages": [{"role": "user", "content": 5}]}).encode(),
        400,
        None,
    ),
    ("stream a list", json.dumps({**GOOD, "stream": [1]}).encode(), 400, "stream"),
    ("temperature a string", json.dumps({**GOOD, "temperature": "hot"}).encode(), 400, "temperature"),
    ("unknown model", json.dumps({**GOOD, "model": "gpt-4o"}).encode(), 404, "model"),
    (
        "NaN temperature",
        b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}' % SERVED_MODEL.encode(),
        400,
        "temperature",
    ),
    (
        "Infinity top_p",
        b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "top_p": Infinity}' % SERVED_MODEL.encode(),
        400,
        "top_p",
    ),
    (
        "-Infinity max_tokens",
        b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "max_tokens": -Infinity}'
        % SERVED_MODEL.encode(),
        400,
        "max_tokens",
    ),
    (
        "NaN in an unknown field",
        b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "extra": [1, NaN]}' % SERVED_MODEL.encode(),
        400,
        None,
    ),
    (
        "NaN seed",
        b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "seed": NaN}' % SERVED_MODEL.encode(),
        400,
        "seed",
    ),
    (
        "too many messages",
        json.dumps({"model": SERVED_MODEL, "messages": [{"role": "user", "content": "x"}] * 2049}).encode(),
        400,
        "messages",
    ),
    (
        "thousands of validation errors",
        json.dumps({"model": SERVED_MODEL, "messages": [{"role": "user", "content": 1}] * 2000}).encode(),
        400,
        None,
    ),
    ("deeply nested junk", b'{"model": "m", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, None),
]


@pytest.mark.parametrize(("name", "content", "status", "param"), BODY_ROWS, ids=[row[0] for row in BODY_ROWS])
def test_body_rows(name: str, content: bytes, status: int, param: str | None, base_url: str) -> None:
    response = _post_raw(base_url, content)
    error = assert_openai_error(response, status)
    if param is not None:
        assert error["param"] == param, error
    if status == 400:
        assert error["type"] == "invalid_request_error"
    assert_healthy(base_url)


def test_body_over_the_limit_is_413_before_it_is_sent(live_server: LiveServer) -> None:
    """A 1 GB Content-Length: the answer comes after the head alone, and the connection closes."""
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000000000\r\n\r\n"
    )
    body = (b"x" * 65536 for _ in range(16_000))
    response, sent, closed = raw_exchange(live_server.port, [head, *body], timeout=30)
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert sent < 64 * 2**20, sent  # far less than the body was sent before the answer
    assert closed
    body_json = json.loads(response.partition(b"\r\n\r\n")[2])
    assert body_json["error"]["code"] == "request_too_large"
    assert_healthy(live_server.base_url)


def test_chunked_body_over_the_limit_is_cut_off_with_413(live_server: LiveServer) -> None:
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"%x\r\n%s\r\n" % (2**20, b"x" * 2**20)
    response, sent, closed = raw_exchange(live_server.port, [head, *(chunk for _ in range(200))], timeout=60)
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert sent < 150 * 2**20
    assert closed
    assert_healthy(live_server.base_url)


def test_an_8_mb_header_is_431_and_never_buffered_whole(live_server: LiveServer) -> None:
    head = b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nX-Big: "
    filler = (b"a" * 65536 for _ in range(128))  # 8 MiB
    with peak_rss(live_server.process.pid) as rss:  # type: ignore[union-attr]
        response, sent, closed = raw_exchange(live_server.port, [head, *filler, b"\r\n\r\n"], timeout=30)
    assert response.startswith(b"HTTP/1.1 431"), response[:200]
    assert sent < 8 * 2**20, sent  # answered before the client was done (the rest sat in socket buffers)
    assert rss["peak"] - rss["before"] < 16, rss  # the server never held the header
    assert closed
    error = json.loads(response.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == "request_headers_too_large"
    assert_healthy(live_server.base_url)


def test_a_thousand_headers_is_431(live_server: LiveServer) -> None:
    head = b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n" + b"".join(b"X-H-%d: v\r\n" % i for i in range(1000))
    response, _sent, closed = raw_exchange(live_server.port, [head + b"\r\n"], timeout=30)
    assert response.startswith(b"HTTP/1.1 431"), response[:200]
    assert closed
    assert_healthy(live_server.base_url)
    # Through an ordinary client too: the answer is OpenAI-shaped.
    assert_openai_error(
        httpx.get(live_server.base_url + "/v1/models", headers={f"x-h-{i}": "v" for i in range(1000)}), 431
    )


@pytest.mark.parametrize("host", ["evil.example", "localhost/health?", "127.0.0.1:1/ready#", "a" * 2000])
def test_malicious_host_headers_change_nothing(host: str, base_url: str) -> None:
    response = httpx.post(base_url + CHAT, json=GOOD, headers={"Host": host}, timeout=120)
    assert response.status_code == 200, response.text
    missing = httpx.get(base_url + "/v1/models/", headers={"Host": host})
    assert_openai_error(missing, 404)
    assert "location" not in missing.headers


def test_trailing_slash_and_unknown_routes_are_openai_404s(base_url: str) -> None:
    assert_openai_error(httpx.post(base_url + CHAT + "/", json=GOOD), 404)
    assert_openai_error(httpx.get(base_url + "/v1/nothing"), 404)
    assert_healthy(base_url)


def test_options_and_wrong_methods_are_openai_405s(base_url: str) -> None:
    # CORS is off on this server: OPTIONS is a method like the others. (CORS off by default is also
    # tests/unit/test_front_door.py's; CORS as configured is tested live once, in tests/slow/test_faults.py.)
    assert_openai_error(httpx.options(base_url + CHAT), 405)
    assert_openai_error(httpx.get(base_url + CHAT), 405)
    assert_openai_error(httpx.delete(base_url + "/v1/models"), 405)
    assert_healthy(base_url)


def test_a_client_supplied_chat_template_is_never_rendered(base_url: str) -> None:
    """vLLM rendered request-supplied templates (GHSA-542m-9234-8gvf); here they are refused with a
    400 that says why, and template syntax in message text stays text."""
    literal = "{{ 7 * 7 }} {% for x in range(3) %}x{% endfor %}"
    plain = {**GOOD, "messages": [{"role": "user", "content": literal}]}
    reference = httpx.post(base_url + CHAT, json={**plain, "return_token_ids": True}, timeout=120)
    assert reference.status_code == 200, reference.text
    prompt = httpx.post(
        base_url + "/detokenize", json={"model": SERVED_MODEL, "tokens": reference.json()["prompt_token_ids"]}
    ).json()["prompt"]
    assert literal in prompt and "49" not in prompt
    hostile_fields = {
        "chat_template": "{{ ''.__class__.__mro__[1].__subclasses__() }}{% for i in range(10**9) %}{% endfor %}",
        "chat_template_kwargs": {"add_generation_prompt": False, "tools": "{{ 7 * 7 }}"},
    }
    for name, value in hostile_fields.items():
        response = httpx.post(base_url + CHAT, json={**plain, name: value}, timeout=120)
        error = assert_openai_error(response, 400, "unsupported_parameter")
        assert error["param"] == name and "model's own template" in error["message"]
    assert_healthy(base_url)


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
        b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header Name: v\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_requests_that_are_not_http_get_an_openai_shaped_400(raw: bytes, live_server: LiveServer) -> None:
    response, _sent, _closed = raw_exchange(live_server.port, [raw], timeout=10)
    assert response.startswith(b"HTTP/1.1 400"), response[:200]
    body = json.loads(response.partition(b"\r\n\r\n")[2])
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert_healthy(live_server.base_url)
