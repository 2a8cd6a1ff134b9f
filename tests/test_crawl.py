"""The crawler against a local HTTP server with fixture pages, hostile ones included, and ddgs on recorded responses.

Only the network edge is replaced: the crawler talks real HTTP to a ThreadingHTTPServer on 127.0.0.1, and ddgs's
HttpClient.request (the call that would reach DuckDuckGo) answers from tests/fixtures/crawl/.
"""

from __future__ import annotations

import io
import itertools
import json
import sys
import threading
import time
import tracemalloc
import urllib.parse
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import urllib3.util.connection
from PIL import Image

from backend.ingest.crawl import (
    REASONS,
    CrawledImage,
    CrawlSettings,
    Refused,
    crawl_page,
    crawl_search,
    crawl_urls,
    largest_srcset_candidate,
    normalize_url,
    resolve_checked,
)
from backend.ingest.providers import DuckDuckGoImages, SearchError, SearchHit

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "crawl"
HUGE_BYTES = 50 * 1024 * 1024
ROBOTS = b"""User-agent: yolodex-crawler
Disallow: /private/
Disallow: /img/not-for-yolodex.png

User-agent: *
Disallow: /private/
"""
# Tests reach their own server on 127.0.0.1, so they turn the SSRF rule off, and never wait between requests
# unless they measure the rate limit.
LOCAL = CrawlSettings(min_interval_s=0.0, allow_private_addresses=True, read_timeout_s=5.0, total_timeout_s=10.0)


def encode_image(name: str) -> bytes:
    """A small image whose colour depends on the name, in the format its extension says."""
    colour = tuple(sum(name.encode()) * factor % 256 for factor in (7, 13, 29))
    size = (64, 48) if "large" not in name else (160, 120)
    buffer = io.BytesIO()
    suffix = Path(name).suffix.lower()
    image_format = {".png": "PNG", ".webp": "WEBP"}.get(suffix, "JPEG")
    Image.new("RGB", size, colour).save(buffer, image_format)
    return buffer.getvalue()


