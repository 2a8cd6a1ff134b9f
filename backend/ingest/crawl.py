"""The web image crawler: image URLs, a page and its same-site pages, or a keyword search, with provenance.

Safe by default. Every request, and every redirect hop, goes through the same path:
1. the URL is normalised (http/https only, fragment dropped, path percent-encoded) and checked against the host's
   robots.txt (fetched once per origin and cached; its Crawl-delay is honoured up to `max_crawl_delay_s`);
2. the host name is resolved and every address it resolves to must be public (no loopback, private, link-local,
   multicast, reserved or unspecified address, IPv4-mapped IPv6 included) unless `allow_private_addresses` is set
   (`yolodex crawl --allow-private`) or the address is in `allowed_networks`. The connection then goes to the
   checked address itself, never to a second lookup of the name, so a DNS answer that changes between check and
   connect (rebinding) cannot slip in;
3. the per-host rate limit waits until `min_interval_s` has passed since the host's previous request;
4. the request has a hard wall-clock deadline (`total_timeout_s`) over connecting, the headers and the body, which
   a server trickling bytes cannot stretch (`_Deadline` says how), and the body is read in chunks under the size
   cap: an oversized body is cut and rejected, never held whole in memory;
5. the declared content type and the first bytes (magic numbers) must both agree with what was asked for, and an
   image is fully decoded (`backend.store.images.decode_checked`: pixel cap, Pillow verify, full load) before it is
   handed to the sink.

Nothing is stored here: images leave through `sink(CrawledImage)` one at a time, as soon as each is downloaded and
checked (so a caller can commit each in a short transaction: no transaction needs to stay open across a download),
and every URL that was not kept appears in the `CrawlReport` with a reason from `REASONS`. A crawl given a
`stop_requested` callable stops within about a second of it answering True, even in the middle of a download.

Libraries: HTTP goes through urllib3 with the checked address pinned (a `requests` session would resolve the name
again); pages and robots.txt are read with the standard library's `html.parser` and `urllib.robotparser`, enough
for what the crawler reads (`<img>`/srcset, `<a href>`, `<base>`, licence links, robots rules), so no HTML library
is a direct dependency. The rate limit and the deadline are ours: urllib3 has neither a per-host spacing nor a
total deadline (`_Deadline` says why its time-outs are not one).
"""

from __future__ import annotations

import contextlib
import html.parser
import http.client
import importlib.metadata
import ipaddress
import logging
import socket
import threading
import time
import urllib.robotparser
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import quote, unquote, urljoin, urlsplit, urlunsplit

import urllib3
import urllib3.connection

from backend.ingest.providers import SearchError, SearchHit, SearchProvider
from backend.store.db import DiskFullError
from backend.store.images import DEFAULT_MAX_PIXELS, ImageLimits, ImageRejected, decode_checked

try:
    _VERSION = importlib.metadata.version("yolodex")
except importlib.metadata.PackageNotFoundError:  # a checkout that was never pip-installed
    _VERSION = "0.1.0"

logger = logging.getLogger(__name__)

MB = 1024 * 1024

# Why a URL was not kept. Skipped: never downloaded by policy. Rejected: downloaded (or tried) and refused.
# `cancelled`: the crawl was asked to stop before (or while) downloading it.
SKIP_REASONS = ("bad_url", "duplicate_url", "robots", "ssrf", "limit", "cancelled")
REJECT_REASONS = (
    "http_error",
    "connection_error",
    "timeout",
    "redirect_loop",
    "too_many_redirects",
    "too_big",
    "not_an_image",
    "not_a_page",
    "decode_failed",
    "sink_error",
)
REASONS = SKIP_REASONS + REJECT_REASONS

# Formats the rest of yolodex ingests (jpg, png, webp, bmp, the first frame of a gif).
IMAGE_MIME = {"jpeg": "image/jpeg", "png": "image/png", "gif": "image/gif", "webp": "image/webp", "bmp": "image/bmp"}
IMAGE_SUFFIXES = {
    "jpeg": (".jpg", ".jpeg", ".jpe"),
    "png": (".png",),
    "gif": (".gif",),
    "webp": (".webp",),
    "bmp": (".bmp",),
}
IMAGE_LINK_SUFFIXES = tuple(suffix for suffixes in IMAGE_SUFFIXES.values() for suffix in suffixes)
# Servers often label images generically; the magic bytes decide then. text/* and the rest are refused outright.
GENERIC_BINARY_TYPES = ("application/octet-stream", "binary/octet-stream", "")
PAGE_TYPES = ("text/html", "application/xhtml+xml")
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
# The SSRF refusal's advice where `yolodex crawl` runs (the flag sets `allow_private_addresses`).
PRIVATE_HINT_CLI = "to crawl your own network, run yolodex crawl with --allow-private"


