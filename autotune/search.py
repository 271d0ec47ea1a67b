"""The search: one optuna study per (target, kernel, dtype, model shape, bucket) over the kernel's config space.

Per-parameter categorical choices taken from the kernel's CONFIG_SPACE after its keep() filter; a seeded
TPESampler; combinations outside the kept space, configs the objective finds invalid (spills, limits, wrong
results) and configs whose lower bound cannot beat the study's best (skipping their compile) end as
optuna.TrialPruned and are never chosen. Studies live in any optuna storage (SQLite file, PostgreSQL URL),
so an interrupted tune resumes and several processes can share one study.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import optuna
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

from qwen3export.errors import InputError
from qwen3export.kernels.compile import kernel_module
from qwen3export.kernels.config import KernelConfig, arch_limits

from .tables import config_from_params, config_params, shape_key

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# An objective maps a config to (microseconds, "ok") or (None, why it is invalid).
Objective = Callable[[KernelConfig], "tuple[float | None, str]"]


@dataclass(frozen=True)
class StudyKey:
    """Identifies one study; `source` keeps modelled and measured studies apart."""

    target: str
    kernel: str
    dtype: str
    shape: tuple[tuple[str, int], ...]  # the model's fixed dims
    bucket: tuple[tuple[str, int], ...]
    source: str

    @property
    def name(self) -> str:
        return (f"{self.target}:{self.kernel}:{self.dtype}:{shape_key(dict(self.shape))}:"
                f"{shape_key(dict(self.bucket))}:{self.source}")

    @classmethod
    def make(cls, target: str, kernel: str, dtype: str, shape: dict, bucket: dict, source: str) -> "StudyKey":
        return cls(target, kernel, dtype, tuple(sorted(shape.items())), tuple(sorted(bucket.items())), source)


@functools.lru_cache(maxsize=None)
def kept_space(kernel: str, arch: str) -> tuple[KernelConfig, ...]:
    """The kernel's CONFIG_SPACE after its keep() filter for `arch`."""
    module = kernel_module(kernel)
    limits = arch_limits(arch)
    return tuple(c for c in module.CONFIG_SPACE if module.keep(c, limits))


def parameter_choices(space: tuple[KernelConfig, ...] | list[KernelConfig]) -> dict[str, list[int]]:
    """Parameter name -> sorted distinct values over the space (one categorical per parameter)."""
    choices: dict[str, set[int]] = {}
    for config in space:
        for name, value in config_params(config).items():
            choices.setdefault(name, set()).add(value)
    return {name: sorted(values) for name, values in sorted(choices.items())}


def searched_params(config: KernelConfig, space: tuple[KernelConfig, ...] | list[KernelConfig]) -> dict[str, int]:
    """The config's values of the parameters that vary over the space (those the sampler suggests)."""
    varying = {name for name, values in parameter_choices(space).items() if len(values) > 1}
    return {k: v for k, v in config_params(config).items() if k in varying}


def study_budget(trials: int, space_size: int, space_fraction: float = 0.0) -> int:
    """Finished trials a study runs to: `trials`, raised to `space_fraction` of the space, capped at the space."""
    return min(space_size, max(trials, math.ceil(space_fraction * space_size)))


def make_sampler(seed: int, space_size: int) -> optuna.samplers.TPESampler:
    # multivariate TPE models the parameters jointly (tile sizes and warps interact); constant_liar keeps
    # parallel workers from proposing the same point; ~10 % of the space (>= 5, <= 10) as random start.
    startup = max(5, min(10, space_size // 10))
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, n_startup_trials=startup)


def open_study(key: StudyKey, storage: str | optuna.storages.BaseStorage, seed: int = 0,
               space_size: int = 100) -> optuna.Study:
    """Create or load (load_if_exists) the study for `key`; the sampler is per process, seeded."""
    return optuna.create_study(study_name=key.name, storage=storage, direction="minimize", load_if_exists=True,
                               sampler=make_sampler(seed, space_size))


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=FINISHED)


def seed_study(study: optuna.Study, kernel: str, space: tuple[KernelConfig, ...] | list[KernelConfig], trials: int) -> int:
    """On a new study, enqueue the kernel's DEFAULT_CONFIG first (the result is then never worse than the
    default) or, when the budget covers the whole space, every config (exhaustive). Returns trials enqueued."""
    if study.get_trials(deepcopy=False):
        return 0
    default = kernel_module(kernel).DEFAULT_CONFIG
    queue = [c for c in space if c == default] + ([c for c in space if c != default] if trials >= len(space) else [])
    for config in queue:
        study.enqueue_trial(searched_params(config, space), skip_if_exists=True)
    return len(queue)


