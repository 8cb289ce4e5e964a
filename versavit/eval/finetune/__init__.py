"""Fine-tuning evaluations (the `kind = "training"` evaluators): backbone plus a task head trained on a benchmark's
train split, then scored on its evaluation split. Each module exposes one library function (e.g.
`versavit.eval.finetune.depth.finetune_depth`) that its evaluator calls and that can run as its own job."""