class FixtureHandler(BaseHTTPRequestHandler):
    """Serves the fixture site; every request is logged with its arrival time and user agent."""

    server: FixtureServer

    def log_message(self, *args: object) -> None:  # keep pytest's output clean
        pass

    def send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str) -> None:
        self.send(302, b"", "text/plain", {"Location": location})

    def do_GET(self) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        self.server.log.append((time.monotonic(), path, self.headers.get("User-Agent", "")))
        name = Path(path).name
        if path == "/robots.txt":
            self.send(200, ROBOTS, "text/plain")
        elif path.startswith(("/img/", "/private/")):
            self.send(200, encode_image(name), "image/png" if name.endswith(".png") else "image/jpeg")
        elif path.startswith("/pages/") and (FIXTURES / "site" / name).is_file():
            page = (FIXTURES / "site" / name).read_text().replace("__PORT__", str(self.server.server_port))
            self.send(200, page.encode(), "text/html; charset=utf-8")
        elif path == "/lying/html-as-jpeg.jpg":
            self.send(200, b"<!DOCTYPE html><html><body>Login required</body></html>", "image/jpeg")
        elif path == "/lying/jpeg-as-text.jpg":
            self.send(200, encode_image("red.jpg"), "text/plain")
        elif path == "/lying/jpeg-as-html.html":
            self.send(200, encode_image("red.jpg"), "text/html")
        elif path == "/truncated.jpg":
            data = encode_image("large.jpg")
            self.send(200, data[: len(data) // 2], "image/jpeg")
        elif path == "/huge.jpg":
            self.stream_huge()
        elif path == "/huge-declared.jpg":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(HUGE_BYTES))
            self.end_headers()
            self.wfile.write(b"\xff\xd8\xff")
        elif path == "/slow.jpg":
            time.sleep(1.5)
            self.send(200, encode_image("red.jpg"), "image/jpeg")
        elif path == "/redirect/a.jpg":
            self.redirect("/redirect/b.jpg")
        elif path == "/redirect/b.jpg":
            self.redirect(f"http://127.0.0.1:{self.server.server_port}/redirect/a.jpg")
        elif path.startswith("/redirect/chain/"):
            hops = int(Path(path).stem)
            self.redirect(f"/redirect/chain/{hops - 1}.jpg") if hops > 0 else self.redirect("/img/chain-end.jpg")
        elif path == "/redirect/to-internal.jpg":
            self.redirect("http://169.254.169.254/latest/meta-data/iam/role.jpg")
        elif path.startswith("/mirror/"):  # stand-in for the hosts of recorded search hits
            if path.endswith((".jpg", ".png", ".webp")):
                image_type = "image/webp" if path.endswith(".webp") else "image/jpeg"
                self.send(200, encode_image(name), "image/png" if path.endswith(".png") else image_type)
            else:  # "share.php": an HTML page where the search engine promised an image
                self.send(200, b"<!doctype html><title>Fans celebrate</title>", "text/html")
        else:
            self.send(404, b"not found", "text/plain")

    def stream_huge(self) -> None:
        """50 MB of zeros after a JPEG marker, with no Content-Length: only reading tells how big it is."""
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.end_headers()
        chunk = bytes(64 * 1024)
        sent = 0
        try:
            self.wfile.write(b"\xff\xd8\xff\xe0")
            while sent < HUGE_BYTES:
                self.wfile.write(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.server.huge_sent = sent


class FixtureServer(ThreadingHTTPServer):
    daemon_threads = True
    log: list[tuple[float, str, str]]
    huge_sent: int

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):  # the crawler hung up: fine
            super().handle_error(request, client_address)

    def paths(self) -> list[str]:
        return [path for _, path, _ in self.log]


@pytest.fixture(scope="module")
def server():
    httpd = FixtureServer(("127.0.0.1", 0), FixtureHandler)
    httpd.log, httpd.huge_sent = [], 0
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def site(server):
    """The server's origin, with a fresh request log."""
    server.log.clear()
    return f"http://127.0.0.1:{server.server_port}"


@pytest.fixture
def connections(monkeypatch):
    """Every (host, port) the crawler opens a TCP connection to."""
    opened: list[tuple[str, int]] = []
    real = urllib3.util.connection.create_connection

    def recording(address, *args, **kwargs):
        opened.append(address)
        return real(address, *args, **kwargs)

    monkeypatch.setattr(urllib3.util.connection, "create_connection", recording)
    return opened


def reasons(report) -> dict[str, str]:
    """url -> reason for everything skipped or rejected."""
    return {entry["url"]: entry["reason"] for entry in report.skipped + report.rejected}


# ---------------------------------------------------------------------------------------------------------------
# SSRF


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "169.254.169.254",
        "10.0.0.1",
        "192.168.1.1",
        "0.0.0.0",
        "::1",
        "::ffff:127.0.0.1",
        "224.0.0.1",
        "100.64.0.1",
        "fd00::1",
        "localhost",
        "2130706433",
    ],
)
def test_ssrf_refuses_internal_addresses_by_default(host):
    with pytest.raises(Refused) as refusal:
        resolve_checked(host, 80, CrawlSettings())
    assert refusal.value.reason == "ssrf"
    assert resolve_checked(host, 80, replace(CrawlSettings(), allow_private_addresses=True))


def test_ssrf_allows_public_addresses_and_allowed_networks():
    assert resolve_checked("93.184.215.14", 80, CrawlSettings()) == ["93.184.215.14"]
    assert resolve_checked("2606:4700::1111", 443, CrawlSettings()) == ["2606:4700::1111"]
    nas = CrawlSettings(allowed_networks=("192.168.1.20/32",))
    assert resolve_checked("192.168.1.20", 80, nas) == ["192.168.1.20"]
    with pytest.raises(Refused):
        resolve_checked("192.168.1.21", 80, nas)


