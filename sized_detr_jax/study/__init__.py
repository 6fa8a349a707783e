r"""Multi-seed study: every variant x seed as one CLI run, then paired statistics and plots.

  python -m sized_detr_jax.study --config=synthetic:smoke \
      --variants='l1=;sized=criterion.bbox_loss=sized_l1,criterion.sized_l1_rescale=True' \
      --seeds=0,1 --workdir=runs/study [--baseline=l1] [--parallel=1] [--overrides=total_steps=2]

A thin layer over the CLI (no second trainer), in four modules:
  * `runner`: each variant x seed is one `python -m sized_detr_jax.cli` subprocess, one at a
    time (`--parallel=N`: N at once); finished runs are skipped, so a killed study continues
    where it stopped; a failing run is reported (exit code, log path, last lines) and the
    others go on, then the study exits with status 1;
  * `metrics`: per run, the COCO metrics (pycocotools through `evaluate.coco_evaluation`: per
    size AP50/AP75 and class-agnostic AP) and the training log;
  * `statistics`: mean ± std over seeds and paired differences to `--baseline` (pure);
  * `report`: study.json, study.md, study_ap_by_size.png and study_curves.png.
The results so far and the commands that made them: docs/study.md.
"""
