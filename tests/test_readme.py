"""Every ```python block of README.md runs as written, each in a fresh namespace."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks() -> list[tuple[int, str]]:
    """(first line number, source) of every ```python block, in order."""
    with open(README) as f:
        text = f.read()
    blocks = []
    for match in re.finditer(r"^```python[^\n]*\n(.*?)^```", text, flags=re.S | re.M):
        line = text.count("\n", 0, match.start()) + 2
        blocks.append((line, match.group(1)))
    return blocks


BLOCKS = python_blocks()


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 7


@pytest.mark.parametrize("line, source", BLOCKS, ids=[f"line{line}" for line, _ in BLOCKS])
def test_block_runs(line, source):
    code = compile(source, f"README.md, the block at line {line}", "exec")
    exec(code, {"__name__": f"readme_block_{line}"})
