"""The built docs site is self-contained: it loads nothing from another host, and its math
renderer (MathJax, copied in by `mkdocs_hooks/offline_assets.py`) is there.

The site is built once (`mkdocs build --strict`, as CI does) into a temporary directory; then
every HTML, CSS and JS file of it is scanned. What counts as a *load* (a request the browser
makes by itself when it shows a page), as opposed to a link a reader may follow:

* HTML: `<script src>`, `<link href>` (stylesheets, icons, preload/preconnect, manifests; not
  `rel` = canonical, alternate, prev, next, ... which the browser does not fetch), `<img>`,
  `<source>`, `<video>`/`<audio>`/`<track>`, `<iframe>`, `<embed>`, `<object data>`,
  `<input type=image>`, SVG `<image>`/`<use>` (`href`, `xlink:href`), and CSS in `style`
  attributes and `<style>` elements. `<a href>` to arXiv and the like is prose: allowed.
* CSS: `url(...)` and `@import`.
* JS: a string literal that starts with `http://` or `https://` (minified code builds loads
  from such literals). XML namespace names (`http://www.w3.org/...`) are identifiers, never
  fetched. The few other literals in the shipped third-party code are listed in
  `JS_URLS_NOT_LOADED`, each with why it is not fetched here and, where that depends on the
  site, a check that it still holds.

A URL is external when it names a host: `https://...`, `http://...`, `//host/...`.
Every local load must also resolve to a file of the site.

Where Chromium is installed, one more test opens a tutorial page in it (headless, all
non-loopback traffic sent to a recording proxy) and checks that the formulas were typeset and
that no request left 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
MATHJAX = "vendor/mathjax"  # where the hook puts MathJax in the site
MATHJAX_ENTRY = f"{MATHJAX}/tex-mml-chtml.js"
MATH_PAGE = "tutorials/flash-attention/index.html"  # a page with many formulas

# `rel` values of <link> that the browser does not fetch on its own.
LINK_RELS_NOT_LOADED = {
    "alternate", "author", "bookmark", "canonical", "help", "license", "me", "next", "prev",
}
# tag -> attributes whose URL the browser fetches when it renders the page.
LOAD_ATTRS = {
    "script": ("src",),
    "img": ("src", "srcset"),
    "source": ("src", "srcset"),
    "video": ("src", "poster"),
    "audio": ("src",),
    "track": ("src",),
    "iframe": ("src",),
    "frame": ("src",),
    "embed": ("src",),
    "object": ("data",),
    "input": ("src",),
    "image": ("href", "xlink:href"),
    "use": ("href", "xlink:href"),
    "feimage": ("href", "xlink:href"),
}
CSS_URL = re.compile(r"""url\(\s*(?:"([^"]*)"|'([^']*)'|([^)'"\s]*))\s*\)""", re.I)
CSS_IMPORT = re.compile(r"""@import\s+(?:"([^"]*)"|'([^']*)')""", re.I)
JS_URL = re.compile(r"""["'`](https?://[^"'`\s]*)""")
XML_NAMESPACES = ("http://www.w3.org/", "http://exslt.org/")


def _no_mermaid(site: Path) -> str | None:
    bad = [p for p in _files(site, ".html") if 'class="mermaid"' in p.read_text("utf-8")]
    return f"pages with mermaid diagrams: {bad}" if bad else None


def _no_repo_facts(site: Path) -> str | None:
    bad = [p for p in _files(site, ".html") if 'data-md-component="source"' in p.read_text("utf-8")]
    return f"pages with a repository widget (repo_url set): {bad[:3]}" if bad else None


