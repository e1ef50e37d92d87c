"""HTTP(S) pages: fetched with care, HTML reduced to its main text.

Each URL is one record (id = the URL as given). A fetch goes:

1. scheme http/https only (else ``bad_scheme``);
2. the host is resolved and *every* address checked: loopback, private, link-local,
   multicast, reserved, unspecified or otherwise non-global addresses are refused before
   any connection (``blocked_address``) unless ``allow_private``; the connection then goes
   to the checked address (the Host header and TLS name stay the URL's), so a second DNS
   answer cannot swap in another one;
3. robots.txt of the origin, fetched the same way, must allow the URL for ``user_agent``
   (``robots_disallowed``; ``respect_robots=False`` skips this, for your own servers);
4. redirects are followed by hand, at most 5, each hop going through 1–3 again;
5. only text/html, text/plain, text/markdown and application/json are read
   (``bad_content_type``), and at most ``max_bytes``, counted while streaming
   (``too_large``), within ``timeout_s`` seconds from connect to the last byte.

Environment proxies are ignored: a proxy would resolve names where we cannot check them.
Bodies are kept in the object once fetched, so ``fingerprint()`` then ``records()`` fetch
each URL once.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import socket
import time
import urllib.robotparser
from collections.abc import Iterator, Sequence
from html.parser import HTMLParser
from typing import TYPE_CHECKING, Any

from genloop.data.records import Quarantined, Record
from genloop.errors import GenloopError

if TYPE_CHECKING:
    import httpx

CONTENT_TYPES = ("text/html", "text/plain", "text/markdown", "application/json")
MAX_BYTES = 10_000_000
TIMEOUT = 10.0
MAX_REDIRECTS = 5
ROBOTS_MAX_BYTES = 512 * 1024  # RFC 9309 asks crawlers to parse at least 500 KiB
USER_AGENT = "genloop"
_DISALLOW_ALL = ["User-agent: *", "Disallow: /"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class UrlSource:
    kind = "url"

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        allow_private: bool = False,
        max_bytes: int = MAX_BYTES,
        timeout_s: float = TIMEOUT,
        respect_robots: bool = True,
        user_agent: str = USER_AGENT,
    ) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise GenloopError("url source: 'urls' is empty")
        if max_bytes <= 0 or timeout_s <= 0:
            raise GenloopError("url source: max_bytes and timeout_s must be positive")
        if not user_agent:
            raise GenloopError("url source: user_agent is empty")
        self.allow_private = allow_private
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.respect_robots = respect_robots
        self.user_agent = user_agent
        self._fetched: dict[str, Record | Quarantined] = {}

    def records(self) -> Iterator[Record | Quarantined]:
        yield from self._items()

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps({"kind": self.kind}).encode())
        for item in self._items():
            content = item.text if isinstance(item, Record) else f"quarantined:{item.reason}"
            digest = hashlib.sha256((content or "").encode()).hexdigest()
            h.update(f"\n{item.id}\0{digest}".encode())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "urls": self.urls,
            "allow_private": self.allow_private,
            "max_bytes": self.max_bytes,
            "respect_robots": self.respect_robots,
            "user_agent": self.user_agent,
        }

    # -- fetching --------------------------------------------------------------------

    def _items(self) -> Iterator[Record | Quarantined]:
        """Each URL's record, fetched on first need and kept."""
        import httpx

        client: httpx.Client | None = None
        robots: dict[str, urllib.robotparser.RobotFileParser] = {}
        try:
            for url in self.urls:
                if url not in self._fetched:
                    if client is None:
                        client = httpx.Client(
                            timeout=self.timeout_s,
                            follow_redirects=False,
                            trust_env=False,
                            headers={"User-Agent": self.user_agent},
                            # No connection reuse: a pooled TLS connection to a shared address
                            # must not carry a request for a host its certificate was not
                            # checked for.
                            limits=httpx.Limits(max_keepalive_connections=0),
                        )
                    checks = robots if self.respect_robots else None
                    self._fetched[url] = self._fetch(client, checks, url)
                yield self._fetched[url]
        finally:
            if client is not None:
                client.close()

    def _fetch(
        self,
        client: httpx.Client,
        robots: dict[str, urllib.robotparser.RobotFileParser] | None,
        url: str,
    ) -> Record | Quarantined:
        import httpx

        deadline = time.monotonic() + self.timeout_s
        try:
            opened = self.open_checked(client, url, robots)
            if isinstance(opened, Quarantined):
                if opened.id != url:  # refused at a redirect: name the URL asked for
                    detail = f"redirected to {opened.id}: {opened.detail}"
                    return self._bad(url, opened.reason, detail)
                return opened
            final_url, response = opened
            try:
                if not 200 <= response.status_code < 300:
                    return self._bad(url, "http_error", f"HTTP {response.status_code}")
                ctype = response.headers.get("content-type", "").split(";")[0].strip().lower()
                if ctype not in CONTENT_TYPES:
                    detail = f"content type {ctype or 'missing'!r}; accepted: {CONTENT_TYPES}"
                    return self._bad(url, "bad_content_type", detail)
                body = read_limited(response, self.max_bytes, deadline)
                charset = response.charset_encoding or "utf-8"
            finally:
                response.close()
        except httpx.HTTPError as e:
            return self._bad(url, "fetch_failed", f"{type(e).__name__}: {e}")
        except httpx.InvalidURL as e:  # a redirect to something that is not a URL
            return self._bad(url, "bad_url", str(e))
        except TooLarge as e:
            return self._bad(url, "too_large", str(e))
        except TimeoutError:
            return self._bad(url, "fetch_failed", f"not finished within {self.timeout_s} s")
        try:
            text = body.decode(charset)
        except (UnicodeDecodeError, LookupError) as e:
            return self._bad(url, "undecodable", f"not {charset}: {e}")
        meta: dict[str, Any] = {"url": url, "content_type": ctype}
        if final_url != url:
            meta["final_url"] = final_url
        if ctype == "text/html":
            title, text = html_main_text(text)
            meta["title"] = title
        return Record(url, self.kind, text=text, meta=meta)

    def open_checked(
        self,
        client: httpx.Client,
        url: str,
        robots: dict[str, urllib.robotparser.RobotFileParser] | None,
    ) -> tuple[str, httpx.Response] | Quarantined:
        """Follow redirects by hand, checking each hop; answer the final URL and its open
        (streaming) response, or why not. ``robots=None`` skips the robots check (used
        to fetch robots.txt itself)."""
        import httpx

        for _ in range(MAX_REDIRECTS + 1):
            checked = self._check(client, url)
            if isinstance(checked, Quarantined):
                return checked
            if robots is not None and not self._robots(client, robots, url).can_fetch(
                self.user_agent, url
            ):
                return self._bad(url, "robots_disallowed", "robots.txt disallows this URL")
            response = client.send(checked, stream=True)
            if not response.is_redirect:
                return url, response
            response.close()
            url = str(httpx.URL(url).join(response.headers["location"]))
        return self._bad(url, "too_many_redirects", f"more than {MAX_REDIRECTS} redirects")

    def _check(self, client: httpx.Client, url: str) -> httpx.Request | Quarantined:
        """The request to send for ``url`` once its scheme and every address its host
        resolves to are acceptable; pinned to the checked address unless private
        addresses are allowed anyway."""
        import httpx

        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as e:
            return self._bad(url, "bad_url", str(e))
        if parsed.scheme not in ("http", "https"):
            return self._bad(url, "bad_scheme", f"scheme {parsed.scheme!r}; use http or https")
        host = parsed.raw_host.decode("ascii")
        if not host:
            return self._bad(url, "bad_url", "no host")
        if self.allow_private:
            return client.build_request("GET", parsed)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            addresses = resolve(host, port)
        except OSError as e:
            return self._bad(url, "fetch_failed", f"cannot resolve {host!r}: {e}")
        for address in addresses:
            if not is_public(address):
                detail = f"{host!r} resolves to {address}, which is not a public address"
                return self._bad(url, "blocked_address", detail)
        headers = {"Host": parsed.netloc.decode("ascii")}
        extensions = {"sni_hostname": host} if parsed.scheme == "https" else {}
        pinned = parsed.copy_with(host=str(addresses[0]))
        return client.build_request("GET", pinned, headers=headers, extensions=extensions)

    def _robots(
        self,
        client: httpx.Client,
        cache: dict[str, urllib.robotparser.RobotFileParser],
        url: str,
    ) -> urllib.robotparser.RobotFileParser:
        """The origin's robots.txt, as urllib.robotparser reads it: 401/403 disallow all,
        other 4xx allow all; a server error or failed fetch disallows all (RFC 9309)."""
        import httpx

        parsed = httpx.URL(url)
        origin = f"{parsed.scheme}://{parsed.netloc.decode('ascii')}"
        if origin in cache:
            return cache[origin]
        lines = _DISALLOW_ALL
        try:
            opened = self.open_checked(client, origin + "/robots.txt", robots=None)
            if not isinstance(opened, Quarantined):
                response = opened[1]
                try:
                    status = response.status_code
                    if 400 <= status < 500 and status not in (401, 403):
                        lines = []  # no robots.txt: everything allowed
                    elif 200 <= status < 300:
                        deadline = time.monotonic() + self.timeout_s
                        body = read_limited(response, ROBOTS_MAX_BYTES, deadline, truncate=True)
                        lines = body.decode("utf-8", errors="replace").splitlines()
                finally:
                    response.close()
        except (httpx.HTTPError, httpx.InvalidURL, TimeoutError):
            lines = _DISALLOW_ALL
        parser = urllib.robotparser.RobotFileParser(origin + "/robots.txt")
        parser.parse(lines)
        cache[origin] = parser
        return parser

    def _bad(self, url: str, reason: str, detail: str) -> Quarantined:
        return Quarantined(url, self.kind, reason, detail)


