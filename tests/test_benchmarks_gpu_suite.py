"""benchmarks/gpu_suite.py: what it runs (full size on the GPU, tiny in the dry run), how a part
is recorded (ok, failed, timeout, skipped, budget spent), and the JSON + markdown it writes."""
import json
import os
import sys

import pytest

from sized_detr_jax.benchmarks import gpu_suite


def test_full_plan_runs_the_issue_s_parts_at_coco_size_on_the_gpu():
  parts = {p.name: p for p in gpu_suite.plan(dry_run=False, dino_src="DINO")}
  assert set(parts) == {"kernel_tests", "msda_float32", "msda_bfloat16", "train_step_coco91",
                        "train_step_coco91_bf16", "train_step_coco91_pallas",
                        "train_step_coco91_bf16_pallas", "matching_host", "vs_pytorch",
                        "scale"}
  for tokens in gpu_suite.TRAIN_TOKENS:
    argv = parts["train_step_" + tokens.replace(",", "_")].argv
    assert f"--config_arg={tokens}" in argv and "--size=800x1333" in argv and "--batch=8" in argv
  assert parts["kernel_tests"].env["JAX_PLATFORMS"] == "cuda,cpu"
  assert "--device=gpu" in parts["vs_pytorch"].argv and not parts["vs_pytorch"].skip
  assert sum(p.slice_s for p in parts.values() if p.skip != gpu_suite.OPT_IN) <= 480
  assert parts["scale"].skip == gpu_suite.OPT_IN  # its compiles run on their own
  no_dino = {p.name: p for p in gpu_suite.plan(dry_run=False)}
  assert "dino_src" in no_dino["vs_pytorch"].skip


def test_dry_plan_is_tiny_and_on_the_cpu():
  for part in gpu_suite.plan(dry_run=True):
    assert part.env["JAX_PLATFORMS"] == "cpu", part.name
    assert not any("800x1333" in a or a == "--batch=8" for a in part.argv), part.name


def _part(name, code, slice_s=30.0, skip=""):
  return gpu_suite.Part(name, [sys.executable, "-c", code], slice_s, skip=skip)


@pytest.mark.slow
def test_run_part_records_each_outcome():
  ok = gpu_suite.run_part(_part("ok", "print('step_s: 1.5 (median of 5)')"), 100)
  assert ok["status"] == "ok" and ok["returncode"] == 0
  assert gpu_suite.key_lines(ok) == ["step_s: 1.5 (median of 5)"]
  failed = gpu_suite.run_part(_part("bad", "import sys; print('boom'); sys.exit(3)"), 100)
  assert failed["status"] == "failed" and failed["returncode"] == 3
  assert gpu_suite.key_lines(failed)[-1] == "boom"
  slow = gpu_suite.run_part(_part("slow", "import time; time.sleep(30)", slice_s=30), 6)
  assert slow["status"] == "timeout after 6 s" and 5 < slow["wall_s"] < 20
  assert gpu_suite.run_part(_part("x", "", skip="no torch"), 100)["reason"] == "no torch"
  spent = gpu_suite.run_part(_part("late", "print(1)"), 2)
  assert spent["status"] == "skipped" and "budget" in spent["reason"]


def test_main_writes_json_and_markdown_and_fails_on_a_failed_part(tmp_path, monkeypatch):
  parts = [_part("good", "print('step_s: 0.5 (median of 5)  img_per_s: 16.00')"),
           _part("bad", "import sys; print('x | y'); sys.exit(2)"),
           _part("torch", "", skip="no --dino_src")]
  monkeypatch.setattr(gpu_suite, "plan", lambda dry_run, dino_src="": parts)
  rc = gpu_suite.main(["--dry_run", f"--out={tmp_path}"])
  record = json.load(open(tmp_path / "gpu_suite.json"))
  assert rc == 1 and record["dry_run"]
  assert [(p["name"], p["status"]) for p in record["parts"]] == [
      ("good", "ok"), ("bad", "failed"), ("torch", "skipped")]
  table = open(tmp_path / "gpu_suite.md").read().splitlines()
  assert table[2:] == ["| part | status | s | key lines |", "|---|---|---|---|",
                       f"| good | ok | {record['parts'][0]['wall_s']:.0f} | "
                       "step_s: 0.5 (median of 5)  img_per_s: 16.00 |",
                       f"| bad | failed | {record['parts'][1]['wall_s']:.0f} | x \\| y |",
                       "| torch | skipped | 0 | no --dino_src |"]
  monkeypatch.setattr(gpu_suite, "plan", lambda dry_run, dino_src="": parts[:1])
  assert gpu_suite.main(["--dry_run", f"--out={tmp_path}"]) == 0


def test_opt_in_part_runs_when_named(tmp_path, monkeypatch):
  parts = [_part("extra", "print('flops: 1')", skip=gpu_suite.OPT_IN), _part("good", "print(1)")]
  monkeypatch.setattr(gpu_suite, "plan", lambda dry_run, dino_src="": parts)
  assert gpu_suite.main(["--dry_run", f"--out={tmp_path}"]) == 0
  record = json.load(open(tmp_path / "gpu_suite.json"))
  assert [p["status"] for p in record["parts"]] == ["skipped", "ok"]
  assert gpu_suite.main(["--dry_run", f"--out={tmp_path}", "--parts=extra"]) == 0
  record = json.load(open(tmp_path / "gpu_suite.json"))
  assert [(p["name"], p["status"]) for p in record["parts"]] == [("extra", "ok")]


def test_unknown_part_is_one_clear_error(tmp_path):
  with pytest.raises(SystemExit):
    gpu_suite.main(["--dry_run", f"--out={tmp_path}", "--parts=nope"])


@pytest.mark.slow
def test_whole_dry_run_passes(tmp_path):
  rc = gpu_suite.main(["--dry_run", f"--out={tmp_path}", "--budget_s=3000"])
  record = json.load(open(tmp_path / "gpu_suite.json"))
  assert rc == 0, [(p["name"], p["status"], p["output_tail"][-5:]) for p in record["parts"]]
  assert os.path.exists(tmp_path / "gpu_suite.md")
