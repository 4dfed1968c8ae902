"""Training-loop plumbing shared by the recipes: checkpoints, distributed set-up, evaluation, progress."""
