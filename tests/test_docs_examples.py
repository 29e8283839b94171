"""The docs' examples run, and print what the docs say they print.

An example is a ```python block preceded by the line ``<!-- example -->``
and followed by a ```text block with its expected standard output. Each runs
as a script of its own, in a fresh interpreter, with the test's environment
(`conftest.isolated`): a ``Client()`` in it starts a private cluster, which
must be gone at the end like any process a test starts.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
MARK = "<!-- example -->"
EXAMPLE = re.compile(re.escape(MARK) + r"\n```python\n(.*?)```\n\n```text\n(.*?)```", re.S)
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
HEADING = re.compile(r"^#+ (.+)$", re.M)
#: Pages whose examples run; a page with none fails the test, so a change of format shows.
PAGES = ["shared-state.md"]


def _examples(page: str) -> list:
    text = (DOCS / page).read_text()
    found = []
    for match in EXAMPLE.finditer(text):
        heading = HEADING.findall(text, 0, match.start())[-1]
        slug = re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")
        found.append(pytest.param(match.group(1), match.group(2), id=f"{page}:{len(found) + 1}:{slug}"))
    return found


@pytest.mark.parametrize("page", PAGES)
def test_every_script_is_an_example(page):
    """A block that is a whole script (it opens a Client, or has a main
    guard) must be marked as an example, with its output, or it would not run."""
    text = (DOCS / page).read_text()
    examples = {m.group(1) for m in EXAMPLE.finditer(text)}
    assert examples, f"no examples found in {page}: has the format changed?"
    scripts = [block for block in PYTHON_BLOCK.findall(text)
               if "with Client(" in block or "__main__" in block]
    unmarked = [block for block in scripts if block not in examples]
    assert not unmarked, f"scripts in {page} not marked {MARK} and followed by their output:\n" + \
        "\n---\n".join(unmarked)


@pytest.mark.parametrize("code, expected", [example for page in PAGES for example in _examples(page)])
def test_example(code, expected, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.stdout == expected, f"stderr:\n{result.stderr}"