def trial_objective(kernel: str, space: tuple[KernelConfig, ...] | list[KernelConfig], evaluate: Objective,
                    bound: Callable[[KernelConfig], float | None] | None = None) -> Callable[[optuna.Trial], float]:
    """The optuna objective: suggest each parameter; prune what is outside the space, what cannot beat the
    study's best (when `bound` gives a lower bound, checked before the expensive evaluation) and what is
    invalid; reuse the value of a config the study already evaluated (TPE re-proposes points in small spaces)."""
    choices = parameter_choices(space)
    fixed = {name: values[0] for name, values in choices.items() if len(values) == 1}  # not worth a dimension
    labels = {c.label for c in space}

    def objective(trial: optuna.Trial) -> float:
        params = fixed | {name: trial.suggest_categorical(name, values) for name, values in choices.items()
                          if name not in fixed}
        config = config_from_params(kernel, params)
        trial.set_user_attr("config", config.label)
        trial.set_user_attr("params", params)
        if config.label not in labels:
            trial.set_user_attr("pruned", "not in the kernel's CONFIG_SPACE after keep()")
            raise optuna.TrialPruned("outside the kept config space")
        complete = trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        for done in complete:
            if done.user_attrs.get("config") == config.label:
                trial.set_user_attr("duplicate_of", done.number)
                return float(done.value)
        if bound is not None and complete:
            best, floor = min(t.value for t in complete), bound(config)
            if floor is not None and floor > best:
                trial.set_user_attr("pruned", f"cannot beat {best:.3f} us: lower bound {floor:.3f} us")
                raise optuna.TrialPruned("lower bound above the best")
        microseconds, reason = evaluate(config)
        if microseconds is None or not math.isfinite(microseconds):
            trial.set_user_attr("pruned", reason)
            raise optuna.TrialPruned(reason)
        return float(microseconds)

    return objective


def run_study(study: optuna.Study, objective: Callable[[optuna.Trial], float], trials: int,
              callbacks: list[Callable] = ()) -> int:
    """Run until the study holds `trials` finished (complete + pruned) trials, counting those of earlier
    (interrupted) runs and of other workers; returns the trials this call ran."""
    remaining = trials - len(finished_trials(study))
    if remaining <= 0:
        return 0
    mine: list[int] = []
    study.optimize(objective, n_trials=remaining, gc_after_trial=False,
                   callbacks=[MaxTrialsCallback(trials, states=FINISHED), lambda _, t: mine.append(t.number),
                              *callbacks])
    return len(mine)


def best_config(study: optuna.Study, kernel: str) -> tuple[KernelConfig, float, int]:
    """(config, objective in us, finished trials) of the best complete trial; InputError if none was valid."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not complete:
        raise InputError(f"study {study.study_name} has no valid config: every trial was pruned "
                         f"({len(finished_trials(study))} finished); widen the config space or check the kernel")
    best = min(complete, key=lambda t: (t.value, t.number))
    return config_from_params(kernel, best.user_attrs["params"]), float(best.value), len(finished_trials(study))


def exhaustive_optimum(space: tuple[KernelConfig, ...] | list[KernelConfig], evaluate: Objective) -> tuple[KernelConfig, float]:
    """The true minimum of `evaluate` over the space (for tests and benchmarks: how fast the search gets there)."""
    values = [(evaluate(c)[0], i) for i, c in enumerate(space)]
    value, index = min((v, i) for v, i in values if v is not None)
    return space[index], value


def trials_to_reach(study: optuna.Study, value: float, rel: float = 1e-9) -> int | None:
    """1-based count of finished trials after which the study's best is within `rel` of `value`."""
    for count, t in enumerate(sorted(finished_trials(study), key=lambda t: t.number), start=1):
        if t.state == TrialState.COMPLETE and t.value <= value * (1 + rel):
            return count
    return None


def describe(study: optuna.Study) -> dict[str, Any]:
    states = [t.state for t in study.get_trials(deepcopy=False)]
    return {"study": study.study_name, "complete": states.count(TrialState.COMPLETE),
            "pruned": states.count(TrialState.PRUNED), "failed": states.count(TrialState.FAIL),
            "running": states.count(TrialState.RUNNING)}
