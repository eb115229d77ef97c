"""MkDocs hook: ship the math renderer with the built site, so it renders without a network.

The tutorials' formulas (`pymdownx.arithmatex`, generic mode) are typeset in the browser by
MathJax 3. Instead of loading it from a CDN, which an air-gapped cluster cannot reach, this hook
adds MathJax's files from an installed dev dependency, `django-static-mathjax` (a PyPI package
that holds MathJax's distribution tree; it does not need Django), to the site under
`vendor/mathjax/`: the entry script that `mkdocs.yml` lists in `extra_javascript`, and the
directories it loads from at run time (fonts, TeX extensions for `autoload`, the menu and its
accessibility tools). MathJax finds them relative to its own script's URL, so the site works
from any prefix, from `file://` as well as over HTTP.

Nothing is committed to the repository: the files come from the locked package at build time.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

DISTRIBUTION = "django-static-mathjax"
PACKAGE_DIR = "mathjax/static/mathjax/es5"  # inside the distribution's install location
SITE_DIR = "vendor/mathjax"  # inside the built site
ENTRY = "tex-mml-chtml.js"  # the combined component: TeX and MathML in, CommonHTML out
# Loaded on demand by the entry script: `output/chtml/fonts/woff-v2` (its web fonts),
# `input/tex/extensions` (packages `autoload` pulls in, e.g. \cancel, \color, \mathtools),
# `ui` (the context menu's lazy parts), `a11y` and `sre` (the menu's accessibility options).
RUNTIME_DIRS = ("output/chtml", "input/tex/extensions", "ui", "a11y", "sre")


def mathjax_dir() -> Path:
    """The installed MathJax `es5/` directory; a `PluginError` saying what to do if absent."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise PluginError(
            f"{DISTRIBUTION} is not installed: it provides the MathJax files the docs ship "
            "with (a dev dependency; run `uv sync`)"
        ) from None
    root = Path(str(dist.locate_file(PACKAGE_DIR)))
    if not (root / ENTRY).is_file():
        raise PluginError(f"{DISTRIBUTION} {dist.version}: no {PACKAGE_DIR}/{ENTRY} at {root}")
    return root


def mathjax_files(root: Path) -> dict[str, Path]:
    """Path in the site (under SITE_DIR) -> installed file: the entry script, everything under
    RUNTIME_DIRS, and MathJax's LICENSE (Apache-2.0, one level above `es5/`)."""
    found = {ENTRY: root / ENTRY}
    if (root.parent / "LICENSE").is_file():
        found["LICENSE"] = root.parent / "LICENSE"
    for sub in RUNTIME_DIRS:
        for path in sorted((root / sub).rglob("*")):
            if path.is_file():
                found[path.relative_to(root).as_posix()] = path
    return found


def on_files(files: Files, config: MkDocsConfig) -> Files:
    for rel, path in mathjax_files(mathjax_dir()).items():
        files.append(File.generated(config, f"{SITE_DIR}/{rel}", abs_src_path=str(path)))
    return files
