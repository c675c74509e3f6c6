"""MkDocs hook: the Examples page shows pictures made by running the examples.

Every script in ``examples/`` that saves a picture is run when the site is built (from a
cache folder, with the Agg backend), and each ``saved NAME.png`` it prints becomes
``examples/NAME.png`` of the site; nothing is committed. Results are kept in
``.cache/docs-examples/<key>/``, the key a hash of the script, of ``jaxem/`` and of
``JAXEM_EXAMPLE_QUICK``, so a
rebuild reruns an example only when it, ``jaxem/`` or the quick setting changed; what the
script printed is kept there too (``stdout.txt``).

``JAXEM_DOCS_EXAMPLES=0`` builds without running them (the test that checks the site's
markup does): the Examples page then says where each picture would be instead of
showing it. ``JAXEM_EXAMPLE_QUICK=1`` is passed on to the scripts (fewer restarts).
"""

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

from mkdocs.structure.files import File

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
CACHE = REPO / ".cache" / "docs-examples"
PAGE = "examples.md"
_IMAGE = re.compile(r"!\[([^\]]*)\]\((examples/[\w.-]+\.png)\)")


def _enabled():
    return os.environ.get("JAXEM_DOCS_EXAMPLES", "1") != "0"


def _key(script):
    digest = hashlib.sha256(script.read_bytes())
    # Quick runs (fewer restarts) are cached apart from full ones.
    digest.update(os.environ.get("JAXEM_EXAMPLE_QUICK", "").encode())
    for source in sorted((REPO / "jaxem").rglob("*.py")):
        digest.update(source.read_bytes())
    return f"{script.stem}-{digest.hexdigest()[:16]}"


def _pictures(script):
    """Run one example (unless cached); return the paths of the pictures it saved."""
    folder = CACHE / _key(script)
    done = folder / "saved.txt"
    if not done.exists():
        folder.mkdir(parents=True, exist_ok=True)
        python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=python_path)
        completed = subprocess.run(
            [sys.executable, str(script)], cwd=folder, env=env, capture_output=True, text=True
        )
        if completed.returncode != 0:
            raise RuntimeError(f"examples/{script.name} failed:\n{completed.stderr[-3000:]}")
        # What the script printed stays next to its pictures, to check the page's numbers.
        (folder / "stdout.txt").write_text(completed.stdout)
        saved = [line.split()[-1] for line in completed.stdout.splitlines() if "saved " in line]
        done.write_text("\n".join(saved))
    return [folder / name for name in done.read_text().split()]


def on_files(files, config):
    """Add every example's pictures to the site as ``examples/NAME.png``."""
    if not _enabled():
        return files
    for script in sorted(EXAMPLES.glob("*.py")):
        if "savefig" not in script.read_text():
            continue
        for picture in _pictures(script):
            files.append(
                File.generated(config, f"examples/{picture.name}", abs_src_path=str(picture))
            )
    return files


def on_page_markdown(markdown, page, **kwargs):
    """Without the examples run, say where each picture comes from instead."""
    if _enabled() or page.file.src_uri != PAGE:
        return markdown
    return _IMAGE.sub(
        lambda m: (
            f"*(The picture `{m.group(2)}` is drawn when the site is built with the "
            "examples run; this build set `JAXEM_DOCS_EXAMPLES=0`.)*"
        ),
        markdown,
    )
