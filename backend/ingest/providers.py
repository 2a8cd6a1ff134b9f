"""Keyword image search for the crawler: the `SearchProvider` protocol and a DuckDuckGo provider on `ddgs`.

A provider only finds candidate image URLs; it never downloads an image. Every hit then goes through the crawler's
fetch path (robots.txt, SSRF rules, rate limit, size cap, content sniffing, decoding) like any other URL, so a
provider cannot smuggle an internal address or a non-image past those checks.

Why `ddgs` (the maintained successor of `duckduckgo-search`, which its author renamed and stopped updating in 2025):
it needs no API key, returns the full-size image URL together with the page it sits on, and can filter on
Creative-Commons licences. Its search request impersonates a browser (through `primp`); that concerns the search
engine only: the images themselves are downloaded by the crawler with its own honest user agent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class SearchError(RuntimeError):
    """The search itself failed (network, blocked, changed response format): the message says what to try."""


@dataclass(frozen=True)
class SearchHit:
    """One image found by a search.

    Attributes:
        image_url: the full-size image to download.
        page_url: the page that shows the image (provenance), when the provider knows it.
        title: the title the provider gives the image or its page.
        licence_hint: what the provider says about the licence, or None when it says nothing. A hint, never a
            guarantee: the page's own licence is the authority.
    """

    image_url: str
    page_url: str | None
    title: str
    licence_hint: str | None


class SearchProvider(Protocol):
    """Anything that turns a keyword query into image hits."""

    name: str

    def search(self, query: str, limit: int) -> list[SearchHit]:
        """Returns at most `limit` hits, best first; an empty list when nothing matches; SearchError on failure."""
        ...


# DuckDuckGo's licence filter values (its `license:` image filter) and what each promises.
DDG_LICENCE_FILTERS = {
    "any": "any Creative Commons licence",
    "Public": "public domain",
    "Share": "free to share and use",
    "ShareCommercially": "free to share and use commercially",
    "Modify": "free to modify, share and use",
    "ModifyCommercially": "free to modify, share and use commercially",
}


@dataclass
class DuckDuckGoImages:
    """Image search on DuckDuckGo (Bing's index) through the `ddgs` library.

    Attributes:
        region: DuckDuckGo region code (`us-en`, `de-de`, `wt-wt` for no region).
        safesearch: `on`, `moderate` or `off`.
        licence: one of DDG_LICENCE_FILTERS to return only images under that licence family, or None for all.
        timeout_s: seconds for each search request.
        max_pages: how many result pages (about 100 hits each) to ask for at most.
    """

    region: str = "us-en"
    safesearch: str = "moderate"
    licence: str | None = None
    timeout_s: int = 10
    max_pages: int = 3
    name: str = "duckduckgo"

    def __post_init__(self) -> None:
        if self.licence is not None and self.licence not in DDG_LICENCE_FILTERS:
            raise ValueError(f"licence must be one of {sorted(DDG_LICENCE_FILTERS)} or None, got {self.licence!r}")
        if self.safesearch not in ("on", "moderate", "off"):
            raise ValueError(f"safesearch must be 'on', 'moderate' or 'off', got {self.safesearch!r}")

    def search(self, query: str, limit: int) -> list[SearchHit]:
        # Imported here so that importing the crawler does not need ddgs (the URL and page crawls work without it).
        from ddgs import DDGS
        from ddgs.exceptions import DDGSException

        if not query.strip():
            raise ValueError("the search query is empty: give a few words, e.g. 'bulbasaur'")
        if limit <= 0:
            return []
        options = {"region": self.region, "safesearch": self.safesearch, "backend": "duckduckgo"}
        if self.licence is not None:
            options["license_image"] = self.licence
        licence_hint = (
            None if self.licence is None else f"duckduckgo licence filter: {DDG_LICENCE_FILTERS[self.licence]}"
        )
        hits: list[SearchHit] = []
        seen: set[str] = set()
        client = DDGS(timeout=self.timeout_s)
        for page in range(1, self.max_pages + 1):
            try:
                results = client.images(query, max_results=limit - len(hits), page=page, **options)
            except DDGSException as error:
                if "No results found" in str(error):
                    break
                raise SearchError(
                    f"DuckDuckGo image search for {query!r} failed ({error}); check the network, or try again "
                    "later (DuckDuckGo rate-limits bursts of searches)"
                ) from error
            new = [result for result in results if result.get("image") and result["image"] not in seen]
            for result in new:
                seen.add(result["image"])
                hits.append(
                    SearchHit(
                        image_url=result["image"],
                        page_url=result.get("url") or None,
                        title=result.get("title") or "",
                        licence_hint=licence_hint,
                    )
                )
            if not new or len(hits) >= limit:
                break
        return hits[:limit]
