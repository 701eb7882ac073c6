"""Every ```python block of README.md and of the documentation's pages runs as written.

The blocks of one page run in order in one namespace, as a reader pastes them. Code that cannot
run on a CPU in CI is fenced as ```{code-block} python instead; every page holding such a block
is listed in NOT_EXECUTED with the reason, and a page whose imports are not installed is skipped
with the missing package named.
"""

import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The pages of the site, and the READMEs it includes.
INCLUDED = [
    os.path.join("experiments", "README.md"),
    os.path.join("experiments", "papers", "README.md"),
    os.path.join("experiments", "benchmarks", "README.md"),
]
PAGES = ["README.md", *INCLUDED] + sorted(
    os.path.relpath(os.path.join(folder, name), ROOT)
    for folder, dirs, names in os.walk(os.path.join(ROOT, "docs"))
    if "_build" not in os.path.relpath(folder, ROOT).split(os.sep)
    for name in names
    if name.endswith(".md")
)

# Pages with a ```{code-block} python block, which is shown but not executed, and why.
NOT_EXECUTED = {
    os.path.join("docs", "guides", "m_sharpness.md"): (
        "jax.distributed.initialize() needs several processes (one per host)"
    ),
}

# Pages whose blocks import a package that is not a test dependency: skipped without it.
REQUIRES = {
    os.path.join("docs", "guides", "equinox.md"): "equinox",  # in the docs extra
}

EXECUTED_FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", flags=re.S | re.M)
SHOWN_FENCE = re.compile(r"^```\{code-block\} python[^\n]*\n", flags=re.M)


def read(page: str) -> str:
    with open(os.path.join(ROOT, page)) as f:
        return f.read()


def python_blocks(page: str) -> list[tuple[int, str]]:
    """(first line number, source) of every ```python block of `page`, in order."""
    text = read(page)
    return [
        (text.count("\n", 0, match.start()) + 2, match.group(1))
        for match in EXECUTED_FENCE.finditer(text)
    ]


def shown_blocks(page: str) -> int:
    return len(SHOWN_FENCE.findall(read(page)))


EXECUTED_PAGES = [page for page in PAGES if python_blocks(page)]


def test_the_guides_and_the_readme_have_python_blocks():
    assert "README.md" in EXECUTED_PAGES
    guides = [page for page in EXECUTED_PAGES if page.startswith(os.path.join("docs", "guides"))]
    assert len(guides) >= 12, guides


def test_every_shown_block_is_listed_with_its_reason():
    shown = {page for page in PAGES if shown_blocks(page)}
    assert shown == set(NOT_EXECUTED)


def test_the_site_includes_the_experiments_readmes():
    site = "".join(read(page) for page in PAGES if page.startswith("docs"))
    for readme in INCLUDED:
        assert "{include} ../" + readme.replace(os.sep, "/") in site, readme


@pytest.mark.parametrize("page", ["README.md", *INCLUDED])
def test_every_figure_exists(page):
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", read(page))
    for image in images:
        assert os.path.isfile(os.path.join(ROOT, os.path.dirname(page), image)), (page, image)


def test_the_api_reference_lists_every_public_name():
    import sam_optax

    api = read(os.path.join("docs", "api.md"))
    modules = {m: f"automodule:: sam_optax.{m}" for m in ("sharpness", "per_example", "losses")}
    for name in sam_optax.__all__:
        entry = modules.get(name, f":: {name}\n")
        assert entry in api, f"docs/api.md does not document sam_optax.{name}"
    for module in ("nnx", "linen"):
        assert f"automodule:: sam_optax.{module}\n   :members:" in api


@pytest.mark.parametrize("page", EXECUTED_PAGES)
def test_page_runs(page):
    if page in REQUIRES and importlib.util.find_spec(REQUIRES[page]) is None:
        pytest.skip(f"{page} needs {REQUIRES[page]} (pip install -e '.[docs]')")
    namespace = {"__name__": "docs_" + re.sub(r"\W", "_", page)}
    for line, source in python_blocks(page):
        exec(compile(source, f"{page}, the block at line {line}", "exec"), namespace)


REMOTE = re.compile(r"^(?:[a-z][a-z0-9+.-]*:)?//", flags=re.I)  # http://, https://, //host/...


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    """The site as ``sphinx-build -W -b html docs docs/_build/html`` builds it."""
    pytest.importorskip("sphinx", reason="the docs extra: pip install -e '.[docs]'")
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("html")
    build = subprocess.run(
        [sys.executable, "-m", "sphinx", "-q", "-W", "-b", "html", "docs", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    return out


def test_the_built_site_loads_no_remote_script(built_site):
    pages = sorted(built_site.rglob("*.html"))
    assert pages
    math_pages = 0
    for page in pages:
        html = page.read_text(encoding="utf-8")
        scripts = re.findall(r"<script\b[^>]*\bsrc=[\"']([^\"']+)", html, flags=re.I)
        styles = re.findall(r"<link\b[^>]*\bhref=[\"']([^\"']+)", html, flags=re.I)
        remote = [url for url in scripts + styles if REMOTE.match(url)]
        assert not remote, (page.relative_to(built_site), remote)
        for url in scripts:
            if "mathjax" in url.lower():
                math_pages += 1
                # The bundled MathJax, found beside the page.
                assert (page.parent / url.split("?")[0]).is_file(), (page, url)
    # The formulas of the variants page and of the API reference render from the bundled copy.
    assert math_pages >= 2
