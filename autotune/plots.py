"""Optimisation-history and parameter-importance PNGs of a tuned study, written beside its table by tune."""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna


def save_study_plots(study: optuna.Study, stem: Path) -> list[Path]:
    """`<stem>.history.png` and, when at least two parameters varied over complete trials,
    `<stem>.importance.png`; returns the files written. Needs matplotlib (Agg backend, no display)."""
    # lazy: matplotlib only when a study is plotted, and its Agg backend (no display) is chosen before pyplot loads
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after use("Agg"), as above
    from optuna.visualization import matplotlib as optuna_plots  # lazy: imports pyplot, as above

    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib backend experimental
        if complete:
            axes = optuna_plots.plot_optimization_history(study)
            axes.set_title(f"{study.study_name}\noptimisation history (us)", fontsize=8)
            written.append(_save(plt, axes.figure, stem.with_name(stem.name + ".history.png")))
        varied = [name for name in (complete[0].params if complete else {})
                  if len({t.params.get(name) for t in complete}) > 1]
        if len(complete) >= 3 and len(varied) >= 2:
            # PED-ANOVA needs no scikit-learn (fANOVA and mean-decrease-impurity do)
            evaluator = optuna.importance.PedAnovaImportanceEvaluator()
            axes = optuna_plots.plot_param_importances(study, evaluator=evaluator)
            axes.set_title("", loc="left")  # optuna's own title sits there
            axes.set_title(f"{study.study_name}\nparameter importance (PED-ANOVA)", fontsize=8)
            written.append(_save(plt, axes.figure, stem.with_name(stem.name + ".importance.png")))
    return written


def _save(plt, figure, path: Path) -> Path:
    figure.set_size_inches(7, 4.5)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path
