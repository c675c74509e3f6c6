"""The documentation checks itself: every Python code block of every page runs.

Each page's ``python`` blocks run in page order in one namespace (a page is one session a
reader would type), in a temporary directory where ``data/...`` paths resolve. A block
that cannot run here (it needs several processes, an accelerator, or is deliberately a
fragment) is marked in the Markdown with an HTML comment right before its fence::

    <!-- skip: why this block does not run as written -->

and is reported as skipped with that reason. A block that raises fails the page's test
with the block's line number.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import matplotlib
import pytest

matplotlib.use("Agg")  # pictures a snippet draws go nowhere
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = sorted(p.name for p in DOCS.glob("*.md"))

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)\s*(?P<info>[^\n]*)$")
_SKIP = re.compile(r"^\s*<!--\s*skip:\s*(?P<reason>.+?)\s*-->\s*$")


def code_blocks(text):
    """The fenced code blocks of a Markdown page.

    Returns:
        A list of ``(line, language, source, skip_reason)`` with the 1-based line of the
        opening fence; ``skip_reason`` is None unless a ``<!-- skip: ... -->`` comment is the
        last non-blank line before the fence.
    """
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        indent, fence, info = m["indent"], m["fence"], m["info"].strip()
        language = info.split()[0].lstrip(".{").rstrip("}") if info else ""
        body = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            line = lines[j]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            j += 1
        prev = i - 1
        while prev >= 0 and not lines[prev].strip():
            prev -= 1
        skip = _SKIP.match(lines[prev]) if prev >= 0 else None
        blocks.append((i + 1, language, "\n".join(body) + "\n", skip and skip["reason"]))
        i = j + 1
    return blocks


def test_code_blocks_are_found():
    """The parser sees fences, languages and skip markers (a check on the checker)."""
    page = (
        "text\n```python\nx = 1\n```\n<!-- skip: needs a GPU -->\n\n```python\ny = 2\n```\n"
        "!!! note\n    ```python\n    z = 3\n    ```\n```bash\nls\n```\n"
    )
    assert code_blocks(page) == [
        (2, "python", "x = 1\n", None),
        (7, "python", "y = 2\n", "needs a GPU"),
        (11, "python", "z = 3\n", None),
        (14, "bash", "ls\n", None),
    ]


@pytest.mark.docs
@pytest.mark.parametrize("page", [*PAGES, "../README.md"])  # the README's usage too
def test_page_code_runs(page, monkeypatch, tmp_path):
    # Files a snippet writes land in a temporary directory; `data/...` paths still resolve.
    (tmp_path / "data").symlink_to(REPO / "data")
    monkeypatch.chdir(tmp_path)
    blocks = [b for b in code_blocks((DOCS / page).read_text()) if b[1] in ("python", "py")]
    if not blocks:
        pytest.skip(f"{page} has no Python code")
    namespace = {"__name__": f"docs_{Path(page).stem.replace('-', '_')}"}
    skipped = []
    # A page that turns on float64 does so for itself only, as in a reader's fresh session.
    x64 = jax.config.jax_enable_x64
    try:
        for line, _, source, reason in blocks:
            if reason is not None:
                skipped.append(f"line {line}: {reason}")
                continue
            code = compile(source, f"docs/{page}:{line}", "exec")
            try:
                exec(code, namespace)
            except Exception as err:
                raise AssertionError(f"docs/{page}, the code block at line {line} raised") from err
    finally:
        plt.close("all")
        jax.config.update("jax_enable_x64", x64)
    if skipped:
        # The rest of the page ran; say which blocks did not, and why.
        pytest.skip(f"{page}: ran the other blocks; skipped " + "; ".join(skipped))


_RAW_ROLE = re.compile(r":(?:func|class|mod|math|meth|attr|data|obj|exc|ref):`|\.\. math::")


def test_site_builds_without_raw_markup(tmp_path):
    """The site builds strictly, and no Sphinx role reaches a reader as literal text."""
    pytest.importorskip("mkdocs", reason="the docs extra is not installed (pip install -e .[docs])")
    pytest.importorskip("mkdocstrings", reason="the docs extra is not installed")
    site = tmp_path / "site"
    completed = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
        cwd=REPO,
        # The examples are not run here (minutes); the Examples page says so instead.
        env=dict(os.environ, NO_MKDOCS_2_WARNING="1", JAXEM_DOCS_EXAMPLES="0"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    raw = [
        f"{page.relative_to(site)}: {match.group(0)}"
        for page in sorted(site.rglob("*.html"))
        for match in _RAW_ROLE.finditer(page.read_text())
    ]
    assert raw == []
    # Autorefs left unresolved show as "[name][target]" text.
    assert [p.name for p in site.rglob("*.html") if "][jaxem." in p.read_text()] == []
    # The site works offline: no page loads a script or stylesheet from the network,
    # and every one it loads (MathJax included) is in the site.
    remote, absent = [], []
    for page in sorted(site.rglob("*.html")):
        for url in (m.group(1) or m.group(2) for m in _ASSET.finditer(page.read_text())):
            if re.match(r"(?:https?:)?//", url):
                remote.append(f"{page.relative_to(site)}: {url}")
                continue
            # 404.html links from the site's root, every other page relative to itself.
            path = url.split("?")[0]
            target = site / path[1:] if path.startswith("/") else page.parent / path
            if not target.resolve().is_file():
                absent.append(f"{page.relative_to(site)}: {url}")
    assert remote == [], "pages load assets from the network"
    assert absent == [], "pages load assets the site does not have"


# The files a page loads: <script src=...>, and <link href=...> for a stylesheet or icon.
_ASSET = re.compile(
    r'<script\b[^>]*\bsrc="([^"]+)"'
    r'|<link\b(?=[^>]*\brel="(?:stylesheet|icon)")[^>]*\bhref="([^"]+)"'
)


def test_examples_page_shows_every_example():
    """Every example script is on the Examples page, with its picture if it draws one."""
    page = (DOCS / "examples.md").read_text()
    for script in sorted((REPO / "examples").glob("*.py")):
        assert f"`{script.name}`" in page, script.name
        if "savefig" in script.read_text():
            assert f"(examples/{script.stem}.png)" in page, script.name


def test_architecture_page_names_every_module():
    """docs/architecture.md's module map names every module of jaxem/ (six were missing once)."""
    page = (DOCS / "architecture.md").read_text()
    missing = [
        path.stem
        for path in sorted((REPO / "jaxem").glob("*.py"))
        if path.stem != "__init__" and f"`{path.stem}`" not in page
    ]
    assert not missing, f"docs/architecture.md does not name the modules {missing}"