@dataclass(frozen=True)
class CrawlSettings:
    """How politely and how defensively the crawler fetches.

    Attributes:
        min_interval_s: minimum seconds between two requests to the same host (robots.txt included).
        max_crawl_delay_s: a robots.txt Crawl-delay is honoured up to this many seconds.
        connect_timeout_s: seconds to open a connection.
        read_timeout_s: seconds to wait for any bytes at all (per socket read) before giving up on a silent server.
        total_timeout_s: hard wall-clock limit on one request: connecting, the headers and the body together, however
            slowly the server trickles them (each redirect hop and each robots.txt is a request of its own).
        max_image_bytes: larger images are cut off while streaming and rejected.
        max_page_bytes: same for HTML pages.
        max_image_pixels: width * height above this is rejected before decoding (decompression bombs); at most
            Pillow's PIL.Image.MAX_IMAGE_PIXELS (the store's ImageLimits says why).
        max_redirects: redirect hops followed per request.
        max_pages: pages visited per page crawl.
        max_images: images kept per crawl; later ones are skipped with reason `limit`.
        same_site_only: a page crawl follows links only to the start page's site (host without a leading `www.`).
            Images themselves may come from any host (CDNs).
        user_agent: sent with every request and matched against robots.txt.
        allow_private_addresses: allow loopback/private/link-local/... addresses (SSRF protection off).
        allowed_networks: CIDR blocks exempt from the SSRF rules, e.g. ("192.168.1.20/32",) for one NAS.
        private_hint: what the SSRF refusal tells a person to do to crawl their own network, in the words of the
            place that shows it (the default names the CLI flag; a page sets its own).
    """

    min_interval_s: float = 1.0
    max_crawl_delay_s: float = 10.0
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 15.0
    total_timeout_s: float = 60.0
    max_image_bytes: int = 20 * MB
    max_page_bytes: int = 5 * MB
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_redirects: int = 5
    max_pages: int = 50
    max_images: int = 1000
    same_site_only: bool = True
    user_agent: str = f"yolodex-crawler/{_VERSION} (+local)"
    allow_private_addresses: bool = False
    allowed_networks: tuple[str, ...] = ()
    private_hint: str = PRIVATE_HINT_CLI


@dataclass(frozen=True)
class CrawledImage:
    """One decoded image and where it came from.

    Attributes:
        data: the file's bytes exactly as downloaded (not re-encoded).
        source_url: the image URL as found (in the list, on the page, in the search hit).
        final_url: the URL the bytes came from after redirects.
        page_url: the page that showed the image, or None for a bare URL.
        licence_hint: licence text or URL from the page (rel=license, licence meta tags) or from the provider.
        content_type: the MIME type of the bytes as sniffed (not as the server claimed).
        original_name: a file name from the URL path, with an extension that matches the content.
        width: pixels after EXIF orientation (as the store records them).
        height: pixels after EXIF orientation.
    """

    data: bytes
    source_url: str
    final_url: str
    page_url: str | None
    licence_hint: str | None
    content_type: str
    original_name: str
    width: int
    height: int


@dataclass
class CrawlReport:
    """What a crawl did; `to_dict()` is JSON-serialisable.

    Attributes:
        fetched: image downloads attempted (URLs that passed the URL, duplicate, robots and SSRF checks).
        kept: images handed to the sink.
        kept_urls: their source URLs.
        skipped: {url, reason, detail} for URLs not downloaded by policy (reasons in SKIP_REASONS).
        rejected: {url, reason, detail} for downloads refused (reasons in REJECT_REASONS), pages included.
        pages_visited: HTML pages fetched and parsed, in order.
        search_hits: hits the search provider returned (keyword crawls only).
        requests: HTTP requests sent, robots.txt and redirect hops included.
        elapsed_s: wall-clock seconds.
        cancelled: the crawl stopped early because it was asked to (the URLs it did not finish are `cancelled`).
    """

    fetched: int = 0
    kept: int = 0
    kept_urls: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)
    pages_visited: list[str] = field(default_factory=list)
    search_hits: int = 0
    requests: int = 0
    elapsed_s: float = 0.0
    cancelled: bool = False

    def add_refusal(self, url: str, reason: str, detail: str) -> None:
        entry = {"url": url, "reason": reason, "detail": detail}
        self.cancelled = self.cancelled or reason == "cancelled"
        (self.skipped if reason in SKIP_REASONS else self.rejected).append(entry)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Sink = Callable[[CrawledImage], None]
Progress = Callable[[int, int], None]  # (done, total): a crawl's progress, for a bar or a job


