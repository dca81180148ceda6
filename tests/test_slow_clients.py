"""Slow clients cannot stall the API (issue 13), with real processes: the stack of tests/stack.py (a private Redis,
`python worker.py` on the tiny bundle, `gunicorn app:app` with 2 workers reading gunicorn.conf.py, as make serve
runs it) and a private nginx started from the repository's config (deploy/nginx/nginx.conf.template) in front.

20 connections POST a job body one byte a second and stay open; meanwhile /healthz must answer within
HEALTHZ_LIMIT s, straight to gunicorn and through nginx. Also through nginx: its own errors (413 and the others)
in the service's JSON shape, the security headers, and a normal job that finishes.

nginx is found through $NGINX_PATH, else `nginx` on PATH, else /usr/sbin/nginx. Without it the nginx tests are
skipped with the reason, except in CI (env CI set), where a missing nginx is a failure (.ci/run installs it).
"""

from __future__ import annotations

import copy
import http.client
import io
import json
import os
import re
import socket
import statistics
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.localstack import wait_until
from service.settings import Settings
from stack import Nginx, SlowUploads, find_nginx, healthz_latency

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

SLOW_CLIENTS = 20
HEALTHZ_LIMIT = 2.0  # seconds; an unloaded /healthz takes a few ms


def _nginx_binary() -> str:
    binary = find_nginx()
    if binary is None:
        reason = "no nginx: install Debian's `nginx` package or set NGINX_PATH"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI is set: the proxy tests must run; .ci/run installs Debian's nginx)")
        pytest.skip(reason)
    return binary


@pytest.fixture(scope="module")
def nginx_binary() -> str:
    return _nginx_binary()


@pytest.fixture(scope="module")
def proxy(nginx_binary, stack):
    """nginx in front of the stack's gunicorn, with the stack's upload limit (as an operator keeps them equal)."""
    nginx = Nginx(nginx_binary, stack.web_port, stack.root, max_body=stack.settings.max_upload_bytes)
    yield nginx
    nginx.close()


def _via(stack, url: str):
    """The stack's HTTP helpers (post, submit, wait, request) pointed at another URL."""
    other = copy.copy(stack)
    other.url = url
    return other


def _healthz_under_slow_uploads(port: int) -> list[float]:
    """/healthz latencies on `port` while SLOW_CLIENTS uploads to `port` are open: two probes after each of the
    drip rounds 2..6 (about 5 s). Asserts that no slow upload was answered or closed meanwhile, so they really
    were held open for the whole measurement."""
    uploads = SlowUploads(port, count=SLOW_CLIENTS, interval=1.0)
    latencies = []
    try:
        for round_ in range(2, 7):
            assert uploads.wait_rounds(round_, timeout=30), "the drip thread stalled"
            latencies += [healthz_latency(port, timeout=60) for _ in range(2)]
        assert uploads.answered() == 0, "a slow upload was answered or closed before it was complete"
    finally:
        uploads.close()
    return latencies


def _report(where: str, latencies: list[float]) -> str:
    median = statistics.median(latencies) * 1000
    return (f"{where}: /healthz with {SLOW_CLIENTS} slow uploads open: median {median:.1f} ms, "
            f"max {max(latencies) * 1000:.1f} ms over {len(latencies)} requests")


# ------------------------------------------------------------------------------------------- slow uploads


def test_healthz_answers_while_slow_uploads_hold_gunicorn(stack):
    """Straight to gunicorn as make serve configures it (gthread, WEB_THREADS threads per worker): each slow
    upload holds one thread, and the others keep answering."""
    latencies = _healthz_under_slow_uploads(stack.web_port)
    print(_report("gunicorn", latencies))
    assert max(latencies) < HEALTHZ_LIMIT, _report("gunicorn", latencies)
    assert stack.get("/healthz") == (200, {"status": "ok"})


