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
_HEADING = re.compile(r"^#{1,6} ")
_ITEM = re.compile(r"^(?P<indent>\s*)(?:[-*+]|\d+[.)])\s")
_TABLE_ROW = re.compile(r"^\s*\|")


def text_units(text, markdown=True):
    """Split a page (or a module's text) into the units a reader takes in at once.

    A unit is a heading, a fenced code block, a table, a list item (with its indented
    continuation, blank lines included) or a paragraph (lines up to a blank one). In a
    module (``markdown=False``) a line starting with ``#`` is a comment, not a heading.

    Returns:
        A list of ``(kind, first, last)``: ``kind`` one of ``"heading"``, ``"code"``,
        ``"table"``, ``"item"``, ``"paragraph"``; 0-based lines, ``last`` included.
    """
    lines = text.splitlines()
    units = []
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if not line.strip():
            i += 1
        elif fence:
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith(fence["fence"]):
                j += 1
            units.append(("code", i, min(j, len(lines) - 1)))
            i = j + 1
        elif markdown and _HEADING.match(line):
            units.append(("heading", i, i))
            i += 1
        elif _TABLE_ROW.match(line):
            j = i
            while j + 1 < len(lines) and _TABLE_ROW.match(lines[j + 1]):
                j += 1
            units.append(("table", i, j))
            i = j + 1
        else:
            item = _ITEM.match(line)
            j = i
            while True:
                nxt = j + 1
                if item:  # an item goes on over blank lines while the text is indented under it
                    while nxt < len(lines) and not lines[nxt].strip():
                        nxt += 1
                    if nxt < len(lines) and nxt > j + 1:
                        indent = len(lines[nxt]) - len(lines[nxt].lstrip())
                        if indent <= len(item["indent"]) or _ITEM.match(lines[nxt]):
                            break
                if nxt >= len(lines) or not lines[nxt].strip():
                    break
                following = lines[nxt]
                if (
                    _ITEM.match(following)
                    or _FENCE.match(following)
                    or _TABLE_ROW.match(following)
                    or (markdown and _HEADING.match(following))
                ):
                    break
                j = nxt
            units.append(("item" if item else "paragraph", i, j))
            i = j + 1
    return units


def unsourced_measurements(text, markdown=True):
    """The timings of a page (or a module's text) that do not name what reproduces them.

    A number is sourced when a command (a script or test of the repository, ``pytest``,
    or a ``python`` code block) is in the number's own unit (see `text_units`: its
    paragraph, list item, table or code block), in the heading of its section, or, for
    a table, a list item or a code block, in the paragraph right before the table, list
    or block (the sentence that introduces it); a paragraph that ends with a colon is
    sourced by the code block it introduces. A command in the next paragraph, about
    something else, does not count.

    Returns:
        A list of ``(line, match)``, 1-based.
    """
    lines = text.splitlines()
    units = text_units(text, markdown)
    missing = []
    heading = ""
    for k, (kind, first, last) in enumerate(units):
        if kind == "heading":
            heading = lines[first]
        sources = [*lines[first : last + 1], heading]
        if kind in ("table", "item", "code"):
            # The introduction: the paragraph before the table, block or whole list.
            before = k - 1
            while kind == "item" and before >= 0 and units[before][0] == "item":
                before -= 1
            if before >= 0 and units[before][0] == "paragraph":
                sources += lines[units[before][1] : units[before][2] + 1]
        elif kind == "paragraph" and lines[last].rstrip().endswith(":") and k + 1 < len(units):
            # A paragraph that ends with a colon introduces the block after it ("this
            # script printed 57 ms:"): that block is its command.
            if units[k + 1][0] == "code":
                sources += lines[units[k + 1][1] : units[k + 1][2] + 1]
        if _SOURCE.search("\n".join(sources)):
            continue
        for i in range(first, last + 1):
            missing += [(i + 1, m.group(0)) for m in _MEASURED.finditer(lines[i])]
    return missing