# URL prefix in shipped JS -> (files it may appear in, why it is not fetched here, a check of
# the site that keeps it so, or None).
JS_URLS_NOT_LOADED = {
    "https://unpkg.com/mermaid@": (
        "assets/javascripts/bundle.",
        "mkdocs-material loads Mermaid only for a page with a mermaid diagram: none has one",
        _no_mermaid,
    ),
    "https://unpkg.com/resize-observer-polyfill": (
        "assets/javascripts/bundle.",
        "mkdocs-material loads this polyfill only where the browser has no ResizeObserver "
        "(every browser since 2020 has it)",
        None,
    ),
    "https://api.github.com/": (
        "assets/javascripts/bundle.",
        "repository facts (stars, forks), fetched only when `repo_url` is set: it is not",
        _no_repo_facts,
    ),
    "https://${e}/api/v4/projects/": (
        "assets/javascripts/bundle.",
        "GitLab repository facts, same condition as api.github.com",
        _no_repo_facts,
    ),
    "https://cdn.jsdelivr.net/npm/speech-rule-engine@": (
        f"{MATHJAX}/",
        "the speech engine's default for its locale files; in a browser MathJax sets it to "
        f"[mathjax]/sre/mathmaps (components/src/a11y/sre/sre_config.js), shipped in {MATHJAX}/sre",
        None,
    ),
    "https://cdn.jsdelivr.net/npm/sre-mathmaps-ie@": (
        f"{MATHJAX}/",
        "loaded by the speech engine only in Internet Explorer",
        None,
    ),
    "https://cdn.jsdelivr.net/npm/wicked-good-xpath@": (
        f"{MATHJAX}/",
        "an XPath polyfill, loaded only in Internet Explorer and pre-Chromium Edge",
        None,
    ),
    "https://www.mathjax.org": (
        f"{MATHJAX}/",
        "an <a href> in the text of MathJax's About and Help boxes: a link, not a load",
        None,
    ),
}


def _files(site: Path, *suffixes: str) -> list[Path]:
    return sorted(p for p in site.rglob("*") if p.is_file() and p.suffix in suffixes)


def _external(url: str) -> bool:
    return bool(urlsplit(url.strip()).netloc)


def _css_urls(css: str) -> list[str]:
    found = [next(g for g in m.groups() if g is not None) for m in CSS_URL.finditer(css)]
    found += [m.group(1) or m.group(2) for m in CSS_IMPORT.finditer(css)]
    return [u for u in found if u]