def test_default_settings_refuse_the_local_server_without_connecting(site, server, connections):
    kept: list[CrawledImage] = []
    report = crawl_urls([f"{site}/img/red.jpg"], CrawlSettings(), kept.append)
    assert kept == [] and report.kept == 0
    assert report.skipped[0]["reason"] == "ssrf" and "127.0.0.1" in report.skipped[0]["detail"]
    assert connections == [] and server.log == []


def test_page_linking_to_internal_addresses(site, server, connections):
    """Only the page's own server is allowed: metadata service, private LAN and IPv6 loopback are refused."""
    settings = replace(LOCAL, allow_private_addresses=False, allowed_networks=("127.0.0.1/32",))
    kept: list[CrawledImage] = []
    report = crawl_page(f"{site}/pages/internal.html", 0, settings, kept.append)
    found = reasons(report)
    port = server.server_port
    for url in (
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/role.jpg",
        "http://10.0.0.1/admin/camera.jpg",
        f"http://[::1]:{port}/img/red.jpg",
        "http://192.168.1.1/router.png",
        f"{site}/redirect/to-internal.jpg",  # refused at the redirect hop
    ):
        assert found[url] == "ssrf", url
    assert [image.source_url for image in kept] == [f"{site}/img/red.jpg"]
    assert {host for host, _ in connections} == {"127.0.0.1"}
    assert not any("meta-data" in path for path in server.paths())


# ---------------------------------------------------------------------------------------------------------------
# Image URLs


def test_crawl_urls_keeps_images_with_provenance(site, server):
    kept: list[CrawledImage] = []
    urls = [f"{site}/img/red.jpg", f"{site}/img/blue photo.png", f"{site}/img/red.jpg#again", "file:///etc/passwd"]
    report = crawl_urls(urls, LOCAL, kept.append)
    assert [image.original_name for image in kept] == ["red.jpg", "blue photo.png"]
    red, blue = kept
    assert red.data == encode_image("red.jpg") and red.content_type == "image/jpeg"
    assert blue.source_url == f"{site}/img/blue%20photo.png" and blue.content_type == "image/png"
    assert (blue.width, blue.height, blue.page_url, blue.licence_hint) == (64, 48, None, None)
    assert reasons(report) == {f"{site}/img/red.jpg": "duplicate_url", "file:///etc/passwd": "bad_url"}
    assert (report.fetched, report.kept) == (2, 2)
    assert all(agent.startswith("yolodex-crawler/") for _, _, agent in server.log)
    json.dumps(report.to_dict())  # the CLI prints it with --json


def test_lying_content_types_truncation_and_missing(site):
    kept: list[CrawledImage] = []
    report = crawl_urls(
        [
            f"{site}/lying/html-as-jpeg.jpg",
            f"{site}/lying/jpeg-as-text.jpg",
            f"{site}/truncated.jpg",
            f"{site}/missing.jpg",
        ],
        LOCAL,
        kept.append,
    )
    assert kept == []
    by_url = {entry["url"].rsplit("/", 1)[1]: entry for entry in report.rejected}
    assert by_url["html-as-jpeg.jpg"]["reason"] == "not_an_image" and "HTML" in by_url["html-as-jpeg.jpg"]["detail"]
    assert (
        by_url["jpeg-as-text.jpg"]["reason"] == "not_an_image" and "text/plain" in by_url["jpeg-as-text.jpg"]["detail"]
    )
    assert by_url["truncated.jpg"]["reason"] == "decode_failed"
    assert by_url["missing.jpg"]["reason"] == "http_error" and "404" in by_url["missing.jpg"]["detail"]
    assert {entry["reason"] for entry in report.rejected} <= set(REASONS)