def test_unsourced_measurements_are_found():
    """The check sees a bare timing and accepts one next to its command (a check on the checker)."""
    bare = "intro\n\nEM takes 26 ms per iteration, 3.5x faster than before.\n"
    assert unsourced_measurements(bare) == [(3, "26 ms"), (3, "3.5x faster")]
    assert unsourced_measurements(bare + "(`python benchmarks/gmm.py --quick`)\n") == []
    assert unsourced_measurements("version 0.10.2 and 1e-6 relative, 3 components\n") == []
    once = "compiles in 28.6 CPU s, 3 times faster (measured once)\n"
    assert unsourced_measurements(once) == [(1, "28.6 CPU s"), (1, "3 times faster")]
    # A command in the next paragraph, about something else, does not source it.
    assert unsourced_measurements(bare + "\nRun `python benchmarks/hmm.py`.\n") != []
    # A results section headed by its command sources a long table under it, and only it.
    table = "".join(f"| row {i} | {i}.5 ms |\n" for i in range(30))
    headed = f"### `benchmarks/gmm.py --all`, CPU\n\n{table}\n### Other\n\n"
    assert unsourced_measurements(headed + "it took 4 s\n") == [(36, "4 s")]
    assert unsourced_measurements(headed.replace("benchmarks/", "")) != []
    # The sentence that introduces a table, a list or a block sources it.
    intro = "From `python benchmarks/gmm.py`:\n"
    assert unsourced_measurements(intro + table) == []
    items = "- EM: 26 ms\n\n  per iteration\n- VEM: 40 ms\n"
    assert unsourced_measurements(intro + "\n" + items) == []
    assert unsourced_measurements("Plain.\n\n" + items) == [(3, "26 ms"), (6, "40 ms")]
    assert unsourced_measurements(intro + "\n```text\n4 s\n```\n") == []
    printed = "This printed 57 ms{}\n\n```python\nprint(f())\n```\n"
    assert unsourced_measurements(printed.format(":")) == []
    assert unsourced_measurements(printed.format(".")) == [(1, "57 ms")]
    # ... but a paragraph that follows it is on its own.
    assert unsourced_measurements(intro + table + "\nit took 4 s\n") == [(33, "4 s")]
    # A code block is a command for the numbers its comments state; a "# comment" in a
    # block is no heading, and neither is a comment of a module.
    assert unsourced_measurements("```python\nfit(x)  # 4 s\n```\n") == []
    fenced = "## Plain\n\n```\n# benchmarks/gmm.py\n```\n\ntook 4 s\n"
    assert unsourced_measurements(fenced) == [(7, "4 s")]
    module = "# benchmarks/gmm.py\n\n# took 4 s\n"
    assert unsourced_measurements(module, markdown=False) == [(3, "4 s")]


# The docs pages and the READMEs a reader meets; for measured numbers jaxem's modules
# too (docstrings and comments state them).
_READ_TEXTS = [
    *(f"docs/{page}" for page in PAGES),
    "README.md",
    "examples/README.md",
    "benchmarks/README.md",
]
_MEASURED_TEXTS = [
    *_READ_TEXTS,
    *(str(p.relative_to(REPO)) for p in sorted((REPO / "jaxem").rglob("*.py"))),
]


@pytest.mark.parametrize("path", _MEASURED_TEXTS)
def test_measured_numbers_name_their_command(path):
    """Every timing or speed-up names what reproduces it, in its own paragraph, list item
    or table, its section's heading or the sentence introducing it (issue 20)."""
    text = (REPO / path).read_text()
    assert unsourced_measurements(text, markdown=path.endswith(".md")) == []


@pytest.mark.parametrize("path", _READ_TEXTS)
def test_pages_hold_no_control_character(path):
    """No page or README holds a control character: a ``\\v`` written from an unescaped
    Python string once turned m-step.md's ``\\varepsilon`` into a vertical tab and
    "arepsilon", which MathJax shows as text."""
    text = (REPO / path).read_text()
    found = sorted({f"{ord(c):#04x}" for c in text if ord(c) < 32 and c not in "\n\t"})
    assert found == [], f"{path} holds control characters {found}"