class _Loads(HTMLParser):
    """Collects the URLs an HTML page loads (see the module docstring)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.urls: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        a = {k: (v or "") for k, v in attrs}
        names = LOAD_ATTRS.get(tag, ())
        if tag == "link":
            rels = set(a.get("rel", "").lower().split())
            names = () if rels and rels <= LINK_RELS_NOT_LOADED else ("href",)
        for name in names:
            if a.get(name):
                if name == "srcset":
                    self.urls += [c.split()[0] for c in a[name].split(",") if c.strip()]
                else:
                    self.urls.append(a[name])
        if "style" in a:
            self.urls += _css_urls(a["style"])
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.urls += _css_urls(data)


def _html_loads(page: Path) -> list[str]:
    parser = _Loads()
    parser.feed(page.read_text("utf-8"))
    return parser.urls


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, f"mkdocs build --strict failed:\n{r.stdout}\n{r.stderr}"
    return out


def test_scanner_sees_loads(tmp_path):
    """The scanners themselves: they catch each kind of load and pass links and data: URIs."""
    page = tmp_path / "p.html"
    page.write_text(
        '<link rel="stylesheet" href="https://fonts.googleapis.com/css">'
        '<link rel="preconnect" href="https://fonts.gstatic.com">'
        '<link rel="canonical" href="https://example.org/p/">'
        '<script src="//unpkg.com/x.js"></script><script src="local.js"></script>'
        '<img srcset="a.png 1x, https://img.example/b.png 2x">'
        '<a href="https://arxiv.org/abs/2205.14135">paper</a>'
        '<div style="background: url(\'https://bg.example/i.png\')"></div>'
        "<style>@import 'https://css.example/s.css'; .x{background:url(data:image/png;base64,AA)}"
        "</style>"
    )
    ext = [u for u in _html_loads(page) if _external(u)]
    assert ext == [
        "https://fonts.googleapis.com/css", "https://fonts.gstatic.com", "//unpkg.com/x.js",
        "https://img.example/b.png", "https://bg.example/i.png", "https://css.example/s.css",
    ]
    css = """a{background:url("data:image/svg+xml;charset=utf-8,<svg xmlns='http://www.w3.org/2000/svg'/>")}
             @font-face{src:url(https://fonts.example/f.woff2)}"""
    assert [u for u in _css_urls(css) if _external(u)] == ["https://fonts.example/f.woff2"]
    assert JS_URL.findall('x.src="https://cdn.example/a.js"; // see https://docs') == [
        "https://cdn.example/a.js"
    ]


def test_html_loads_nothing_external(site):
    pages = _files(site, ".html")
    assert len(pages) > 10
    bad, missing = [], []
    for page in pages:
        for url in _html_loads(page):
            if _external(url):
                bad.append(f"{page.relative_to(site)}: {url}")
                continue
            path = unquote(urlsplit(url).path)
            if url.startswith("data:") or not path:
                continue
            target = (site / path.lstrip("/")) if path.startswith("/") else page.parent / path
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                missing.append(f"{page.relative_to(site)}: {url}")
    assert not bad, "pages load from other hosts:\n" + "\n".join(bad)
    assert not missing, "pages load files the site does not have:\n" + "\n".join(missing)


def test_css_loads_nothing_external(site):
    bad, missing = [], []
    for css in _files(site, ".css"):
        for url in _css_urls(css.read_text("utf-8", errors="replace")):
            if _external(url):
                bad.append(f"{css.relative_to(site)}: {url}")
            elif not url.startswith(("data:", "#")):
                if not (css.parent / unquote(urlsplit(url).path)).exists():
                    missing.append(f"{css.relative_to(site)}: {url}")
    assert not bad, "stylesheets load from other hosts:\n" + "\n".join(bad)
    assert not missing, "stylesheets load files the site does not have:\n" + "\n".join(missing)


def test_js_urls_are_known_non_loads(site):
    scripts = _files(site, ".js")
    assert any(p.name.startswith("bundle.") for p in scripts)  # mkdocs-material's, scanned too
    unknown, seen = [], set()
    for js in scripts:
        rel = js.relative_to(site).as_posix()
        for url in JS_URL.findall(js.read_text("utf-8", errors="replace")):
            if url.startswith(XML_NAMESPACES):
                continue
            known = [p for p, (where, _, _) in JS_URLS_NOT_LOADED.items()
                     if url.startswith(p) and rel.startswith(where)]
            if known:
                seen.add(known[0])
            else:
                unknown.append(f"{rel}: {url}")
    assert not unknown, (
        "scripts hold URLs of other hosts; if one is really not fetched by this site, add it to "
        "JS_URLS_NOT_LOADED with the reason:\n" + "\n".join(unknown)
    )
    broken = [f"{p}: {msg}" for p in sorted(seen)
              if (check := JS_URLS_NOT_LOADED[p][2]) and (msg := check(site))]
    assert not broken, "a condition under which a script URL stays unfetched no longer holds:\n" + \
        "\n".join(broken)


def test_our_own_scripts_name_no_host():
    """The site's own JS (the MathJax config) must not point MathJax anywhere else."""
    for js in (ROOT / "docs").rglob("*.js"):
        assert not re.search(r"(https?:)?//[\w.-]+\.\w+/", js.read_text("utf-8")), js


def test_math_renderer_is_shipped(site):
    entry = site / MATHJAX_ENTRY
    assert entry.is_file() and entry.stat().st_size > 500_000, entry
    # Every page with formulas loads the shipped MathJax (after its config).
    math_pages = [p for p in _files(site, ".html") if 'class="arithmatex"' in p.read_text("utf-8")]
    assert site / MATH_PAGE in math_pages
    for page in math_pages:
        scripts = [(page.parent / u).resolve() for u in _html_loads(page)
                   if u.endswith(".js") and not _external(u)]
        names = [s.relative_to(site.resolve()).as_posix() for s in scripts]
        assert MATHJAX_ENTRY in names, (page, names)
        assert names.index("javascripts/mathjax.js") < names.index(MATHJAX_ENTRY), names
    # The web fonts the CommonHTML output asks for, and the TeX packages `autoload` pulls in.
    code = entry.read_text("utf-8")
    fonts = set(re.findall(r"MathJax_[\w-]+\.woff", code))
    assert len(fonts) >= 20, fonts
    missing = [f for f in fonts if not (site / MATHJAX / "output/chtml/fonts/woff-v2" / f).is_file()]
    assert not missing, missing
    for ext in ("cancel", "color", "mathtools", "mhchem", "physics"):
        assert (site / MATHJAX / "input/tex/extensions" / f"{ext}.js").is_file(), ext
    assert (site / MATHJAX / "sre/mathmaps/en.json").is_file()
    assert "Apache License" in (site / MATHJAX / "LICENSE").read_text("utf-8")


# --------------------------------------------------------------------- in a real browser
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if found := shutil.which(name):
            return found
    return None


# Chromium's own background traffic (time, component updates, sign-in, autofill), which comes
# even with --disable-background-networking: not the page's. Seen with Chromium 156; if another
# version adds one, it is not a page load when the host serves no page content.
CHROMIUM_SERVICE_HOSTS = {
    "accounts.google.com", "clients2.google.com", "content-autofill.googleapis.com",
    "optimizationguide-pa.googleapis.com", "update.googleapis.com",
}
CHROMIUM_QUIET = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
    "--disable-client-side-phishing-detection", "--disable-domain-reliability", "--no-pings",
    "--disable-breakpad", "--disable-features=AutofillServerCommunication,"
    "NetworkTimeServiceQuerying,OptimizationHints,MediaRouter,Translate",
]


class _Recorder(SimpleHTTPRequestHandler):
    """Serves the site on 127.0.0.1 and is also the browser's proxy: a request that reaches
    it as a proxy (CONNECT, or an absolute URL) is one that would have left the machine."""

    external: list[str]
    local: list[tuple[str, int]]

    def log_message(self, *args):
        pass

    def log_request(self, code="-", size="-"):
        if self.command == "CONNECT" or self.path.startswith(("http://", "https://")):
            host = urlsplit(self.path if "://" in self.path else f"//{self.path}").hostname
            if host not in CHROMIUM_SERVICE_HOSTS:
                self.external.append(f"{self.command} {self.path}")
        else:
            self.local.append((self.path, int(code) if str(code).isdigit() else 0))

    def do_CONNECT(self):
        self.send_error(502, "offline")


@pytest.mark.skipif(_chromium() is None, reason="needs Chromium (apt-get install chromium)")
def test_formulas_render_offline_in_chromium(site):
    handler = type("Handler", (_Recorder,), {"external": [], "local": []})
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: handler(*a, directory=str(site))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        with tempfile.TemporaryDirectory() as profile:
            r = subprocess.run(
                [_chromium(), *CHROMIUM_QUIET, f"--user-data-dir={profile}", f"--proxy-server=http://127.0.0.1:{port}",
                 "--virtual-time-budget=10000", "--dump-dom",
                 f"http://127.0.0.1:{port}/{MATH_PAGE.removesuffix('index.html')}"],
                capture_output=True, text=True, timeout=120,
            )
    finally:
        server.shutdown()
        server.server_close()
    dom = r.stdout
    assert r.returncode == 0 and "</html>" in dom, r.stderr[-2000:]
    assert not handler.external, f"the page tried to reach other hosts: {handler.external}"
    failed = [(p, c) for p, c in handler.local if c >= 400]
    assert not failed, f"local requests failed: {failed}"
    requested = {p for p, _ in handler.local}
    assert f"/{MATHJAX_ENTRY}" in requested
    assert any(p.endswith(".woff") for p in requested), "MathJax's fonts were not loaded"
    # Typeset: each arithmatex span holds an <mjx-container>, no TeX delimiters are left.
    spans = dom.count('class="arithmatex"')
    assert spans > 10
    assert dom.count("<mjx-container") >= spans, (dom.count("<mjx-container"), spans)
    leftover = re.findall(r'class="arithmatex">\s*\\[(\[]', dom)
    assert not leftover, f"{len(leftover)} formulas left as raw LaTeX"