class Refused(Exception):
    """A URL is not fetched or not kept; `reason` is one of REASONS (an outcome to report: the crawl goes on)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------------------------------------------
# URLs and addresses


def normalize_url(url: str, base: str | None = None) -> str:
    """An absolute http(s) URL with a lower-case scheme and host, IDNA host, quoted path and query, no fragment.

    Raises:
        Refused: (`bad_url`) for other schemes, a missing host, user info or a bad port.
    """
    url = url.strip()
    if base is not None:
        url = urljoin(base, url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise Refused("bad_url", f"cannot parse the URL ({error})") from error
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise Refused("bad_url", f"only http and https URLs are crawled, not {scheme or 'a relative URL'}")
    if not parts.hostname:
        raise Refused("bad_url", "the URL has no host")
    if parts.username or parts.password:
        raise Refused("bad_url", "URLs with user names or passwords are not crawled")
    try:
        host = parts.hostname.encode("idna").decode("ascii") if not _is_ip_literal(parts.hostname) else parts.hostname
    except UnicodeError as error:
        raise Refused("bad_url", f"the host name {parts.hostname!r} is not valid ({error})") from error
    host = host.lower()
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != {"http": 80, "https": 443}[scheme]:
        netloc = f"{netloc}:{port}"
    # Quote what is not already quoted (`%` stays, so an already-encoded URL is unchanged).
    path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    query = quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    return urlunsplit((scheme, netloc, path, query, ""))


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def site_of(url: str) -> str:
    """The site a URL belongs to: its host without a leading `www.` (no public-suffix list: sub-domains differ)."""
    host = (urlsplit(url).hostname or "").lower()
    return host.removeprefix("www.")


def address_problem(address: str, settings: CrawlSettings) -> str | None:
    """Why the crawler must not connect to this IP address (SSRF), or None when it may."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone index
    if settings.allow_private_addresses:
        return None
    if any(ip in ipaddress.ip_network(network, strict=False) for network in settings.allowed_networks):
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        # An IPv4 address inside IPv6 reaches the IPv4 host: judge that one.
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            return address_problem(str(embedded), settings)
    for name in ("loopback", "private", "link_local", "multicast", "reserved", "unspecified"):
        if getattr(ip, f"is_{name}"):
            return f"{address} is a {name.replace('_', '-')} address"
    if not ip.is_global:  # shared (carrier-grade NAT) space and the like
        return f"{address} is not a public address"
    return None


def resolve_checked(host: str, port: int, settings: CrawlSettings) -> list[str]:
    """Resolves `host` and returns its addresses, all checked against the SSRF rules.

    Raises:
        Refused: (`ssrf`) when any address is not allowed (a name that resolves to both a public and a private
            address is refused: the attacker picks which one we would reach); (`connection_error`) when the name
            does not resolve.
    """
    if _is_ip_literal(host):
        addresses = [host]
    else:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as error:
            raise Refused("connection_error", f"cannot resolve {host} ({error})") from error
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for address in addresses:
        if (problem := address_problem(address, settings)) is not None:
            raise Refused(
                "ssrf",
                f"{host} -> {problem}; internal addresses are refused ({settings.private_hint})",
            )
    return addresses


# --------------------------------------------------------------------------------------------------------------
# Content sniffing and decoding


def sniff_image(head: bytes) -> str | None:
    """The image format from the first bytes (`jpeg`, `png`, `gif`, `webp`, `bmp`), or None."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:2] == b"BM" and len(head) >= 26:
        return "bmp"
    return None


def looks_like_html(head: bytes) -> bool:
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return text.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<!--", b"<meta", b"<title"))


def decode_image(data: bytes, settings: CrawlSettings) -> tuple[int, int]:
    """Fully decodes an image with the store's own check; returns (width, height) after EXIF orientation.

    Raises:
        Refused: (`decode_failed`) for truncated or corrupt data, an unaccepted format or too many pixels.
    """
    try:
        decoded = decode_checked(
            data, ImageLimits(max_file_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
        )
    except ImageRejected as error:
        raise Refused("decode_failed", str(error)) from error
    return decoded.width, decoded.height


def original_name(url: str, image_format: str) -> str:
    """A file name from the URL's last path segment, with an extension that matches the sniffed format."""
    name = PurePosixPath(unquote(urlsplit(url).path)).name
    name = "".join(character for character in name if character.isprintable() and character not in '\\/:*?"<>|')
    stem, dot, suffix = name.rpartition(".")
    if not dot:
        stem, suffix = name, ""
    stem = stem.strip(" .")[:150] or "image"
    suffixes = IMAGE_SUFFIXES[image_format]
    return f"{stem}.{suffix}" if f".{suffix.lower()}" in suffixes else f"{stem}{suffixes[0]}"