# A timing or speed-up: "26 ms", "0.49 s", "28.6 CPU s", "25 minutes", "20x slower",
# "1.8x fewer", "3 times faster".
_MEASURED = re.compile(
    r"(?<![\w.])\d+(?:\.\d+)?\s?(?:CPU\s)?(?:ms|s|seconds|minutes|min|hours?)\b"
    r"|(?<![\w.])\d+(?:\.\d+)?(?:x| times) (?:faster|slower|fewer|less|more)\b"
)
# What reproduces it: a script or test of the repository, or a code block on the page.
# "Measured once" is not a source: a number no command reproduces is left out.
_SOURCE = re.compile(r"benchmarks/|examples/|tests/test_|pytest|```python")
_NEAR = 12  # lines either side
_HEADING = re.compile(r"^#{1,6} ")


def _section_headings(lines):
    """For each line, the Markdown heading of its section ("" before the first one)."""
    headings, heading, fence = [], "", None
    for line in lines:
        m = _FENCE.match(line)
        if m and fence is None:
            fence = m["fence"]
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None and _HEADING.match(line):
            heading = line
        headings.append(heading)
    return headings


def unsourced_measurements(text):
    """The timings of a page (or a module's text) with no command or code block near them.

    A command counts when it is within ``_NEAR`` lines of the number or in the heading of
    the number's section (a results section headed by the command that produced its
    table, as in benchmarks/README.md).

    Returns:
        A list of ``(line, match)``, 1-based.
    """
    lines = text.splitlines()
    headings = _section_headings(lines)
    missing = []
    for i, line in enumerate(lines):
        for match in _MEASURED.finditer(line):
            window = "\n".join(lines[max(0, i - _NEAR) : i + _NEAR + 1])
            if not _SOURCE.search(window) and not _SOURCE.search(headings[i]):
                missing.append((i + 1, match.group(0)))
    return missing


def test_unsourced_measurements_are_found():
    """The check sees a bare timing and accepts one next to its command (a check on the checker)."""
    bare = "intro\n\nEM takes 26 ms per iteration, 3.5x faster than before.\n"
    assert unsourced_measurements(bare) == [(3, "26 ms"), (3, "3.5x faster")]
    sourced = bare + "(`python benchmarks/gmm.py --quick`)\n"
    assert unsourced_measurements(sourced) == []
    assert unsourced_measurements("version 0.10.2 and 1e-6 relative, 3 components\n") == []
    once = "compiles in 28.6 CPU s, 3 times faster (measured once)\n"
    assert unsourced_measurements(once) == [(1, "28.6 CPU s"), (1, "3 times faster")]
    # A results section headed by its command sources a long table under it, and only it.
    table = "".join(f"| row {i} | {i}.5 ms |\n" for i in range(30))
    headed = f"### `benchmarks/gmm.py --all`, CPU\n\n{table}\n### Other\n\n" + "\n" * 13
    assert unsourced_measurements(headed + "it took 4 s\n") == [(49, "4 s")]
    assert unsourced_measurements(headed.replace("benchmarks/", "")) != []
    # A "# comment" inside a code block is no heading.
    fenced = "## Plain\n\n```\n# benchmarks/gmm.py\n```\n" + "\n" * 13 + "took 4 s\n"
    assert unsourced_measurements(fenced) == [(19, "4 s")]


# The docs pages, the READMEs a reader meets, and jaxem's modules (docstrings and
# comments state measured numbers too).
_MEASURED_TEXTS = [
    *(f"docs/{page}" for page in PAGES),
    "README.md",
    "examples/README.md",
    "benchmarks/README.md",
    *(str(p.relative_to(REPO)) for p in sorted((REPO / "jaxem").rglob("*.py"))),
]


@pytest.mark.parametrize("path", _MEASURED_TEXTS)
def test_measured_numbers_name_their_command(path):
    """Every timing or speed-up names what reproduces it (issue 20)."""
    assert unsourced_measurements((REPO / path).read_text()) == []
