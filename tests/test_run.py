"""run.py as a user calls it (subprocess)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_help_exits_zero_and_lists_flags():
  out = subprocess.run([sys.executable, "run.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  for flag in ("--config", "--workdir", "--mode"):
    assert flag in out.stdout