# --------------------------------------------------------------------------------------------------------------
# HTML


def largest_srcset_candidate(srcset: str) -> str | None:
    """The URL with the largest width (`640w`) or density (`2x`) descriptor of a srcset attribute."""
    best_url, best_size = None, -1.0
    for candidate in srcset.split(","):
        fields = candidate.strip().split()
        if not fields:
            continue
        size = 1.0
        if len(fields) > 1 and fields[1][-1:] in ("w", "x"):
            with contextlib.suppress(ValueError):
                size = float(fields[1][:-1])
        if size > best_size:
            best_url, best_size = fields[0], size
    return best_url


LICENCE_META_NAMES = {"license", "licence", "dc.rights", "dcterms.rights", "dc.license", "dcterms.license"}
IMAGE_META_NAMES = {"og:image", "og:image:url", "og:image:secure_url", "twitter:image", "twitter:image:src"}


class _PageParser(html.parser.HTMLParser):
    """Collects image URLs, links and licence hints of one page, in document order (URLs as written)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.base: str | None = None
        self.images: list[str] = []
        self.links: list[str] = []
        self.licence_links: list[str] = []  # rel=license hrefs, as written
        self.licence_texts: list[str] = []  # licence meta tags

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        rel = values.get("rel", "").lower().split()
        if tag == "base" and values.get("href") and self.base is None:
            self.base = values["href"]
        elif tag == "img":
            source = largest_srcset_candidate(values.get("srcset", "")) or values.get("src") or values.get("data-src")
            if source:
                self.images.append(source)
        elif tag == "meta":
            key = (values.get("property") or values.get("name") or "").lower()
            if key in IMAGE_META_NAMES and values.get("content"):
                self.images.append(values["content"])
            elif key in LICENCE_META_NAMES and values.get("content"):
                self.licence_texts.append(values["content"].strip())
        elif tag in ("a", "link", "area") and values.get("href"):
            href = values["href"]
            if "license" in rel or "licence" in rel:
                self.licence_links.append(href)
            elif tag != "link" and urlsplit(href).path.lower().endswith(IMAGE_LINK_SUFFIXES):
                self.images.append(href)
            elif tag != "link" and "nofollow" not in rel:
                self.links.append(href)


# --------------------------------------------------------------------------------------------------------------
# Politeness: rate limit and robots.txt


class _RateLimiter:
    """Spaces requests to one host by at least its interval (thread-safe, so parallel callers stay polite)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.host_interval_s: dict[str, float] = {}
        self.next_allowed: dict[str, float] = {}
        self.lock = threading.Lock()

    def wait(self, host: str) -> None:
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_allowed.get(host, now))
            self.next_allowed[host] = start + self.host_interval_s.get(host, self.interval_s)
        if start > now:
            time.sleep(start - now)


class _Deadline:
    """A hard wall-clock limit on one request (connect, headers and body) that a trickling server cannot stretch.

    Socket time-outs bound each recv, never a whole response: a server that sends one byte a second never trips
    them (http.client reads the status line and headers with readline, which recvs again and again, and urllib3's
    read(n) waits until it has n bytes). So a watchdog thread shuts the connection's socket down when the deadline
    passes, or when the crawl is asked to stop: shutdown() wakes a recv blocked in another thread at once (close()
    does not), the read ends with an error or EOF, and the caller, seeing `reason` set, reports `timeout` (or
    `cancelled`) whatever the read returned. Connecting is bounded by its own time-out, cut to what is left.
    Nothing else is needed: no thread is abandoned and no connection outlives its request.
    """

    POLL_S = 0.5  # how often the watchdog asks `stop_requested` (a job reads its cancel flag at most this often)

    def __init__(self, seconds: float, stop_requested: Callable[[], bool] | None) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.stop_requested = stop_requested
        self.reason: str | None = None  # "timeout" or "cancelled" once the watchdog fired
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="crawl-deadline", daemon=True)
        self._thread.start()

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def watch(self, sock: socket.socket | None) -> None:
        """Shut `sock` down when the deadline passes (at once if it already has); None: stop watching a socket."""
        with self._lock:
            self._sock = sock
            fired = self.reason is not None
        if fired and sock is not None:
            _shut_down(sock)

    def close(self) -> None:
        """Ends the watchdog; after this it touches no socket."""
        with self._lock:
            self._done.set()
            self._sock = None

    def refusal(self, url: str) -> Refused:
        if self.reason == "cancelled":
            return Refused("cancelled", f"{url}: the crawl was cancelled during this download")
        return Refused("timeout", f"{url}: no complete answer within {self.seconds:g} s (total_timeout_s)")

    def _watch(self) -> None:
        while True:
            left = self.remaining()
            if left <= 0:
                self._fire("timeout")
                return
            if self._done.wait(min(left, self.POLL_S) if self.stop_requested else left):
                return
            if self.stop_requested is not None and _asked_to_stop(self.stop_requested):
                self._fire("cancelled")
                return

    def _fire(self, reason: str) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self.reason = reason
            sock = self._sock
        if sock is not None:
            _shut_down(sock)