def test_healthz_answers_through_nginx_while_slow_uploads_are_open(stack, proxy):
    """Through nginx: the slow bodies stay in nginx, gunicorn never sees them."""
    latencies = _healthz_under_slow_uploads(proxy.port)
    print(_report("nginx", latencies))
    assert max(latencies) < HEALTHZ_LIMIT, _report("nginx", latencies)
    # The probes went through nginx (it logs a request just after sending the answer: wait for the last line).
    assert wait_until(lambda: proxy.access_log().count("GET /healthz") >= len(latencies), 10), proxy.access_log()
    # The slow uploads, closed unfinished by the client, never reached gunicorn: nginx logs each one with no
    # upstream response time ("urt=-"), it never opened a connection to gunicorn for them.
    posts = lambda: [line for line in proxy.access_log().splitlines() if '"POST /api/v1/jobs' in line]  # noqa: E731
    assert wait_until(lambda: len(posts()) >= SLOW_CLIENTS, 10), proxy.access_log()
    assert len(posts()) == SLOW_CLIENTS and all(" urt=- " in line for line in posts()), posts()


# ------------------------------------------------------------------------------------------- through nginx


def _photo(size: int, noise: bool = False) -> bytes:
    rng = np.random.default_rng(7)
    if noise:  # incompressible: a JPEG of a few hundred KB, over the proxy's in-memory body buffer (128 KB)
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    else:
        pixels = np.zeros((size, size, 3), dtype=np.uint8)
        pixels[:, : size // 2] = (200, 60, 30)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def test_a_job_through_nginx_finishes(stack, proxy):
    via = _via(stack, proxy.url)
    big = _photo(400, noise=True)
    assert len(big) > 128 * 1024  # buffered to a temporary file by nginx, then sent to gunicorn in one go
    job_id = via.submit("what color is it?", [big], tasks="vqa")
    result = via.wait(job_id, timeout=90)
    assert result["status"] == "finished", result
    assert via.get(f"/api/v1/jobs/{job_id}")[1]["status"] == "finished"
    # The service's own JSON errors pass through unchanged.
    status, body = via.get("/api/v1/jobs/0123456789abcdef0123456789abcdef")
    assert (status, body) == stack.get("/api/v1/jobs/0123456789abcdef0123456789abcdef")
    assert status == 404 and set(body["error"]) >= {"code", "message"}


def _raw(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read one answer: its head, then Content-Length bytes of body. (Not up to EOF: after a 413
    nginx waits a few seconds for the announced body before it closes the connection.)"""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {received!r}"
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        while len(body) < int(headers["content-length"]):
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {received!r}"
            body += chunk
    return int(lines[0].split()[1]), headers, body


def _too_large(port: int, length: int, send_body: bool = False) -> tuple[int, dict[str, str], bytes]:
    """A job POST that announces `length` bytes of body and sends none (nginx answers from the header), or all of
    them (the service reads and drops an oversized body before its 413, so a client still sending gets it)."""
    head = (f"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: "
            f"multipart/form-data; boundary=b\r\nContent-Length: {length}\r\n\r\n").encode()
    return _raw(port, head + (b"x" * length if send_body else b""))


def test_nginx_refuses_a_too_large_body_with_the_services_json(stack, proxy):
    limit = stack.settings.max_upload_bytes
    status, headers, body = _too_large(proxy.port, limit + 1)
    assert status == 413 and headers["content-type"] == "application/json", (status, headers, body)
    expected = {"error": {"code": "payload_too_large",
                          "message": f"the request is larger than the limit of {limit} bytes"}}
    assert json.loads(body) == expected
    assert headers["x-content-type-options"] == "nosniff"
    # Word for word what the service itself answers (service/web/app.py), so clients see one error either way.
    direct_status, _, direct_body = _too_large(stack.web_port, limit + 1, send_body=True)
    assert (direct_status, json.loads(direct_body)) == (413, expected)
    # At the limit nginx passes the request on (the service then judges the body itself).
    via = _via(stack, proxy.url)
    status, body, _ = via.post(fields={"text": "what is it?"}, files=[("image", b"\0" * (limit - 400))])
    assert status == 400 and body["error"]["code"] != "payload_too_large", body  # not an image


def test_nginx_own_errors_are_json_in_the_services_shape(stack, proxy, nginx_binary):
    cases = {
        400: b"NOT HTTP\r\n\r\n",
        414: b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    }
    for expected, raw in cases.items():
        status, headers, body = _raw(proxy.port, raw)
        assert status == expected and headers["content-type"] == "application/json", (status, headers, body)
        error = json.loads(body)["error"]
        assert set(error) == {"code", "message"} and error["code"] and error["message"]
        assert headers["x-frame-options"] == "DENY"
    # 502 when gunicorn is not there: a second nginx pointed at a port nobody listens on.
    dead = Nginx(nginx_binary, upstream_port=_closed_port(), log_dir=stack.root)
    try:
        status, headers, body = _raw(dead.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status == 502 and headers["content-type"] == "application/json"
        assert json.loads(body)["error"]["code"] == "bad_gateway"
        assert "content-security-policy" in headers
    finally:
        dead.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed on return: nothing listens there


CSP = {"default-src": "'none'", "script-src": "'self'", "style-src": "'self'", "frame-ancestors": "'none'"}


def test_security_headers_on_the_page(stack, proxy):
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    connection.request("GET", "/", headers={"Accept": "text/html"})  # a browser's request; JSON otherwise
    response = connection.getresponse()
    page = response.read().decode()
    connection.close()
    assert response.status == 200 and "<html" in page
    headers = {k.lower(): v for k, v in response.getheaders()}
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["server"] == "nginx"  # no version (server_tokens off)
    policy = dict(d.strip().split(None, 1) for d in headers["content-security-policy"].split(";") if d.strip())
    for directive, value in CSP.items():
        assert policy[directive] == value, policy
    # What the page needs is allowed, and nothing inline is: its script and style come from its own origin, the
    # chosen images are shown through blob: URLs, its favicon is a data: URL, and app.js calls the API by fetch().
    assert re.findall(r'<script src="([^"]+)"', page) == ["static/app.js"]
    assert re.findall(r'<link rel="stylesheet" href="([^"]+)"', page) == ["static/style.css"]
    assert not re.search(r"<script(?![^>]*\bsrc=)", page) and "<style" not in page and " style=" not in page
    assert not re.search(r"\son[a-z]+=", page)  # no inline event handlers
    script = (ROOT / "service" / "static" / "app.js").read_text()
    assert "createObjectURL" in script and "blob:" in policy["img-src"] and "data:" in policy["img-src"]
    assert "fetch(" in script and policy["connect-src"] == "'self'"
    # The static files come through with their own types and the headers.
    for path, kind in (("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
        connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        connection.close()
        assert response.status == 200 and kind in response.getheader("Content-Type")
        assert response.getheader("X-Content-Type-Options") == "nosniff"


def test_the_template_limit_is_the_services_default():
    from stack import _render_module

    render = _render_module()
    assert render.default_max_body() == Settings().max_upload_bytes == 20 * 1024 * 1024
    text = render.render(render.values_for("web:5000", "5000", Path("/tmp")))
    assert "client_max_body_size 20971520;" in text
    assert "the limit of 20971520 bytes" in text
    assert not re.search(r"\$\{PROXY_[A-Z_]+\}", text)  # every placeholder filled
    assert re.search(r"proxy_request_buffering on;", text)
    for directive in ("client_body_timeout", "client_header_timeout", "send_timeout"):
        seconds = int(re.search(rf"{directive} (\d+)s;", text).group(1))
        assert 5 <= seconds <= 15, directive
    with pytest.raises(ValueError):
        render.render({**render.values_for("web:5000", "5000", Path("/tmp")), "PROXY_LISTEN": "5000; evil"})
