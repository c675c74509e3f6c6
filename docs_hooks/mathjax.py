"""MkDocs hook: ship MathJax with the site, so that maths renders with no network.

MathJax 3 comes from the pip package ``django-static-mathjax`` (the docs extra; it has
no dependencies and is used here only for its static files): its ``es5`` build is
copied to ``javascripts/mathjax/`` of the built site, and ``mkdocs.yml`` loads
``javascripts/mathjax/tex-chtml.js`` from there. MathJax finds its fonts relative to
that script, so the folder is copied whole.
"""

import shutil
from pathlib import Path

TARGET = Path("javascripts") / "mathjax"


def _mathjax_es5():
    try:
        import mathjax
    except ImportError as err:
        raise RuntimeError(
            "The docs need MathJax from the package django-static-mathjax: "
            'pip install -c constraints.txt -e ".[docs]"'
        ) from err
    return Path(next(iter(mathjax.__path__))) / "static" / "mathjax" / "es5"


def on_post_build(config, **kwargs):
    """Copy MathJax's ``es5`` build into the site."""
    source = _mathjax_es5()
    destination = Path(config["site_dir"]) / TARGET
    shutil.copytree(source, destination, dirs_exist_ok=True)