def _shut_down(sock: socket.socket) -> None:
    # The plain socket's shutdown, also under TLS: SSLSocket.shutdown would tear down the SSL object that the
    # reading thread is using. A socket already closed (fd -1) raises OSError: nothing to wake then.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _asked_to_stop(stop_requested: Callable[[], bool]) -> bool:
    try:
        return bool(stop_requested())
    except Exception:  # an unreadable flag (the database busy for a moment): go on, the next check reads it again
        logger.warning("could not read whether the crawl should stop", exc_info=True)
        return False


@dataclass
class _Response:
    url: str  # after redirects
    status: int
    content_type: str  # MIME type only, lower case
    charset: str | None
    body: bytes


class Crawler:
    """One crawl's state: settings, rate limiter, robots.txt cache, URLs already seen, and the report."""

    def __init__(self, settings: CrawlSettings, sink: Sink, stop_requested: Callable[[], bool] | None = None) -> None:
        self.settings = settings
        self.sink = sink
        self.stop_requested = stop_requested
        self.report = CrawlReport()
        self.limiter = _RateLimiter(settings.min_interval_s)
        self.robots: dict[str, urllib.robotparser.RobotFileParser | str] = {}  # origin -> parser or refusal
        self.seen_images: set[str] = set()
        self.started = time.monotonic()

    def stopping(self) -> bool:
        """Whether the crawl was asked to stop (asked before each download; once True, it stays True)."""
        if not self.report.cancelled and self.stop_requested is not None:
            self.report.cancelled = _asked_to_stop(self.stop_requested)
        return self.report.cancelled

    # -- fetching ----------------------------------------------------------------------------------------------

    def fetch(self, url: str, kind: str) -> _Response:
        """GETs a normalised URL, following redirects with every check on every hop.

        Args:
            url: normalised absolute URL.
            kind: `image`, `page` or `robots`; decides the size cap, the accepted content types and whether
                robots.txt applies.

        Raises:
            Refused: for every reason the response is not usable.
        """
        settings = self.settings
        max_bytes = {"image": settings.max_image_bytes, "page": settings.max_page_bytes, "robots": 512 * 1024}[kind]
        hops = [url]
        while True:
            parts = urlsplit(url)
            host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
            addresses = resolve_checked(host, port, settings)  # first: robots.txt of an internal host is not read
            if kind != "robots":
                self.check_robots(url)
            self.limiter.wait(host)
            response = self._request_once(url, addresses, kind, max_bytes)
            if isinstance(response, _Response):
                return response
            location = response
            try:
                next_url = normalize_url(location, base=url)
            except Refused as refusal:
                raise Refused("bad_url", f"redirect to an unusable URL {location!r} ({refusal.detail})") from None
            if next_url in hops:
                raise Refused("redirect_loop", " -> ".join([*hops, next_url]))
            if len(hops) > settings.max_redirects:
                raise Refused("too_many_redirects", f"more than {settings.max_redirects} redirects from {hops[0]}")
            hops.append(next_url)
            url = next_url

    def _request_once(self, url: str, addresses: list[str], kind: str, max_bytes: int) -> _Response | str:
        """One request to one checked address, within one `_Deadline`; returns the response, or a redirect's Location.

        Raises:
            Refused: `timeout` when the deadline (`total_timeout_s`: connecting, headers and body) or the per-read
                time-out passed, `cancelled` when the crawl was asked to stop meanwhile, and the reasons of `_read`.
        """
        settings = self.settings
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        headers = {
            "Host": parts.netloc,  # normalised: default ports already dropped
            "User-Agent": settings.user_agent,
            "Accept": "text/html,application/xhtml+xml;q=0.9" if kind == "page" else "image/*;q=0.9,*/*;q=0.1",
            "Accept-Encoding": "identity",  # the size cap counts what we hold; no compressed surprises
        }
        deadline = _Deadline(settings.total_timeout_s, self.stop_requested)
        last_error: Exception | None = None
        try:
            for address in addresses:
                connect_s = min(settings.connect_timeout_s, deadline.remaining())
                if connect_s <= 0 or deadline.reason is not None:
                    raise deadline.refusal(url)
                connection: urllib3.connection.HTTPConnection
                if parts.scheme == "https":
                    # Connect to the checked address; verify the certificate and send SNI for the host name.
                    connection = urllib3.connection.HTTPSConnection(
                        address, port, timeout=connect_s, server_hostname=host, assert_hostname=host
                    )
                else:
                    connection = urllib3.connection.HTTPConnection(address, port, timeout=connect_s)
                try:
                    self.report.requests += 1
                    try:
                        connection.connect()
                    except urllib3.exceptions.NewConnectionError as error:
                        last_error = error  # try the host's next address
                        continue
                    deadline.watch(connection.sock)
                    connection.timeout = settings.read_timeout_s  # per recv; the deadline bounds the whole
                    connection.request("GET", path, headers=headers, preload_content=False)
                    response = self._read(url, connection.getresponse(), kind, max_bytes)
                except Refused:
                    if deadline.reason is not None:  # e.g. a body cut by the watchdog that no longer decodes
                        raise deadline.refusal(url) from None
                    raise
                except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as error:
                    if deadline.reason is not None:
                        raise deadline.refusal(url) from error
                    if isinstance(error, (urllib3.exceptions.TimeoutError, TimeoutError)):
                        raise Refused("timeout", f"{url}: no answer within the time limit ({error})") from error
                    raise Refused("connection_error", f"{url}: {type(error).__name__}: {error}") from error
                finally:
                    deadline.watch(None)
                    connection.close()
                if deadline.reason is not None:  # a body without Content-Length ends "normally" when cut
                    raise deadline.refusal(url)
                return response
        finally:
            deadline.close()
        raise Refused("connection_error", f"{url}: cannot connect ({last_error})")

    def _read(self, url: str, raw: urllib3.BaseHTTPResponse, kind: str, max_bytes: int) -> _Response | str:
        if raw.status in REDIRECT_STATUSES:
            location = raw.headers.get("Location")
            if not location:
                raise Refused("http_error", f"HTTP {raw.status} redirect without a Location")
            return location
        mime, _, params = (raw.headers.get("Content-Type") or "").partition(";")
        mime = mime.strip().lower()
        charset = None
        for param in params.split(";"):
            name, _, value = param.partition("=")
            if name.strip().lower() == "charset" and value.strip():
                charset = value.strip().strip("\"'")
        if kind == "robots":
            if raw.status != 200:  # the caller decides what a missing robots.txt means
                return _Response(url, raw.status, mime, charset, b"")
        elif raw.status != 200:
            raise Refused("http_error", f"HTTP {raw.status}")
        if kind == "image" and not (mime.startswith("image/") or mime in GENERIC_BINARY_TYPES):
            raise Refused("not_an_image", f"served as {mime}, not as an image")
        if kind == "page" and mime not in PAGE_TYPES:
            raise Refused("not_a_page", f"served as {mime or 'no content type'}, not as an HTML page")
        declared = raw.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise Refused("too_big", f"Content-Length {int(declared)} bytes is over the cap of {max_bytes}")
        chunks: list[bytes] = []
        size = 0
        for chunk in raw.stream(64 * 1024):  # a read that waits too long is ended by the request's _Deadline
            size += len(chunk)
            if size > max_bytes:
                # Stop reading; the connection is closed by the caller, the rest is never received.
                raise Refused("too_big", f"more than {max_bytes} bytes (cut while downloading)")
            chunks.append(chunk)
        return _Response(url, raw.status, mime, charset, b"".join(chunks))

    # -- robots.txt --------------------------------------------------------------------------------------------

    def check_robots(self, url: str) -> None:
        """Raises Refused(`robots`) when the origin's robots.txt disallows `url` for our user agent."""
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        if origin not in self.robots:
            self.robots[origin] = self._load_robots(origin)
        rules = self.robots[origin]
        if isinstance(rules, str):
            raise Refused("robots", rules)
        if not rules.can_fetch(self.settings.user_agent, url):
            raise Refused("robots", f"disallowed by {origin}/robots.txt")

    def _load_robots(self, origin: str) -> urllib.robotparser.RobotFileParser | str:
        """The parsed robots.txt, or the reason everything on the origin is refused (RFC 9309 §2.3.1)."""
        rules = urllib.robotparser.RobotFileParser(f"{origin}/robots.txt")
        try:
            response = self.fetch(f"{origin}/robots.txt", "robots")
        except Refused as refusal:
            if refusal.reason == "cancelled":
                raise  # not a verdict on the site: not cached
            if refusal.reason == "ssrf":
                return refusal.detail
            # Unreachable robots.txt: assume complete disallow, as RFC 9309 asks for server errors.
            return f"robots.txt of {origin} could not be read ({refusal.reason}: {refusal.detail})"
        if response.status in (401, 403) or response.status >= 500:
            return f"robots.txt of {origin} answered HTTP {response.status}: the whole site is treated as disallowed"
        if response.status == 200:
            rules.parse(response.body.decode("utf-8", errors="replace").splitlines())
        else:  # 404 and other client errors: no rules
            rules.allow_all = True  # type: ignore[attr-defined]  # read by can_fetch(); the stubs omit it
        rules.modified()  # can_fetch() answers False until a parser says it has read the file
        delay = rules.crawl_delay(self.settings.user_agent)
        if delay is not None:
            host = urlsplit(origin).hostname or ""
            self.limiter.host_interval_s[host] = max(
                self.settings.min_interval_s, min(float(delay), self.settings.max_crawl_delay_s)
            )
        return rules

    # -- images and pages --------------------------------------------------------------------------------------

    def crawl_image(self, url: str, page_url: str | None = None, licence_hint: str | None = None) -> bool:
        """Downloads, checks and decodes one image and hands it to the sink; returns whether it was kept."""
        try:
            url = normalize_url(url, base=page_url)
        except Refused as refusal:
            self.report.add_refusal(url, refusal.reason, refusal.detail)
            return False
        if url in self.seen_images:
            self.report.add_refusal(url, "duplicate_url", "already crawled in this crawl")
            return False
        self.seen_images.add(url)
        if self.stopping():
            self.report.add_refusal(url, "cancelled", "the crawl was cancelled before this download")
            return False
        if self.report.kept >= self.settings.max_images:
            self.report.add_refusal(url, "limit", f"max_images={self.settings.max_images} already kept")
            return False
        try:
            image = self._download_image(url, page_url, licence_hint)
        except Refused as refusal:
            self.report.add_refusal(url, refusal.reason, refusal.detail)
            return False
        try:
            self.sink(image)
        except DiskFullError:  # every later image would fail the same way: end the crawl (what it kept stays)
            raise
        except Exception as error:  # one failed store must not end the crawl; the report says which and why
            self.report.add_refusal(url, "sink_error", f"{type(error).__name__}: {error}")
            return False
        self.report.kept += 1
        self.report.kept_urls.append(url)
        return True

    def _download_image(self, url: str, page_url: str | None, licence_hint: str | None) -> CrawledImage:
        parts = urlsplit(url)
        # Refused before counting a fetch (fetch() checks both again on every redirect hop).
        resolve_checked(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80), self.settings)
        self.check_robots(url)
        self.report.fetched += 1
        response = self.fetch(url, "image")
        image_format = sniff_image(response.body[:32])
        if image_format is None:
            what = "HTML" if looks_like_html(response.body[:512]) else f"bytes {response.body[:8]!r}"
            raise Refused("not_an_image", f"served as {response.content_type or 'no type'} but the content is {what}")
        width, height = decode_image(response.body, self.settings)
        return CrawledImage(
            data=response.body,
            source_url=url,
            final_url=response.url,
            page_url=page_url,
            licence_hint=licence_hint,
            content_type=IMAGE_MIME[image_format],
            original_name=original_name(response.url, image_format),
            width=width,
            height=height,
        )

    def visit_page(self, url: str) -> _PageParser | None:
        """Fetches and parses one page, records it, and crawls its images; returns the parsed page or None."""
        if self.stopping():
            self.report.add_refusal(url, "cancelled", "the crawl was cancelled before this page")
            return None
        try:
            response = self.fetch(url, "page")
            if sniff_image(response.body[:32]) is not None:
                raise Refused("not_a_page", f"served as {response.content_type} but the content is an image")
        except Refused as refusal:
            self.report.add_refusal(url, refusal.reason, refusal.detail)
            return None
        self.report.pages_visited.append(url)
        page = _PageParser()
        try:
            page.feed(response.body.decode(response.charset or "utf-8", errors="replace"))
            page.close()
        except LookupError:  # an unknown charset name
            page = _PageParser()
            page.feed(response.body.decode("utf-8", errors="replace"))
            page.close()
        base = urljoin(response.url, page.base) if page.base else response.url
        licences = [urljoin(base, link) for link in page.licence_links] + page.licence_texts
        licence_hint = " ; ".join(dict.fromkeys(licences))
        for image_url in dict.fromkeys(page.images):
            self.crawl_image(urljoin(base, image_url), page_url=response.url, licence_hint=licence_hint or None)
        page.base = base
        return page

    def finish(self) -> CrawlReport:
        self.report.elapsed_s = round(time.monotonic() - self.started, 3)
        return self.report


