"""MkDocs hook: ship KaTeX (from the npm registry) with the site, so formulas render offline.

`package.json` pins KaTeX; `npm ci` installs it into `node_modules/`. After
each build this hook copies KaTeX's script, style sheet and fonts into
`site/assets/katex/`, where `mkdocs.yml` loads them from. Nothing is loaded
from a CDN. If KaTeX is not installed yet and npm is available, the hook
runs `npm ci` first.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

log = logging.getLogger("mkdocs.hooks.katex")

ROOT = Path(__file__).resolve().parents[2]
KATEX = ROOT / "node_modules" / "katex" / "dist"
FILES = ("katex.min.js", "katex.min.css", "fonts")


def _install() -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            "KaTeX is not installed and npm is not available: install Node.js and run "
            "`npm ci` in the repository root (it installs the KaTeX pinned in package.json)."
        )
    log.info("Installing KaTeX with npm ci")
    subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"], cwd=ROOT, check=True, capture_output=True
    )


def on_post_build(config: dict, **kwargs: object) -> None:
    """Copy KaTeX into the built site."""
    if not (KATEX / "katex.min.js").exists():
        _install()
    target = Path(config["site_dir"]) / "assets" / "katex"
    target.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        source = KATEX / name
        if source.is_dir():
            shutil.copytree(source, target / name, dirs_exist_ok=True)
        else:
            shutil.copy2(source, target / name)