class TooLarge(Exception):
    """A body over its byte limit (the data source quarantines it; chat images get 413)."""


def read_limited(
    response: httpx.Response, limit: int, deadline: float, *, truncate: bool = False
) -> bytes:
    """The body, counted while streaming: past ``limit`` bytes either stop there
    (``truncate``) or raise TooLarge; past ``deadline`` raise TimeoutError."""
    declared = response.headers.get("content-length", "")
    if not truncate and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"Content-Length {declared} is over the {limit}-byte limit")
    chunks, size = [], 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > limit:
            if truncate:
                chunks.append(chunk[: limit - (size - len(chunk))])
                break
            raise TooLarge(f"the body passed the {limit}-byte limit")
        if time.monotonic() > deadline:
            raise TimeoutError
        chunks.append(chunk)
    return b"".join(chunks)


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to (an IP literal resolves to itself)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    # sockaddr[0] is the address; an IPv6 one may carry a zone ("fe80::1%eth0").
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


def is_public(address: IPAddress) -> bool:
    """True for a globally routable unicast address. IPv4 addresses embedded in IPv6
    (mapped ``::ffff:a.b.c.d``, 6to4, NAT64) are judged as the IPv4 address they carry."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        elif address.sixtofour is not None:
            address = address.sixtofour
        elif address in _NAT64:
            address = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.is_global and not (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


# -- HTML → main text ------------------------------------------------------------------


def html_main_text(html: str) -> tuple[str, str]:
    """(title, main text) of an HTML page: scripts, styles and page chrome (nav, header,
    footer, aside) dropped; only the ``<main>``/``<article>`` part when the page marks one;
    blocks become lines, paragraphs are separated by a blank line, ``<pre>`` is kept as is.
    The text starts with the title unless the body already does."""
    parser = _MainText()
    parser.feed(html)
    parser.close()
    title = " ".join("".join(parser.title).split())
    main = [(text, pre) for text, pre, in_main in parser.pieces if in_main]
    chosen = main if "".join(t for t, _ in main).strip() else [(t, p) for t, p, _ in parser.pieces]
    body = _join(chosen)
    if title and not body.startswith(title):
        body = f"{title}\n\n{body}" if body else title
    return title, body


class _MainText(HTMLParser):
    SKIP = frozenset(
        {"script", "style", "noscript", "template", "svg", "nav", "header", "footer", "aside"}
    )
    # Blocks start on a new line; paragraph-like blocks also end with a blank line.
    PARAGRAPH = frozenset(
        {"article", "blockquote", "dl", "figure", "main", "ol", "p", "pre", "section"}
        | {"table", "ul", "h1", "h2", "h3", "h4", "h5", "h6"}
    )
    BLOCK = PARAGRAPH | {"address", "br", "dd", "div", "dt", "figcaption", "hr", "li"}
    BLOCK |= {"td", "th", "tr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.title: list[str] = []
        self.pieces: list[tuple[str, bool, bool]] = []  # (text, inside <pre>, inside <main>)
        self._depth = {"skip": 0, "main": 0, "pre": 0, "title": 0}

    def _counter(self, tag: str) -> str | None:
        if tag in self.SKIP:
            return "skip"
        if tag in ("main", "article"):
            return "main"
        return tag if tag in ("pre", "title") else None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if (counter := self._counter(tag)) is not None:
            self._depth[counter] += 1
        if tag in self.BLOCK:
            self._emit("\n", pre=True)

    def handle_endtag(self, tag: str) -> None:
        if (counter := self._counter(tag)) is not None and self._depth[counter] > 0:
            self._depth[counter] -= 1
        if tag in self.PARAGRAPH:
            self._emit("\n\n", pre=True)

    def handle_data(self, data: str) -> None:
        if self._depth["title"] and not self._depth["skip"]:
            self.title.append(data)
        elif not self._depth["skip"]:
            pre = self._depth["pre"] > 0
            self._emit(data if pre else re.sub(r"\s+", " ", data), pre=pre)

    def _emit(self, text: str, *, pre: bool) -> None:
        self.pieces.append((text, pre, self._depth["main"] > 0))


def _join(pieces: list[tuple[str, bool]]) -> str:
    out: list[str] = []
    at_line_start = True
    for text, pre in pieces:
        if not pre and at_line_start:
            text = text.lstrip(" ")
        if not text:
            continue
        out.append(text)
        at_line_start = text.endswith("\n")
    joined = re.sub(r"[ \t]+\n", "\n", "".join(out))
    return re.sub(r"\n{3,}", "\n\n", joined).strip()
