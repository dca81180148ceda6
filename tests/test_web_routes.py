"""The web page's routes without a browser (fast, no Redis needed): content negotiation on GET /, the static
files, and a page that loads nothing from outside the service. The browser flow is in tests/test_web_page.py."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from service.web import create_app
from service.settings import Settings

STATIC = Path(__file__).resolve().parent.parent / "service" / "static"
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"


@pytest.fixture(scope="module")
def client():
    return create_app(Settings(redis_url="redis://127.0.0.1:1/0")).test_client()  # no connection is made


@pytest.mark.parametrize("accept, kind", [
    (BROWSER_ACCEPT, "text/html"),
    ("text/html", "text/html"),
    (None, "application/json"),  # curl and scripts that send no Accept
    ("*/*", "application/json"),
    ("application/json", "application/json"),
    ("application/json, text/html;q=0.5", "application/json"),
])
def test_root_serves_the_page_to_browsers_and_json_to_api_clients(client, accept, kind):
    response = client.get("/", headers={"Accept": accept} if accept else {})
    assert response.status_code == 200 and response.mimetype == kind
    if kind == "text/html":
        assert b'<form id="job-form"' in response.data
        assert "Accept" in response.headers.get("Vary", "")  # a cache must not hand the page to an API client
    else:
        assert response.get_json()["submit"] == "/api/v1/jobs"


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls: list[str] = []
        self.labelled: set[str] = set()
        self.controls: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("src", "href", "action"):
            if attrs.get(name):
                self.urls.append(attrs[name])
        if tag == "label" and attrs.get("for"):
            self.labelled.add(attrs["for"])
        if tag in ("input", "textarea", "select"):
            self.controls.append(attrs.get("id", "?"))


def test_page_assets_are_served_and_local(client):
    parser = _Links()
    parser.feed((STATIC / "index.html").read_text(encoding="utf-8"))
    assert parser.urls, "the page links its script and styles"
    for url in parser.urls:
        # Relative URLs only: nothing from a CDN, and the page works under a proxy's path prefix.
        assert not re.match(r"^([a-z]+:)?//|^/", url), url
    for asset in ("static/app.js", "static/style.css"):
        assert asset in parser.urls
        response = client.get("/" + asset)
        assert response.status_code == 200 and response.data == (STATIC / Path(asset).name).read_bytes()
    missing = client.get("/static/nope.js")
    assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "not_found"
    # Every form control has a label.
    assert set(parser.controls) <= parser.labelled, set(parser.controls) - parser.labelled


def test_script_uses_only_the_service_api():
    script = (STATIC / "app.js").read_text(encoding="utf-8")
    assert not re.search(r"https?://", script)
    assert '"api/v1/tasks"' in script and '"api/v1/jobs"' in script


# ------------------------------------------------------------------------- security headers, 413 wording

def test_every_answer_carries_the_security_headers_the_proxy_also_sets(client):
    from service.web.app import SECURITY_HEADERS

    for response in (client.get("/", headers={"Accept": "text/html"}), client.get("/healthz"),
                     client.get("/no/such/route"), client.post("/api/v1/jobs", data={})):
        for name, value in SECURITY_HEADERS.items():
            assert response.headers[name] == value, (response.request.path, name)
    assert "frame-ancestors 'none'" in SECURITY_HEADERS["Content-Security-Policy"]
    template = (Path(__file__).resolve().parent.parent / "deploy" / "nginx" / "nginx.conf.template").read_text()
    proxied = dict(re.findall(r'^\s*add_header (\S+) "([^"]*)" always;', template, re.M))
    assert proxied == SECURITY_HEADERS  # make serve without the proxy and compose with it send the same


def test_413_says_which_limit_was_hit():
    import io

    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0", max_upload_bytes=2_000_000))
    client = app.test_client()
    big_field = client.post("/api/v1/jobs", data={"text": "x" * 600_000, "image": (io.BytesIO(b"x"), "a.jpg")})
    assert big_field.status_code == 413 and big_field.get_json()["error"] == {
        "code": "payload_too_large",
        "message": "a text field of the form is larger than 500000 bytes, or the form has more than 1000 parts"}
    parts = {f"field{i}": "1" for i in range(1001)}
    many = client.post("/api/v1/jobs", data={**parts, "image": (io.BytesIO(b"x"), "a.jpg")})
    assert many.status_code == 413 and "more than 1000 parts" in many.get_json()["error"]["message"]
    whole = client.post("/api/v1/jobs", data={"text": "hi", "image": (io.BytesIO(b"x" * 2_100_000), "a.jpg")})
    assert whole.status_code == 413 and whole.get_json()["error"]["message"] == (
        "the request is larger than the limit of 2000000 bytes")
