"""A study's rungs index one model ladder: resuming a study made with another ladder is refused."""

import optuna
import pytest
from optuna.distributions import IntDistribution
from optuna.trial import TrialState, create_trial

from scaling_lab.errors import ConfigError
from scaling_lab.isoflop import model_at, plan_budget, resolve_search
from scaling_lab.studies import ladder_of, make_storage, open_study


def _study_with(storage, name, rung, n_embd):
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize")
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=4.0, params={"rung": rung},
                                 distributions={"rung": IntDistribution(0, 30)}, user_attrs={"n_embd": n_embd}))


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
