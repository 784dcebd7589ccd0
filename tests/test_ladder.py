"""A study's rungs index one model ladder, and its trials follow one lr/batch rule: resuming a study made with
another ladder or another rule is refused."""

import optuna
import pytest
from optuna.distributions import IntDistribution
from optuna.trial import TrialState, create_trial

from scaling_lab.errors import ConfigError
from scaling_lab.isoflop import model_at, plan_budget, resolve_search, trial_config
from scaling_lab.studies import ladder_of, make_storage, open_study


def _study_with(storage, name, rung, n_embd, **attrs):
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize")
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=4.0, params={"rung": rung},
                                 distributions={"rung": IntDistribution(0, 30)},
                                 user_attrs={"n_embd": n_embd, **attrs}))


def test_open_study_records_the_ladder_and_reopens(tmp_path):
    scfg = resolve_search({"mode": "quick", "budgets": "1e11", "storage": f"sqlite:///{tmp_path}/o.db"})
    plan = plan_budget(scfg, 1e11)
    storage = make_storage(scfg.storage)
    study = open_study(scfg, plan, storage)
    assert study.user_attrs["ladder"] == ladder_of(plan)
    assert ladder_of(plan).startswith("4,6,8,10,12,16")
    open_study(scfg, plan_budget(scfg, 1e11), storage)  # same ladder: resumes


def test_a_study_from_another_ladder_is_refused(tmp_path):
    scfg = resolve_search({"mode": "quick", "budgets": "1e11", "storage": f"sqlite:///{tmp_path}/o.db"})
    plan = plan_budget(scfg, 1e11)
    storage = make_storage(scfg.storage)
    rung = plan.lo
    width = model_at(rung, scfg.data.vocab_size, scfg.block_size).n_embd
    _study_with(storage, plan.study_name, rung, width + 4)  # an older family: this rung was a wider model
    with pytest.raises(ConfigError, match="study_prefix.*another model ladder"):
        open_study(scfg, plan, storage)


def test_a_study_from_before_the_attribute_with_matching_widths_resumes(tmp_path):
    scfg = resolve_search({"mode": "quick", "budgets": "1e11", "storage": f"sqlite:///{tmp_path}/o.db"})
    plan = plan_budget(scfg, 1e11)
    storage = make_storage(scfg.storage)
    _study_with(storage, plan.study_name, plan.lo, model_at(plan.lo, scfg.data.vocab_size, scfg.block_size).n_embd)
    assert open_study(scfg, plan, storage).user_attrs["ladder"] == ladder_of(plan)


def test_a_study_trained_under_another_batch_or_lr_rule_is_refused(tmp_path):
    """quick at 1e11 rounds each size's batch to a whole number; a study whose trial trained with the power-of-two
    batch of that size (the old default), or with another lr, is refused naming the parameter; the same rule
    resumes."""
    scfg = resolve_search({"mode": "quick", "budgets": "1e11", "storage": f"sqlite:///{tmp_path}/o.db"})
    old = resolve_search({"mode": "quick", "budgets": "1e11", "batch_round": "pow2"})
    plan = plan_budget(scfg, 1e11)
    rung = next(r for r in range(plan.lo, plan.hi + 1)
                if trial_config(scfg, 1e11, r).train.batch_size != trial_config(old, 1e11, r).train.batch_size)
    width = model_at(rung, scfg.data.vocab_size, scfg.block_size).n_embd
    for i, (rule, lr) in enumerate(((old, scfg.train.lr), (scfg, 1e-3), (scfg, scfg.train.lr))):
        storage = make_storage(f"sqlite:///{tmp_path}/o{i}.db")
        _study_with(storage, plan.study_name, rung, width, batch_size=trial_config(rule, 1e11, rung).train.batch_size,
                    lr=lr)
        if i < 2:
            with pytest.raises(ConfigError, match=r"study_prefix.*batch_round"):
                open_study(scfg, plan_budget(scfg, 1e11), storage)
        else:
            assert open_study(scfg, plan_budget(scfg, 1e11), storage).user_attrs["ladder"] == ladder_of(plan)
