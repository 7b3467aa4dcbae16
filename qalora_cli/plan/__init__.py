"""Memory plans: the peak memory each stage (quantize, finetune, merge) will need on each device,
computed from the model's shape alone (built on the meta device; no weight is read).

`dry_run.plan_stage(stage, cfg)` -> a StagePlan; `dry_run.show_plan` prints it (`--dry-run` on the
commands). Nothing is imported here: the commands import this package at start-up."""