def test_huge_body_is_cut_at_the_cap_without_buffering(site, server):
    settings = replace(LOCAL, max_image_bytes=1024 * 1024)
    tracemalloc.start()
    try:
        report = crawl_urls([f"{site}/huge.jpg", f"{site}/huge-declared.jpg"], settings, lambda image: None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [entry["reason"] for entry in report.rejected] == ["too_big", "too_big"]
    assert "cut while downloading" in report.rejected[0]["detail"]
    assert "Content-Length" in report.rejected[1]["detail"]
    assert peak < 4 * 1024 * 1024  # the cap plus one chunk, not 50 MB
    deadline = time.monotonic() + 2
    while not server.huge_sent and time.monotonic() < deadline:  # the handler notices the closed socket
        time.sleep(0.01)
    assert 0 < server.huge_sent < HUGE_BYTES / 2


def test_slow_response_times_out(site):
    settings = replace(LOCAL, read_timeout_s=0.2)
    started = time.monotonic()
    report = crawl_urls([f"{site}/slow.jpg"], settings, lambda image: None)
    assert report.rejected[0]["reason"] == "timeout"
    assert time.monotonic() - started < 1.0  # the server would answer after 1.5 s


def test_redirects_loops_and_limits(site):
    kept: list[CrawledImage] = []
    report = crawl_urls(
        [f"{site}/redirect/a.jpg", f"{site}/redirect/chain/3.jpg", f"{site}/redirect/chain/7.jpg"],
        LOCAL,
        kept.append,
    )
    found = reasons(report)
    assert found[f"{site}/redirect/a.jpg"] == "redirect_loop"
    assert found[f"{site}/redirect/chain/7.jpg"] == "too_many_redirects"
    assert [(image.source_url, image.final_url) for image in kept] == [
        (f"{site}/redirect/chain/3.jpg", f"{site}/img/chain-end.jpg")
    ]
    assert kept[0].original_name == "chain-end.jpg"


def test_robots_txt_is_respected_and_cached(site, server):
    report = crawl_urls(
        [
            f"{site}/private/secret.jpg",
            f"{site}/img/not-for-yolodex.png",
            f"{site}/img/red.jpg",
            f"{site}/img/green.png",
        ],
        LOCAL,
        lambda image: None,
    )
    assert reasons(report) == {f"{site}/private/secret.jpg": "robots", f"{site}/img/not-for-yolodex.png": "robots"}
    assert "robots.txt" in report.skipped[0]["detail"]
    assert server.paths() == ["/robots.txt", "/img/red.jpg", "/img/green.png"]


def test_rate_limit_spaces_requests_to_one_host(site, server):
    settings = replace(LOCAL, min_interval_s=0.2)
    crawl_urls([f"{site}/img/{colour}.jpg" for colour in ("red", "green", "blue")], settings, lambda image: None)
    times = [arrived for arrived, _, _ in server.log]
    assert len(times) == 4  # robots.txt counts as a request to the host
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert min(gaps) >= 0.19, gaps


def test_sink_errors_are_reported_and_the_crawl_goes_on(site):
    def sink(image: CrawledImage) -> None:
        if image.original_name == "red.jpg":
            raise OSError("disk full")

    report = crawl_urls([f"{site}/img/red.jpg", f"{site}/img/green.jpg"], LOCAL, sink)
    assert report.kept_urls == [f"{site}/img/green.jpg"]
    assert report.rejected == [{"url": f"{site}/img/red.jpg", "reason": "sink_error", "detail": "OSError: disk full"}]


# ---------------------------------------------------------------------------------------------------------------
# Pages


def test_page_images_srcset_og_links_and_licence(site):
    kept: list[CrawledImage] = []
    report = crawl_page(f"{site}/pages/index.html", 0, LOCAL, kept.append)
    assert report.pages_visited == [f"{site}/pages/index.html"]
    assert [image.source_url.removeprefix(site) for image in kept] == [
        "/img/og.png",  # <meta property="og:image">
        "/img/large.jpg",  # the largest srcset candidate (1280w), not src or 640w
        "/img/relative.jpg",  # relative to the page
        "/img/blue%20photo.png",  # <a href> to an image file
        "/img/red.jpg",
    ]
    assert {image.page_url for image in kept} == {f"{site}/pages/index.html"}
    assert {image.licence_hint for image in kept} == {"https://creativecommons.org/licenses/by-sa/4.0/"}
    assert reasons(report) == {f"{site}/private/secret.jpg": "robots"}
    assert (kept[1].width, kept[1].height) == (160, 120)


def test_page_depth_and_same_site(site, server):
    kept: list[CrawledImage] = []
    report = crawl_page(f"{site}/pages/index.html", 1, LOCAL, kept.append)
    assert report.pages_visited == [f"{site}/pages/index.html", f"{site}/pages/child.html"]
    child = [image for image in kept if image.page_url.endswith("child.html")]
    assert [image.original_name for image in child] == ["child-2x.png"]
    assert child[0].licence_hint == "CC0 1.0"
    assert "/pages/elsewhere.html" not in server.paths()  # localhost is another site than 127.0.0.1

    deeper = crawl_page(f"{site}/pages/index.html", 2, LOCAL, lambda image: None)
    assert deeper.pages_visited[-1] == f"{site}/pages/grandchild.html"
    any_site = crawl_page(f"{site}/pages/index.html", 1, replace(LOCAL, same_site_only=False), lambda image: None)
    assert f"http://localhost:{server.server_port}/pages/elsewhere.html" in any_site.pages_visited

    capped = crawl_page(f"{site}/pages/index.html", 1, replace(LOCAL, max_pages=1), lambda image: None)
    assert len(capped.pages_visited) == 1
    assert {entry["reason"] for entry in capped.skipped if "pages/" in entry["url"]} == {"limit"}


def test_lying_pages(site):
    report = crawl_page(f"{site}/lying/jpeg-as-html.html", 1, LOCAL, lambda image: None)
    assert report.pages_visited == [] and report.rejected[0]["reason"] == "not_a_page"
    report = crawl_page(f"{site}/img/red.jpg", 1, LOCAL, lambda image: None)
    assert report.rejected[0]["reason"] == "not_a_page" and "image/jpeg" in report.rejected[0]["detail"]


def test_url_helpers():
    assert normalize_url("HTTP://Example.COM:80/a b/ü.jpg?x=1 2#frag") == "http://example.com/a%20b/%C3%BC.jpg?x=1%202"
    assert normalize_url("../img/x.png", base="https://bücher.example/pages/p.html") == (
        "https://xn--bcher-kva.example/img/x.png"
    )
    for bad in ("javascript:alert(1)", "ftp://example.com/x.jpg", "http://user:pw@example.com/x.jpg", "http:///x"):
        with pytest.raises(Refused, match="bad_url"):
            normalize_url(bad)
    assert largest_srcset_candidate("a.jpg 320w, b.jpg 1280w, c.jpg 640w") == "b.jpg"
    assert largest_srcset_candidate("a.jpg, b.jpg 2x") == "b.jpg"
    assert largest_srcset_candidate(" ") is None


# ---------------------------------------------------------------------------------------------------------------
# Keyword search: ddgs on recorded DuckDuckGo responses


class RecordedResponse:
    def __init__(self, body: bytes, status_code: int = 200) -> None:
        self.status_code, self.content, self.text = status_code, body, body.decode()


@pytest.fixture
def recorded_ddg(monkeypatch):
    """Replaces ddgs's HTTP call with the recorded DuckDuckGo answers; returns the requests made and the results."""
    import ddgs.http_client

    calls: list[tuple[str, dict]] = []
    answer = json.loads((FIXTURES / "ddg_images_bulbasaur.json").read_text())

    def request(self, method, url, *args, **kwargs):
        calls.append((url, kwargs.get("params") or {}))
        if url == "https://duckduckgo.com":
            return RecordedResponse((FIXTURES / "ddg_vqd_bulbasaur.html").read_bytes())
        if url == "https://duckduckgo.com/i.js":
            return RecordedResponse(json.dumps(answer).encode())
        raise AssertionError(f"unexpected request to {url}")

    monkeypatch.setattr(ddgs.http_client.HttpClient, "request", request)
    return calls, answer


def test_duckduckgo_provider_parses_recorded_results(recorded_ddg):
    calls, _ = recorded_ddg
    hits = DuckDuckGoImages(licence="Share").search("bulbasaur", 10)
    assert len(hits) == 5  # six results, one repeated image
    assert hits[0] == SearchHit(
        image_url="https://upload.wikimedia.org/wikipedia/commons/5/5a/Bulbasaur_plush_at_a_fan_convention.jpg",
        page_url="https://commons.wikimedia.org/wiki/File:Bulbasaur_plush_at_a_fan_convention.jpg",
        title="File:Bulbasaur plush at a fan convention.jpg - Wikimedia Commons",
        licence_hint="duckduckgo licence filter: free to share and use",
    )
    assert any(hit.title == "Bulbasaur watercolour study & sketches" for hit in hits)  # tags and entities gone
    search_params = next(params for url, params in calls if url.endswith("i.js"))
    assert search_params["q"] == "bulbasaur" and search_params["vqd"] == "4-137512093620488472155874830104611932749"
    assert search_params["f"].endswith("license:Share")
    assert len(DuckDuckGoImages().search("bulbasaur", 2)) == 2


def test_duckduckgo_provider_errors(monkeypatch, recorded_ddg):
    import ddgs.http_client

    _, answer = recorded_ddg
    answer["results"] = []
    assert DuckDuckGoImages().search("nothing matches this", 5) == []

    def offline(self, method, url, *args, **kwargs):
        raise ddgs.http_client.DDGSException("ConnectError: dns error")

    monkeypatch.setattr(ddgs.http_client.HttpClient, "request", offline)
    with pytest.raises(SearchError, match="check the network"):
        DuckDuckGoImages().search("bulbasaur", 5)
    with pytest.raises(ValueError, match="licence"):
        DuckDuckGoImages(licence="cc-by")


def test_crawl_search_downloads_hits_through_every_check(site, recorded_ddg):
    """The recorded hits, their image hosts mapped onto the local server, go through the normal fetch path."""
    _, answer = recorded_ddg
    for result in answer["results"]:
        result["image"] = result["image"].replace("https://", f"{site}/mirror/")
    kept: list[CrawledImage] = []
    report = crawl_search("bulbasaur", 10, DuckDuckGoImages(licence="Share"), LOCAL, kept.append)
    assert report.search_hits == 5 and report.kept == 4
    assert [entry["reason"] for entry in report.rejected] == ["not_an_image"]  # share.php is an HTML page
    assert kept[0].page_url == "https://commons.wikimedia.org/wiki/File:Bulbasaur_plush_at_a_fan_convention.jpg"
    assert {image.licence_hint for image in kept} == {"duckduckgo licence filter: free to share and use"}
    assert {image.content_type for image in kept} >= {"image/jpeg", "image/png", "image/webp"}

    limited = crawl_search("bulbasaur", 1, DuckDuckGoImages(), LOCAL, lambda image: None)
    assert limited.kept == 1 and limited.fetched == 1


def test_https_to_a_plain_http_server_fails_cleanly(site, server):
    """The TLS path (certificate checked for the host name while connecting to the checked address) fails with a
    reason, not a crash; an unreadable robots.txt means the whole origin is disallowed (RFC 9309 §2.3.1.4)."""
    https = site.replace("http://", "https://")
    report = crawl_urls([f"{https}/img/red.jpg"], LOCAL, lambda image: None)
    assert report.skipped[0]["reason"] == "robots" and "connection_error" in report.skipped[0]["detail"]
    assert server.paths() == []  # the handshake failed before any request line
