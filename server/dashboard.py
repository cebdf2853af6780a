"""``privatune dashboard``: the run views of ``server.views`` live over a folder of runs, or
(``--ledger``) one institution's own ledger, served by the standard library.

Read-only by construction: GET and HEAD only (anything else is 405), no endpoint writes,
deletes or starts anything, and a file is served only when its resolved path lies inside the
folder. It binds 127.0.0.1 unless told otherwise, and there answers only requests addressed
to a loopback name (a page that rebinds its own name to 127.0.0.1 is refused); on any other
address every request must carry the random token printed at start (``?token=``, then a
cookie), and without it the answer is an empty 403. Pages poll their JSON twin every two
seconds and swap in the new HTML, so a new round shows up without a reload.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import ipaddress
import json
import mimetypes
import secrets
import sys
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from privatune.common.privacy.empirical import RESULT as EMPIRICAL_RESULT
from privatune.common.privacy.empirical import to_html as empirical_html
from privatune.server import views

POLL_MS = 2000
COOKIE = "privatune_token"
# Inline script and style only, nothing from elsewhere; the page may fetch its own JSON.
CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"
)
# Files a run page links to (anything else inside the folder is served too, by path).
RUN_FILES = ("report.html", "metrics.jsonl", "config.toml", "adapter/README.md")


def poll_script(api: str) -> str:
    """Fetch ``api`` every POLL_MS and replace the page's content when it changed."""
    return (
        f"let seen=null;const api={json.dumps(api)};"
        "async function poll(){try{const r=await fetch(api,{cache:'no-store'});"
        "if(r.ok){const d=await r.json();if(d.version!==seen){if(seen!==null)"
        "document.getElementById('content').innerHTML=d.html;seen=d.version;}}}"
        f"catch(e){{}}setTimeout(poll,{POLL_MS});}}poll();"
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Dashboard:
    """What is served: a folder of runs, or (``ledger``) a single ledger file."""

    def __init__(self, root: Path, ledger: Path | None = None, token: str | None = None):
        self.root = Path(root).resolve()
        self.ledger = Path(ledger).resolve() if ledger else None
        self.token = token

    def inside(self, relative: str) -> Path | None:
        """``relative`` under the root, or None when it resolves outside (``..``, a link)."""
        path = (self.root / relative).resolve()
        return path if path.is_relative_to(self.root) else None

    def nav(self) -> str:
        if self.ledger:
            return ""
        return "<nav aria-label='views'><a href='/'>Runs</a><a href='/compare'>Compare</a></nav>"

    def rows(self) -> list[dict]:
        return [views.summary(p) for p in views.run_folders(self.root)]

    def runs_html(self) -> str:
        return views.runs_body(self.rows(), views.run_link)

    def run_html(self, run_dir: Path) -> str:
        files = [f for f in RUN_FILES if (run_dir / f).is_file()]
        checkpoints = len(list((run_dir / "checkpoints").glob("round-*")))
        links = "".join(
            f"<li><a href='/files/{quote(run_dir.name)}/{quote(f)}'>{html.escape(f)}</a></li>"
            for f in files
        )
        section = (
            f"<h2>Files</h2><ul>{links}</ul><p>{checkpoints} checkpoint(s) under checkpoints/.</p>"
        )
        extra = [views.audit_section(run_dir)]
        if (result := run_dir / EMPIRICAL_RESULT).is_file():
            extra.append(empirical_html(json.loads(result.read_text())))
        return views.run_body(run_dir, [*extra, section])

    def compare_html(self, names: list[str]) -> str:
        rows = [r for r in self.rows() if not names or r["name"] in names]
        return views.compare_body(rows)

    def ledger_html(self) -> str:
        assert self.ledger is not None
        return views.ledger_body(self.ledger)

    def route(self, path: str, query: dict[str, list[str]]) -> tuple[str, str, str] | None:
        """(title, body HTML, its JSON endpoint) of a page, or None."""
        if self.ledger:
            if path in ("/", "/ledger"):
                return f"privacy ledger {self.ledger.name}", self.ledger_html(), "/api/ledger"
            return None
        if path == "/":
            return "privatune runs", self.runs_html(), "/api/"
        if path == "/compare":
            names = query.get("run", [])
            api = "/api/compare?" + "&".join(f"run={quote(n)}" for n in names)
            return "privatune: compare runs", self.compare_html(names), api
        if path.startswith("/run/"):
            name = unquote(path.removeprefix("/run/"))
            if "/" in name or name in ("", ".", ".."):  # a run is a folder's plain name
                return None
            run_dir = self.inside(name)
            if run_dir is None or run_dir.parent != self.root or not run_dir.is_dir():
                return None
            api = "/api" + views.run_link(name)
            return f"privatune run {run_dir.name}", self.run_html(run_dir), api
        return None


class Handler(BaseHTTPRequestHandler):
    server: DashboardServer
    server_version = "privatune-dashboard"
    sys_version = ""

    def log_message(self, format: str, *args: object) -> None:
        return  # quiet: the terminal shows the URL, not every poll

    def _send(self, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None):
        self.send_response(status)
        headers = {
            "Content-Type": ctype,
            "Content-Length": str(len(body)),
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Content-Security-Policy": CSP,
            **(extra or {}),
        }
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _authorised(self, query: dict[str, list[str]]) -> dict[str, str] | None:
        """Headers to add when the request may be served (a cookie for a good ``?token=``);
        None when a token is required and missing or wrong."""
        token = self.server.dashboard.token
        if token is None:  # loopback: only a page of this address may ask (DNS rebinding)
            return {} if self.headers.get("Host", "") in self.server.local_names else None
        given = query.get("token", [""])[0]
        if given and hmac.compare_digest(given, token):
            return {"Set-Cookie": f"{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"}
        cookie = SimpleCookie(self.headers.get("Cookie", ""))
        if COOKIE in cookie and hmac.compare_digest(cookie[COOKIE].value, token):
            return {}
        return None

    def _refuse_method(self) -> None:
        if self._authorised(parse_qs(urlsplit(self.path).query)) is None:
            self._send(HTTPStatus.FORBIDDEN, b"", "text/plain")
            return
        self._send(
            HTTPStatus.METHOD_NOT_ALLOWED,
            b"read-only: GET and HEAD only\n",
            "text/plain",
            {"Allow": "GET, HEAD"},
        )

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _refuse_method

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        extra = self._authorised(query)
        if extra is None:
            self._send(HTTPStatus.FORBIDDEN, b"", "text/plain")
            return
        dash = self.server.dashboard
        path = url.path
        if path.startswith("/files/") and not dash.ledger:
            self._file(unquote(path.removeprefix("/files/")), extra)
            return
        api = path.startswith("/api/")
        page = dash.route(path.removeprefix("/api") if api else path, query)
        if page is None:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain", extra)
            return
        title, body, endpoint = page
        if api:
            version = hashlib.sha256(body.encode()).hexdigest()[:16]
            data = json.dumps({"version": version, "html": body}).encode()
            self._send(HTTPStatus.OK, data, "application/json", extra)
            return
        text = views.page(title, body, dash.nav(), poll_script(endpoint))
        self._send(HTTPStatus.OK, text.encode(), "text/html; charset=utf-8", extra)

    def _file(self, relative: str, extra: dict[str, str]) -> None:
        path = self.server.dashboard.inside(relative)
        if path is None:
            self._send(HTTPStatus.FORBIDDEN, b"outside the folder\n", "text/plain", extra)
            return
        if not path.is_file():
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain", extra)
            return
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if path.suffix in (".jsonl", ".toml", ".md"):
            ctype = "text/plain; charset=utf-8"
        self._send(HTTPStatus.OK, path.read_bytes(), ctype, extra)


class DashboardServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], dashboard: Dashboard) -> None:
        self.dashboard = dashboard
        super().__init__(address, Handler)
        port = self.server_address[1]
        # The Host headers a browser sends to this server on loopback; a page of another
        # site that rebinds its name to 127.0.0.1 sends its own and is refused.
        self.local_names = {f"{h}:{port}" for h in ("127.0.0.1", "localhost", "[::1]")}


def make_server(
    root: Path, host: str = "127.0.0.1", port: int = 8050, ledger: Path | None = None
) -> DashboardServer:
    """A server bound to ``host:port`` (port 0: any free one); a token when not loopback."""
    token = None if is_loopback(host) else secrets.token_urlsafe(24)
    return DashboardServer((host, port), Dashboard(root, ledger, token))


def url_of(server: DashboardServer) -> str:
    host, port = server.server_address[:2]
    token = server.dashboard.token
    return f"http://{host}:{port}/" + (f"?token={token}" if token else "")


def serve(root: Path, host: str, port: int, ledger: Path | None) -> None:
    """Run until interrupted, after printing the URL (with the token, when one is needed)."""
    server = make_server(root, host, port, ledger)
    what = f"ledger {ledger}" if ledger else f"runs in {Path(root).resolve()}"
    print(f"privatune dashboard: {what}\n  open {url_of(server)}", flush=True)
    if server.dashboard.token:
        print("  (not loopback: every request needs this token)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
