"""The protocol ablation (issue 18): the step table, the schedule options it needs, one real tiny ablation end to end
(real Optuna SQLite studies, a real MLflow store, the offline text), the grouped analysis and the errors."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from servers import store_runs as _runs

from scaling_lab import ablation, analyze, config, grouped, isoflop, projectspec, sources
from scaling_lab.cli import main_ablation, main_analyze
from scaling_lab.counting import make_plan
from scaling_lab.errors import ConfigError
from scaling_lab.train import lr_at

ROOT = Path(__file__).resolve().parents[1]


def _args(d: dict) -> list[str]:
    return [x for k, v in d.items() for x in (f"--{k}", str(v))]


@pytest.fixture
def tiny_ablation(data_dir, store) -> dict[str, str]:
    return {"mode": "tiny", "dataset": str(data_dir), "train_split": "test", "val_split": "validation",
            "storage": f"sqlite:///{store / 'optuna.db'}", "experiment": "ablation-test"}


# --------------------------------------------------------------------------- pure parts


def test_lr_schedule_with_a_fixed_warmup_and_a_horizon_longer_than_the_run():
    peak, steps = 1e-2, 40
    old = [lr_at(s, steps, peak, 0.1, 0.1) for s in range(steps)]  # the defaults: unchanged behaviour
    assert old == [lr_at(s, steps, peak, 0.1, 0.1, 0, 0) for s in range(steps)]
    assert old[3] == pytest.approx(peak) and old[-1] == pytest.approx(0.1 * peak)
    lrs = [lr_at(s, steps, peak, 0.1, 0.1, warmup_steps=8, schedule_steps=200) for s in range(steps)]
    assert lrs[:8] == pytest.approx([peak * (s + 1) / 8 for s in range(8)])  # 8 steps, not 10% of 40
    progress = (steps - 1 - 8) / (200 - 1 - 8)  # the run stops mid-schedule
    assert lrs[-1] == pytest.approx(peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))))
    assert lrs[-1] > 0.9 * peak  # barely decayed: the loss is read mid-schedule
    assert lr_at(250, 300, peak, 0.1, 0.1, 0, 200) == pytest.approx(0.1 * peak)  # past the horizon: the floor
    assert lr_at(2, 40, peak, 0.1, 0.1, warmup_steps=60) == pytest.approx(peak * 3 / 60)  # longer than the run
    with pytest.raises(ConfigError, match="warmup_steps"):
        config.TrainConfig(warmup_steps=300, schedule_steps=200)


def test_step_names_order_and_aliases():
    assert ablation.parse_steps("kaplan,+head,+warmup,decay,tuned") == ablation.STEP_NAMES
    assert ablation.parse_steps(" kaplan , tuned ") == ("kaplan", "tuned")
    for bad, why in (("tuned,kaplan", "order"), ("kaplan,kaplan", "order"), ("kaplan,chinchila", "unknown"),
                     ("", "steps from")):
        with pytest.raises(ConfigError, match=why) as exc:
            ablation.parse_steps(bad)
        assert str(exc.value).startswith("parameter 'steps'") and "\n" not in str(exc.value)


def test_each_step_is_one_documented_change_over_the_one_before():
    acfg = ablation.resolve_ablation({"mode": "quick"})
    d = ablation.design(acfg.search)
    # Kaplan's 3,000 of 2.5e5 steps, scaled to the longest planned run (the smallest size at the largest budget)
    k = ablation.step_config(acfg.search, "kaplan", d)
    top = max(k.budget_list())
    longest = isoflop.trial_config(k, top, isoflop.plan_budget(k, top).lo)
    assert d.schedule_steps == make_plan(longest).steps
    assert d.warmup_steps == round(0.012 * d.schedule_steps) == 231 and d.schedule_steps == 19223
    # the fixed rule's batch for D = 20 N at the geometric-mean budget (~9.5e10: N 28k, D 563k -> 4.4 -> 4)
    assert d.batch == ablation.one_batch(acfg.search) == 4
    cfgs = ablation.step_configs(acfg)
    assert list(cfgs) == list(ablation.STEP_NAMES)
    fields = lambda s: {"flops_rule": s.train.flops_rule, "warmup_steps": s.train.warmup_steps,  # noqa: E731
                        "schedule_steps": s.train.schedule_steps, "hparams": s.hparams,
                        "batch": (s.batch_min, s.batch_max)}
    assert fields(cfgs["kaplan"]) == {"flops_rule": "kaplan", "warmup_steps": d.warmup_steps, "schedule_steps":
                                      d.schedule_steps, "hparams": "fixed", "batch": (4, 4)}
    changed = {"head": {"flops_rule"}, "warmup": {"warmup_steps"}, "decay": {"schedule_steps"},
               "tuned": {"hparams", "batch"}}
    for prev, cur in zip(ablation.STEP_NAMES, ablation.STEP_NAMES[1:]):
        a, b = fields(cfgs[prev]), fields(cfgs[cur])
        assert {f for f in a if a[f] != b[f]} == changed[cur], cur
    assert fields(cfgs["tuned"])["flops_rule"] == "total" and cfgs["tuned"].train.warmup_steps == 0
    assert cfgs["tuned"].hyper_rule() == isoflop.TUNED["quick"]
    for name, s in cfgs.items():  # same budgets, data and seeds; study names differ by step
        assert (s.budgets, s.data, s.train.seed, s.train.lr) == (acfg.search.budgets, acfg.search.data, 1337, 3e-3)
        assert isoflop.study_name(s, top) == f"ablation-{name}-C3e11-{s.flops_rule}"
    assert ablation.BY_NAME["kaplan"].convention == "kaplan" and ablation.BY_NAME["head"].convention == "total"


def test_mlproject_ablation_and_analyze_entries():
    spec = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    entry = spec["ablation"]
    # declared: the fields with a default no mode changes (projectspec); the rest pass as extra -P name=value
    assert list(entry["parameters"]) == list(projectspec.parameters("ablation"))
    assert {"mode", "steps", "storage"} <= set(entry["parameters"]) <= set(ablation.ABLATION_FIELDS)
    assert entry["command"].startswith("PYTHONPATH=src:$PYTHONPATH python mlproject/ablation.py")
    for name in entry["parameters"]:
        assert f"--{name} {{{name}}}" in entry["command"]
    assert not set(ablation.STEP_FIELDS) & set(ablation.ABLATION_FIELDS)  # the steps set them
    assert "group_by" in analyze.field_names()  # -P group_by=protocol reaches the one parser as --group_by
    for name in ("warmup_steps", "schedule_steps"):
        assert name in spec["main"]["parameters"] and name in spec["search"]["parameters"]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("extra, param", [
    ({"steps": "tuned,kaplan"}, "steps"),
    ({"steps": "kaplan,+head,chinchilla"}, "steps"),
    ({"flops_rule": "kaplan"}, "flops_rule"),  # set by the steps
    ({"hparams": "tuned"}, "hparams"),
    ({"steps": "kaplan,tuned"}, "tuned_rule"),  # no tuned rule ships for tiny
    ({"steps": "tuned", "tuned_rule": "/no/such.json"}, "tuned_rule"),
    ({"steps": "kaplan", "bootstrap": "1"}, "bootstrap"),
])
def test_bad_input_is_one_line_exit_2(extra, param, tiny_ablation, store, capsys):
    assert main_ablation(_args({**tiny_ablation, **extra})) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: parameter '{param}'") and err.count("\n") == 1 and "Traceback" not in err
    assert not (store / "optuna.db").exists() and not _runs(store)


def test_dry_run_prints_every_step_and_the_total(tiny_ablation, store, capsys):
    assert main_ablation(_args({**tiny_ablation, "steps": "kaplan,+head", "dry_run": "true"})) == 0
    out = capsys.readouterr().out
    for step in ("kaplan", "head"):
        assert f"== step {step}:" in out and f"ablation-{step}-C6e09-" in out
    warm = ablation.design(ablation.resolve_ablation({**tiny_ablation, "steps": "kaplan"}).search).warmup_steps
    assert warm >= 1 and "seed 1337" in out and f"warmup {warm} steps (fixed)" in out
    assert out.count("budget total:") == 4
    assert "ablation total:" in out and "kaplan " in out.splitlines()[-1]
    assert not (store / "optuna.db").exists() and not _runs(store)


# --------------------------------------------------------------------------- a real tiny ablation


def test_tiny_ablation_end_to_end_and_rerun_reuses_the_studies(tiny_ablation, store, capsys):
    rule = {"rule": {"lr_coef": 6e-3, "lr_exp": -0.5, "batch_coef": 32.0, "batch_exp": 0.0, "source": "test rule"}}
    (store / "rule.json").write_text(json.dumps(rule))
    args = {**tiny_ablation, "steps": "kaplan,tuned", "tuned_rule": str(store / "rule.json"), "pruner": "none",
            "bootstrap": "20", "out": str(store / "report"), "anchors": "chinchilla", "pad_below": "1"}  # 3 sizes a budget
    assert main_ablation(_args(args)) == 0
    out = capsys.readouterr().out
    acfg = ablation.resolve_ablation({k: v for k, v in args.items()})
    d = ablation.design(acfg.search)
    storage = tiny_ablation["storage"]
    names = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}
    runs = _runs(store)
    trials = [r for r in runs if r.data.tags.get("scaling_lab.kind") == "trial"]
    parents = [r for r in runs if r.data.tags.get("scaling_lab.kind") == "study"]
    for step, rule_name in (("kaplan", "kaplan"), ("tuned", "total")):
        mine = {n: s for n, s in names.items() if n.startswith(f"ablation-{step}-")}
        assert sorted(mine) == [f"ablation-{step}-C1.8e10-{rule_name}", f"ablation-{step}-C6e09-{rule_name}"]
        for s in mine.values():
            assert s.user_attrs["protocol"] == step and s.user_attrs["protocol_options"]["flops_rule"] == rule_name
        assert {p.data.tags["study"] for p in parents if p.data.tags.get("protocol") == step} == set(mine)
        children = [r for r in trials if r.data.tags.get("protocol") == step]
        assert children and {r.data.tags["study"] for r in children} == set(mine)
        trained = [r for r in children if "lr" in r.data.params]  # not the twin-anchor copies
        assert len(trained) >= 6
        for r in trained:  # the step's options, read back from what each trial logged
            p = r.data.params
            assert p["flops_rule"] == rule_name == r.data.tags["flops_rule"]
            if step == "kaplan":
                assert (p["warmup_steps"], p["schedule_steps"]) == (str(d.warmup_steps),
                                                                                     str(d.schedule_steps))
                assert float(p["lr"]) == 3e-3 and p["batch_size"] == str(d.batch)
                assert int(p["steps"]) <= d.schedule_steps  # every run stops at or before the schedule's end
            else:
                assert (p["warmup_steps"], p["schedule_steps"]) == ("0", "0")
                assert float(p["lr"]) == pytest.approx(6e-3 * (float(p["n_params_total"]) / 1e5) ** -0.5)
                assert p["batch_size"] == "32"
            budget = float(r.data.tags["budget"])
            per_token = float(p[f"flops_{rule_name}"]) / float(p["tokens_trained"])
            step_flops = float(p["tokens_per_step"]) * per_token  # C under the step's own rule, to one step
            assert budget - step_flops <= float(p[f"flops_{rule_name}"]) <= budget
        if step == "kaplan":
            assert len({float(r.data.params["lr"]) for r in trained}) == 1
        else:
            assert len({float(r.data.params["lr"]) for r in trained}) >= 3  # lr per size
    # the grouped analysis: one row per step, fits.json with one entry per step, the figure, logged to MLflow
    fits = json.loads((store / "report" / "fits.json").read_text())
    assert fits["group_by"] == "protocol" and list(fits["protocol"]) == ["kaplan", "tuned"]
    assert [r["group"] for r in fits["rows"]] == ["kaplan", "tuned"]
    assert [r["own_convention"] for r in fits["rows"]] == ["kaplan", "total"]
    for r in fits["rows"]:
        assert not r["error"] and {"kaplan", "total", "exact"} <= set(r["conventions"])
        for conv in r["conventions"].values():
            assert conv["runs"] >= 6 and conv["budgets"] == 2 and math.isfinite(conv["approach3"]["a"])
            # tiny budgets put every minimum at the family's smallest size: no Approach 2, and the report says why
            assert conv["approach2"]["a"] is not None or "bracketed" in r["approach2_error"]
    assert fits["summary"].startswith("Change in a from the step before") and "tuned" in fits["summary"]
    assert (store / "report" / "nopt_by_protocol.png").exists()
    html = (store / "report" / "report.html").read_text()
    assert "Scaling-law analysis by protocol" in html and "data:image/png;base64" in html
    analyses = [r for r in _runs(store) if r.data.tags.get("scaling_lab.kind") == "analyze"]
    assert len(analyses) == 1 and analyses[0].data.tags["group_by"] == "protocol"
    assert "kaplan/kaplan/approach3/a" in analyses[0].data.metrics and "tuned/total/approach3/a" in \
        analyses[0].data.metrics
    assert "protocol step kaplan" in out and "A2 a (kaplan)" in out
    assert [x["step"] for x in fits["searches"]] == ["kaplan", "tuned"] and "tuned/search_wall_s" in \
        analyses[0].data.metrics
    # re-running reuses the finished studies: no new trial runs, no new trials
    n_trials = {n: len(optuna.load_study(study_name=n, storage=storage).trials) for n in names}
    assert main_ablation(_args({**args, "out": str(store / "report2")})) == 0
    again = [r for r in _runs(store) if r.data.tags.get("scaling_lab.kind") == "trial"]
    assert sorted(r.info.run_id for r in again) == sorted(r.info.run_id for r in trials)
    assert n_trials == {n: len(optuna.load_study(study_name=n, storage=storage).trials) for n in names}
    # a study trained with other options is refused, not mixed
    capsys.readouterr()
    assert main_ablation(_args({**args, "lr": "1e-3", "steps": "kaplan"})) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: parameter 'study_prefix'") and "other options" in err and err.count("\n") == 1


# --------------------------------------------------------------------------- the grouped analysis alone


def _two_protocols() -> sources.RunTable:
    """Two simulated studies in one table, tagged protocol a (the quick law) and b (another exponent)."""
    t1 = sources.simulate(seed=1)
    t2 = sources.simulate(seed=2, law={"E": 1.8, "A": 40.0, "B": 60.0, "alpha": 0.30, "beta": 0.32})
    runs = pd.concat([t1.runs.assign(protocol="first"), t2.runs.assign(protocol="second",
                                                                       run_id=t2.runs.run_id + "-b")])
    curves = {**t1.curves, **{k + "-b": v for k, v in t2.curves.items()}}
    return sources.RunTable(runs.reset_index(drop=True), curves, runs.reset_index(drop=True), {"source": "test"},
                            ("kaplan", "total"))


def test_grouped_analysis_rows_moves_and_sentence(tmp_path):
    cfg = analyze.AnalyzeConfig(source="simulate", bootstrap=50, group_by="protocol", log=False)
    table = _two_protocols()
    results, objects = grouped.analyze_groups(table, cfg, order=("second", "first"))
    assert results["groups"] == ["second", "first"] and [r["group"] for r in results["rows"]] == ["second", "first"]
    truth = {"first": 0.28 / (0.34 + 0.28), "second": 0.32 / (0.30 + 0.32)}
    for r in results["rows"]:
        a3 = r["conventions"]["total"]["approach3"]
        assert not r["error"] and a3["a"] == pytest.approx(truth[r["group"]], abs=0.04)
    mv = {m["approach"]: m for m in results["moves"]}
    assert mv["approach3"]["delta"] == pytest.approx(mv["approach3"]["a_to"] - mv["approach3"]["a_from"])
    lo, hi = mv["approach3"]["ci95"]
    assert lo < mv["approach3"]["delta"] < hi and mv["approach3"]["moved"] == (lo > 0 or hi < 0)
    assert "Approach 3" in results["summary"] and "first" in results["summary"]
    folder = grouped.write_report(results, objects, table, tmp_path / "rep")
    fits = json.loads((folder / "fits.json").read_text())
    assert list(fits["protocol"]) == ["second", "first"] and (folder / "nopt_by_protocol.svg").exists()
    only = grouped.analyze_groups(table, cfg, keep=("first",))[0]
    assert only["groups"] == ["first"] and len(only["rows"]) == 1
    with pytest.raises(ConfigError, match="group_by"):
        grouped.split(dataclasses.replace(table, runs=table.runs.assign(protocol="")), "protocol")
    assert np.isfinite(grouped.metrics_of(results)["first/total/approach2/a"])


def test_analyze_group_by_on_runs_without_the_tag_is_one_line(store, capsys):
    study = sources.simulate(seed=0)
    sources.log_study(study, "plain")
    capsys.readouterr()
    assert main_analyze(["--experiment", "plain", "--group_by", "protocol", "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: parameter 'group_by'") and err.count("\n") == 1
    assert main_analyze(["--source", "simulate", "--group_by", "steps"]) == 2
    assert "'' (none) or protocol" in capsys.readouterr().err


def test_a_later_steps_study_under_another_batch_rule_is_refused_before_any_step_trains(tiny_ablation, store, capsys):
    """The tuned step's study already holds a trial whose batch is not what the step's rule gives its size (as
    when batch_round or the rule changed): the ablation stops with one line naming study_prefix before the
    kaplan step trains anything."""
    rule = {"rule": {"lr_coef": 6e-3, "lr_exp": -0.5, "batch_coef": 32.0, "batch_exp": 0.0, "source": "test rule"}}
    (store / "rule.json").write_text(json.dumps(rule))
    args = {**tiny_ablation, "steps": "kaplan,tuned", "tuned_rule": str(store / "rule.json"), "pruner": "none",
            "analyze": "false"}
    tuned = ablation.step_configs(ablation.resolve_ablation(dict(args)))["tuned"]
    c = tuned.budget_list()[0]
    plan = isoflop.plan_budget(tuned, c)
    want = isoflop.trial_config(tuned, c, plan.lo).train
    study = optuna.create_study(study_name=isoflop.study_name(tuned, c), storage=tiny_ablation["storage"],
                                direction="minimize")
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.COMPLETE, value=4.0, params={"rung": plan.lo},
        distributions={"rung": optuna.distributions.IntDistribution(0, 30)},
        user_attrs={"n_embd": plan.widths[plan.lo], "batch_size": want.batch_size * 2, "lr": want.lr}))
    assert main_ablation(_args(args)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: parameter 'study_prefix'") and "batch_round" in err and err.count("\n") == 1
    names = {s.study_name for s in optuna.get_all_study_summaries(tiny_ablation["storage"])}
    assert names == {study.study_name} and not [r for r in _runs(store) if r.data.tags.get("scaling_lab.kind") == "trial"]
