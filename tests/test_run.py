"""run.py as a user calls it (subprocess)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_help_exits_zero_and_lists_flags():
  out = subprocess.run([sys.executable, "run.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  for flag in ("--config", "--workdir", "--mode"):
    assert flag in out.stdout


def _run(*args):
  return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)


@pytest.mark.slow
def test_config_typo_is_one_line_listing_valid_keys():
  out = _run("--config.optimizer.lr_typo=3")  # default config: experiments/synthetic.py
  assert out.returncode != 0
  assert "Traceback" not in out.stderr
  assert "--config.optimizer.lr_typo" in out.stderr and "weight_decay" in out.stderr
  out = _run("--config=experiments/dino_r50.py:tiny", "--config.modle.hidden_dim=3")
  assert out.returncode != 0 and "model" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_summary_mode_prints_param_count():
  out = _run("--config=experiments/dino_r50.py:tiny", "--mode=summary")
  assert out.returncode == 0, out.stderr[-2000:]
  line = next(l for l in out.stdout.splitlines() if l.startswith("params: "))
  assert int(line.split()[1]) > 0