# --------------------------------------------------------------------------------------------------------------
# The three sources


def crawl_urls(
    urls: Iterable[str],
    settings: CrawlSettings,
    sink: Sink,
    stop_requested: Callable[[], bool] | None = None,
    on_progress: Progress | None = None,
) -> CrawlReport:
    """Downloads a list of image URLs; each kept image goes to `sink` with no page URL.

    Args:
        stop_requested: asked before each download and every half second during one; True ends the crawl (the
            report says `cancelled`, and lists what was not done with that reason).
        on_progress: called with (URLs done, URLs) after each URL.

    Returns:
        The report: every URL is either kept or listed with its reason.
    """
    crawler = Crawler(settings, sink, stop_requested)
    wanted = [url for url in urls if url.strip() and not url.lstrip().startswith("#")]
    _report(on_progress, 0, len(wanted))
    for done, url in enumerate(wanted, start=1):
        crawler.crawl_image(url)
        _report(on_progress, done, len(wanted))
    return crawler.finish()


def _report(on_progress: Progress | None, done: int, total: int) -> None:
    if on_progress is not None:
        on_progress(done, max(done, total))


def crawl_page(
    url: str,
    depth: int,
    settings: CrawlSettings,
    sink: Sink,
    stop_requested: Callable[[], bool] | None = None,
    on_progress: Progress | None = None,
) -> CrawlReport:
    """Takes a page's images (img src/srcset, og:image, links to image files) and those of linked pages.

    Args:
        url: the start page.
        depth: link hops to follow from the start page (0: the start page only). With `same_site_only`, only
            pages of the start page's site are followed; at most `settings.max_pages` pages are visited.
        stop_requested: as for `crawl_urls`.
        on_progress: called with (pages visited, pages visited + queued, at most `settings.max_pages`) after each
            page: the total grows as links are found.

    Returns:
        The report; each kept image carries the URL of the page it was found on and the page's licence hint.
    """
    if depth < 0:
        raise ValueError(f"depth must be 0 or more, got {depth}")
    crawler = Crawler(settings, sink, stop_requested)
    try:
        start = normalize_url(url)
    except Refused as refusal:
        crawler.report.add_refusal(url, refusal.reason, refusal.detail)
        return crawler.finish()
    queued = {start}
    queue = deque([(start, 0)])
    while queue and len(crawler.report.pages_visited) < settings.max_pages and not crawler.report.cancelled:
        page_url, level = queue.popleft()
        page = crawler.visit_page(page_url)
        handled = len(queued) - len(queue)
        if page is None or level >= depth:
            _report(on_progress, handled, min(len(queued), settings.max_pages))
            continue
        for link in page.links:
            try:
                link_url = normalize_url(link, base=page.base)
            except Refused:
                continue  # mailto:, javascript: and the like are not pages to crawl
            if link_url in queued:
                continue
            if settings.same_site_only and site_of(link_url) != site_of(start):
                continue
            queued.add(link_url)
            queue.append((link_url, level + 1))
        _report(on_progress, handled, min(len(queued), settings.max_pages))
    for page_url, _ in queue:
        if crawler.report.cancelled:
            crawler.report.add_refusal(page_url, "cancelled", "the crawl was cancelled before this page")
        else:
            crawler.report.add_refusal(page_url, "limit", f"max_pages={settings.max_pages} reached")
    return crawler.finish()


