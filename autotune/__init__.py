"""Autotuning (pipeline stage "tune"): per target, an optuna search over each Triton kernel's config space
against a modelled (cost_model.py) or measured (measure.py) objective, written to tables (tables.py) that
build reads back with select_configs. See ../shared/DESIGN.md.

Nothing is imported here: `qwen3export --help` registers the `tune` parser (autotune/cli.py) without loading
optuna or Triton; import the submodule you need.
"""
