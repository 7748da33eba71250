"""The documentation site builds strictly, and its formulas render in a browser offline.

The site ships KaTeX (from the npm registry, see package.json and
docs/hooks/katex.py). The browser test opens the built Home and Algorithm
pages in headless Chromium (Debian's `chromium`; skipped where it is not
installed), checks that every formula was rendered by KaTeX and no raw TeX
delimiters are left, that no page loads anything from another host, and
saves screenshots.
"""

import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=10000",
]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(target)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return target


def test_strict_build_has_every_page_and_ships_katex(site):
    for page in ("index.html", "algorithm/index.html", "migrating/index.html",
                 "tuning/index.html", "performance/index.html", "distributed/index.html",
                 "paper/index.html", "api/keras_adam/index.html", "api/tuning/index.html",
                 "changelog/index.html", "getting-started/index.html",
                 "backends/index.html"):  # fmt: skip
        assert (site / page).is_file(), page
    assert (site / "assets" / "katex" / "katex.min.js").stat().st_size > 100_000
    assert list((site / "assets" / "katex" / "fonts").glob("*.woff2"))
    api = (site / "api" / "keras_adam" / "index.html").read_text()
    assert "epsilon_mode" in api and "adam_step" in api  # generated from docstrings


def test_no_page_loads_from_another_host(site):
    external = re.compile(r"""<(?:script|link|img)[^>]+(?:src|href)=["'](?:https?:)?//""")
    for page in site.rglob("*.html"):
        html = page.read_text()
        found = [m.group(0) for m in external.finditer(html)]
        assert not found, (page, found[:3])


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(directory):
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def chromium(url, profile, *extra):
    result = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
@pytest.mark.parametrize(("page", "minimum"), [("", 2), ("algorithm/", 40)])
def test_formulas_render_in_headless_chromium(site, tmp_path, page, minimum):
    server = serve(site)
    try:
        url = f"http://127.0.0.1:{server.server_port}/{page}"
        dom = chromium(url, tmp_path / "profile", "--dump-dom")
        shot = tmp_path / f"{page.strip('/') or 'home'}.png"
        chromium(url, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2400")
    finally:
        server.shutdown()
    formulas = re.findall(r'<(?:span|div) class="arithmatex"[^>]*>', dom)
    assert len(formulas) >= minimum
    assert all('data-rendered="true"' in tag for tag in formulas), "a formula was not rendered"
    assert dom.count('class="katex"') >= len(formulas)
    assert "katex-error" not in dom
    text = re.sub(r"<annotation[^>]*>.*?</annotation>", "", dom, flags=re.S)  # KaTeX keeps the TeX
    text = re.sub(r"<[^>]+>", "", text)
    assert "$$" not in text and "\\[" not in text and "\\(" not in text
    assert shot.stat().st_size > 20_000