def crawl_search(
    query: str,
    limit: int,
    provider: SearchProvider,
    settings: CrawlSettings,
    sink: Sink,
    stop_requested: Callable[[], bool] | None = None,
    on_progress: Progress | None = None,
) -> CrawlReport:
    """Searches `provider` for `query` and keeps up to `limit` images that pass every check.

    The provider is asked for twice as many hits as needed (at most 50 more), because some hits fail the
    checks (dead links, robots.txt, non-images); downloading stops once `limit` images are kept, or when
    `stop_requested` (as for `crawl_urls`) answers True.

    `on_progress` is called with (hits tried, hits to try) after each hit; the last call has done == total.

    Raises:
        SearchError: when the search itself fails (the provider's message says what to do).
    """
    if limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    crawler = Crawler(settings, sink, stop_requested)
    hits: list[SearchHit] = provider.search(query, min(2 * limit, limit + 50))
    crawler.report.search_hits = len(hits)
    _report(on_progress, 0, len(hits))
    for tried, hit in enumerate(hits):
        if crawler.report.kept >= limit:
            break
        page_url = None
        if hit.page_url:
            with contextlib.suppress(Refused):
                page_url = normalize_url(hit.page_url)
        crawler.crawl_image(hit.image_url, page_url=page_url, licence_hint=hit.licence_hint)
        _report(on_progress, tried + 1, len(hits))
    _report(on_progress, len(hits), len(hits))
    return crawler.finish()


__all__ = [
    "REASONS",
    "CrawlReport",
    "CrawlSettings",
    "CrawledImage",
    "Refused",
    "SearchError",
    "SearchHit",
    "SearchProvider",
    "crawl_page",
    "crawl_search",
    "crawl_urls",
]
