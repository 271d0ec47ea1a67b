"""autotune/search.py: the seeded TPE search reaches the exhaustive optimum of its own objective within 30% of
the space's size, never chooses an invalid config, and searches spaces smaller than its budget exhaustively.

The objective is the cost model over synthetic compile resources (autotune_fakes.py). Seeded, so these are
deterministic; over seeds 0-9 of the four cases below 39/40 runs reached the optimum within 30% of the space
(one fused_moe h100 run missed it); benchmarks/autotune.py measures the same on real compile records."""

from __future__ import annotations

import optuna
import pytest

from autotune_fakes import synthetic_resources
from qwen3export.autotune import search
from qwen3export.autotune.cost_model import estimate, lower_bound
from qwen3export.targets import get_target

optuna.logging.set_verbosity(optuna.logging.WARNING)


def objective_for(target, kernel, shape, invalid=()):
    def evaluate(config):
        if config.label in invalid:
            return None, "spills 64 B stack"
        est = estimate(target, kernel, shape, config, "bf16", synthetic_resources(target, kernel, config, "bf16"))
        return est.microseconds, est.reason
    return evaluate


def run(kernel, space, evaluate, trials, seed, bound=None):
    study = optuna.create_study(sampler=search.make_sampler(seed, len(space)))
    search.seed_study(study, kernel, space, trials)
    search.run_study(study, search.trial_objective(kernel, space, evaluate, bound), min(trials, len(space)))
    return study


@pytest.mark.parametrize("kernel,target,shape,seed", [
    ("fused_moe", "a100", {"E": 128, "H": 2048, "I": 768, "K": 8, "M": 64}, 0),
    ("fused_moe", "h100", {"E": 128, "H": 4096, "I": 1536, "K": 8, "M": 4096}, 1),
    ("attention_decode", "l4", {"Hq": 32, "Hkv": 4, "D": 128, "B": 1, "L": 32768}, 2),
    ("attention_prefill", "h100", {"Hq": 16, "Hkv": 8, "D": 128, "S": 2048}, 3),
])
def test_finds_exhaustive_optimum_within_30_percent_of_space(kernel, target, shape, seed):
    tgt = get_target(target)
    space = search.kept_space(kernel, tgt.arch)
    evaluate = objective_for(tgt, kernel, shape)
    _, optimum = search.exhaustive_optimum(space, evaluate)
    budget = int(0.3 * len(space))
    bound = lambda c: lower_bound(tgt, kernel, shape, c, "bf16").microseconds  # noqa: E731
    study = run(kernel, space, evaluate, budget, seed, bound)
    assert len(search.finished_trials(study)) == budget
    _, best, _ = search.best_config(study, kernel)
    assert best == pytest.approx(optimum, rel=1e-9), f"{len(space)} configs, {budget} trials"


def test_lower_bound_never_exceeds_the_estimate():
    for kernel, target, shape in [("fused_moe", "a100", {"E": 128, "H": 2048, "I": 768, "K": 8, "M": 256}),
                                  ("attention_decode", "h100", {"Hq": 64, "Hkv": 4, "D": 128, "B": 8, "L": 8192}),
                                  ("rms_norm", "l4", {"N": 4096, "M": 1024})]:
        tgt = get_target(target)
        for config in search.kept_space(kernel, tgt.arch):
            est = estimate(tgt, kernel, shape, config, "bf16", synthetic_resources(tgt, kernel, config, "bf16"))
            if est.valid:
                assert lower_bound(tgt, kernel, shape, config, "bf16").seconds <= est.seconds * (1 + 1e-12)


def test_invalid_configs_are_pruned_and_never_chosen():
    tgt = get_target("a100")
    kernel, shape = "attention_decode", {"Hq": 32, "Hkv": 4, "D": 128, "B": 1, "L": 8192}
    space = search.kept_space(kernel, tgt.arch)
    fastest, _ = search.exhaustive_optimum(space, objective_for(tgt, kernel, shape))
    # the true optimum "spills": the search must settle for the best valid one
    evaluate = objective_for(tgt, kernel, shape, invalid={fastest.label})
    study = run(kernel, space, evaluate, len(space), seed=0)  # budget = space: every config is tried
    config, best, _ = search.best_config(study, kernel)
    assert config != fastest
    assert best == pytest.approx(search.exhaustive_optimum([c for c in space if c != fastest], evaluate)[1])
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert [t.user_attrs["pruned"] for t in pruned] == ["spills 64 B stack"]


def test_small_space_is_searched_exhaustively_default_first():
    tgt = get_target("h100")
    kernel, shape = "rms_norm", {"N": 1024, "M": 16}
    space = search.kept_space(kernel, tgt.arch)
    study = run(kernel, space, objective_for(tgt, kernel, shape), trials=100, seed=3)
    assert len(study.trials) == len(space) == 15
    assert {t.user_attrs["config"] for t in study.trials} == {c.label for c in space}
    assert study.trials[0].user_attrs["params"] == search.config_params(search.kernel_module(kernel).DEFAULT_CONFIG)
    assert "num_stages" not in study.trials[0].params  # rms_norm's space has one value: not a search dimension


def test_study_budget():
    assert search.study_budget(24, 15) == 15  # small space: all of it (enumerated)
    assert search.study_budget(24, 180, 0.3) == 54  # big space: 30 % of it
    assert search.study_budget(24, 72, 0.3) == 24


def test_all_invalid_study_fails_loudly():
    tgt = get_target("a100")
    space = search.kept_space("rms_norm", tgt.arch)
    study = run("rms_norm", space, lambda c: (None, "spills"), trials=15, seed=0)
    with pytest.raises(Exception, match="no valid config"):
        search.best_config(study, "rms_norm")
