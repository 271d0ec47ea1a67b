"""Autotuning (pipeline stage "tune"): per target, an optuna search over each Triton kernel's config space
against a modelled (cost_model.py) or measured (measure.py) objective, written to tables (tables.py) that
build reads back with select_configs. See ../shared/DESIGN.md.
"""

from .tables import MissingTableError, table_config, select_configs, table_filename
from .tune import tune

__all__ = ["MissingTableError", "table_config", "select_configs", "table_filename", "tune"]
