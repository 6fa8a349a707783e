"""The code in docs/api.md and the README's loss example runs as written (in a fresh process,
from a folder outside the checkout, with the four forced CPU devices of the suite)."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def python_blocks(markdown: str) -> list[str]:
  """The ```python fenced blocks of a markdown text, in order."""
  return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


def section(markdown: str, heading: str) -> str:
  """The text under the `## heading` line, up to the next `## ` heading."""
  start = markdown.index(f"\n## {heading}\n")
  end = markdown.find("\n## ", start + 1)
  return markdown[start:end if end >= 0 else None]


def run_python(code: str, tmp_path: pathlib.Path) -> str:
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc.stdout


def test_block_finder_on_a_made_up_page():
  page = "x\n```python\na = 1\n```\n```bash\nls\n```\n```python\nb = 2\n```\n"
  assert python_blocks(page) == ["a = 1\n", "b = 2\n"]
  assert section("# t\n## A\nx\n## B\ny\n", "A") == "\n## A\nx"


@pytest.mark.slow
def test_api_md_runs(tmp_path):
  blocks = python_blocks((ROOT / "docs" / "api.md").read_text())
  assert len(blocks) >= 4
  out = run_python("\n".join(blocks), tmp_path)
  # Each block printed its line: the training step, the sharded check, both criteria.
  assert "grad norm" in out and "sharded == unsharded: True" in out
  assert "'loss_bbox'" in out and "== dino_criterion's" in out
  assert "devices: 4" in out  # the suite's forced CPU devices reached the subprocess


def test_readme_loss_example_runs(tmp_path):
  readme = (ROOT / "README.md").read_text()
  blocks = python_blocks(section(readme, "Using the loss in your own JAX code"))
  assert len(blocks) == 1
  assert len(blocks[0].strip().splitlines()) <= 15  # the short example the front page promises
  out = run_python(blocks[0], tmp_path)
  assert re.search(r"loss \d+\.\d+", out), out


@pytest.mark.parametrize("page", sorted(p.name for p in (ROOT / "docs").glob("*.md")))
def test_docs_name_no_missing_local_file(page):
  """Relative links of docs/*.md point at files that exist."""
  text = (ROOT / "docs" / page).read_text()
  for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
    assert (ROOT / "docs" / target).exists(), f"docs/{page} links to missing {target}"
