"""A short real training run on the offline WikiText-2 text, logged to a temporary SQLite store."""

import ast
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from scaling_lab import config, runtime, tracking
from scaling_lab.counting import make_plan
from scaling_lab.errors import NonFiniteLoss
from scaling_lab.model import GPT
from scaling_lab.train import MemoryLogger, evaluate, lr_at, setup, train


def test_lr_schedule_warmup_then_cosine_to_ten_percent():
    steps, peak = 100, 1e-3
    lrs = [lr_at(s, steps, peak, 0.1, 0.1) for s in range(steps)]
    assert lrs[0] == pytest.approx(peak / 10) and lrs[9] == pytest.approx(peak)
    assert lrs[-1] == pytest.approx(0.1 * peak)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_wsd_schedule_holds_the_peak_then_cools_down_over_the_last_fifth():
    """Hägele et al. 2024: warmup, the peak held, then 1 - sqrt(progress) over the last cooldown_frac of the steps
    to min_ratio * peak at the last step; with schedule_steps the cooldown ends there, as cosine's decay does."""
    steps, peak = 100, 1e-3
    lrs = [lr_at(s, steps, peak, 0.1, 0.1, schedule="wsd") for s in range(steps)]
    assert lrs[:10] == [lr_at(s, steps, peak, 0.1, 0.1) for s in range(10)]  # the same warmup as cosine
    start = 99 - 20  # cooldown_frac 0.2 of 100 steps
    assert all(v == peak for v in lrs[9 : start + 1])
    assert all(a > b for a, b in zip(lrs[start:], lrs[start + 1 :]))  # strictly falling through the cooldown
    assert lrs[-1] == pytest.approx(0.1 * peak)
    half = start + 10  # half-way: 1 - sqrt(0.5) of the way from the floor to the peak
    assert lrs[half] == pytest.approx(peak * (0.1 + 0.9 * (1 - 0.5**0.5)))
    short = [lr_at(s, 60, peak, 0.1, 0.1, 5, 100, "wsd", 0.5) for s in range(120)]
    assert short[:50] == [peak * (s + 1) / 5 for s in range(5)] + [peak] * 45 and short[99] == pytest.approx(0.1 * peak)
    assert short[110] == pytest.approx(0.1 * peak)  # past the horizon: the floor


def test_plan_from_flops_and_budget_too_small(tiny):
    cfg = config.resolve({**tiny, "flops": "5e10"})
    plan = make_plan(cfg)
    assert plan.counts["flops_total"] <= 5e10
    assert plan.steps == plan.tokens_trained // (cfg.train.batch_size * cfg.model.block_size)
    with pytest.raises(config.ConfigError, match="'flops'.*at least one optimizer step"):
        make_plan(config.resolve({**tiny, "flops": "1e6"}))


def test_real_run_logs_every_step_and_loss_falls(tiny, store):
    cfg = config.resolve({**tiny, "tokens": "61440"})  # 120 steps of 8 x 64 tokens
    with tracking.run(cfg.experiment, "test-run", system_metrics=False) as log:
        result = train(cfg, log, progress=False)
    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    hist = client.get_metric_history(result.run_id, "train/loss")
    steps = sorted(m.step for m in hist)
    assert steps == list(range(1, 121))  # one point per optimizer step, none subsampled or repeated
    for key in ("train/lr", "train/grad_norm", "progress/tokens_seen", "progress/flops_seen", "perf/step_time_ms",
                "perf/tokens_per_s"):
        assert len(client.get_metric_history(result.run_id, key)) == 120
    losses = [m.value for m in sorted(hist, key=lambda m: m.step)]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.5
    val = client.get_metric_history(result.run_id, "val/loss")
    assert len(val) == 10 and sorted(v.step for v in val)[-1] == 120
    p = run.data.params
    assert int(p["steps"]) == 120 and int(p["tokens_trained"]) == 61440
    assert int(p["n_embd"]) == 32 and p["mode"] == "tiny" and not any(k.startswith("resolved.") for k in p)
    assert "" not in p.values() and p["cache_dir"] and p["dry_run"] == "false"  # every field once, none ''
    assert float(p["flops_total"]) == pytest.approx(6 * int(p["n_params_total"]) * 61440)
    # val/bpb is the same loss measured per byte
    bpb = run.data.metrics["final/val_bpb"]
    assert run.data.metrics["final/val_loss"] == pytest.approx(result.val_loss)
    assert bpb == pytest.approx(result.val_loss / math.log(2), rel=0.05)  # 256-rank vocab: ~1 byte per token
    # the final loss is well below the unigram entropy of the data (the model learned context)
    assert result.val_loss < float(run.data.params["data.unigram_entropy"])
    # the train and validation text as dataset inputs (the UI's Dataset column), content hash as digest
    inputs = {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "validation"}
    assert inputs["train"].name.endswith("/test") and inputs["validation"].name.endswith("/validation")
    assert len(inputs["train"].digest) == 16 and inputs["train"].digest != inputs["validation"].digest
    assert float(p["epochs"]) == pytest.approx(61440 / int(p["data.train_tokens"]), rel=1e-3)
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    tags = run.data.tags
    assert tags["mode"] == "tiny" and tags["device"] == "cpu"
    # MLflow's standard tags (runs come from mlflow.start_run); the commit from the package when MLflow found none
    assert tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"]
    assert len(tags["mlflow.source.git.commit"]) == 40 and "git_commit" not in tags
    arts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.json", "loss_curve.png"} <= arts


def test_non_finite_loss_fails_the_run_with_reason(tiny, store):
    cfg = config.resolve({**tiny, "lr": "1e12", "grad_clip": "0", "warmup_frac": "0"})
    with pytest.raises(NonFiniteLoss):
        with tracking.run(cfg.experiment, "nan-run", system_metrics=False) as log:
            train(cfg, log, progress=False)
    run = MlflowClient().get_run(log.run_id)
    assert run.info.status == "FAILED"
    assert "NonFiniteLoss" in run.data.tags["error"]


def test_memory_logger_run_matches_plan(tiny):
    cfg = config.resolve(tiny)
    log = MemoryLogger()
    result = train(cfg, log, progress=False)
    plan = make_plan(cfg)
    assert result.steps == plan.steps == len(log.history("train/loss"))
    assert log.params["n_params_total"] == plan.counts["n_params_total"]


# --------------------------------------------------------------------------- threads (issue 16.4)

ROOT = Path(__file__).resolve().parents[1]


def _env_without_thread_settings(store) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    return env | {"MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}", "PYTHONPATH": str(ROOT / "src")}


def test_a_training_process_sets_a_passive_wait_policy_and_one_thread_per_physical_core(tiny, store):
    """The main entry point, started without OMP_* settings: its run logs the policy it trained under (set before
    torch loaded) and torch's thread count, the physical cores this process may use."""
    cmd = [sys.executable, str(ROOT / "mlproject" / "main.py"), *[x for k, v in tiny.items() for x in (f"--{k}", v)],
           "--experiment", "threads", "--tokens", "5120"]
    done = subprocess.run(cmd, cwd=store, env=_env_without_thread_settings(store), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = [r for e in MlflowClient().search_experiments() for r in MlflowClient().search_runs([e.experiment_id])]
    assert run.data.params["runtime.omp_wait_policy"] == "PASSIVE"
    assert int(run.data.params["runtime.num_threads"]) == runtime.physical_cores() >= 1


def test_user_thread_settings_win_and_workers_share_the_cores(store):
    """OMP_WAIT_POLICY and OMP_NUM_THREADS the user set are kept; without them N workers get cores // N each."""
    code = ("import scaling_lab.runtime as r; r.configure_threads(); print(r.thread_params()); "
            "import os; os.environ.pop('OMP_NUM_THREADS'); r.configure_threads(2); print(r.thread_params())")
    env = _env_without_thread_settings(store) | {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    user, shared = (ast.literal_eval(line) for line in done.stdout.split("\n")[:2])
    assert user == {"runtime.omp_wait_policy": "ACTIVE", "runtime.num_threads": 1}
    assert shared["runtime.num_threads"] == max(1, runtime.physical_cores() // 2)
    assert runtime.physical_cores({0}) == 1


# --------------------------------------------------------------------------- less overhead, same numbers (16.2)


def reference_losses(cfg: config.RunConfig, steps: int) -> list[float]:
    """The loop as it was before issue 16: AdamW foreach, clip_grad_norm_'s per-tensor norms, a float() per step;
    same seed, same init, same batches (a pure function of seed, step and micro index)."""
    s = setup(cfg, MemoryLogger())  # its data and micro-batching; the model below is built afresh
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), s.model.parameters()))  # same init
    tc = cfg.train
    opt = torch.optim.AdamW(model.param_groups(tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2), foreach=True)
    out = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, s.plan.steps, tc.lr, tc.warmup_frac, tc.min_lr_ratio)
        total = 0.0
        for k in range(s.accum):
            x, y = s.batches.get(step, k, s.micro)
            _, loss = model(x, y)
            (loss / s.accum).backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(total / s.accum)
    return out


@pytest.mark.parametrize("extra", [{}, {"micro_batch": "2", "grad_clip": "0.05"}])
def test_same_seed_same_per_step_losses_as_the_plain_loop(tiny, extra):
    """Losses read back in logging batches, foreach clipping in one pass: the per-step losses of the plain loop,
    with gradient accumulation and with clipping active at every step."""
    cfg = config.resolve({**tiny, "tokens": "40960", **extra})  # 80 steps
    log = MemoryLogger()
    result = train(cfg, log, progress=False)
    ref = reference_losses(cfg, result.steps)
    assert result.steps == 80 and len(result.history) == 80
    assert [v for _, v in log.history("train/loss")] == result.history
    assert max(abs(a - b) for a, b in zip(result.history, ref)) <= 1e-6
    if extra:
        assert all(v > 0.05 for _, v in log.history("train/grad_norm"))  # the clip acted at every step


def test_validation_passes_hold_eval_pass_tokens_and_score_the_same(tiny):
    """Validation runs EVAL_PASS_TOKENS tokens (or the training micro-batch, when larger) per forward pass; the
    mean loss is the one sequence-by-sequence passes give, up to float rounding of batched matmuls."""
    cfg = config.resolve({**tiny, "tokens": "20480", "micro_batch": "2"})
    s = setup(cfg, MemoryLogger())
    assert s.micro == 2 and s.eval_micro == runtime.EVAL_PASS_TOKENS // cfg.model.block_size > s.micro
    assert runtime.eval_micro_batch(8, 1024) == 8 and runtime.eval_micro_batch(3, 4096) == 3
    with torch.no_grad():
        one_by_one = sum(s.model(s.val_x[i : i + 1], s.val_y[i : i + 1])[1].item() for i in range(len(s.val_x)))
    assert abs(evaluate(s) - one_by_one / len(s.val_x)) < 1e-5


def test_auto_precision_on_a_cpu_is_bf16_only_where_the_cpu_has_native_bf16(monkeypatch):
    """dtype=auto on a CPU: bf16 with AVX-512 BF16 or AMX, fp32 elsewhere (emulated bf16 was 14x slower on an AVX2
    host); an explicit bf16 or fp32 is kept; the answer reflects this machine's probe."""
    cpu = torch.device("cpu")
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert runtime.cpu_bf16_native() == native
    assert runtime.pick_dtype("auto", cpu) == (torch.bfloat16 if native else torch.float32)
    for value in (True, False):
        monkeypatch.setattr(runtime, "cpu_bf16_native", lambda v=value: v)
        assert runtime.pick_dtype("auto", cpu) == (torch.bfloat16 if value else torch.float32)
        assert runtime.pick_dtype("bf16", cpu) == torch.bfloat16
        assert runtime.pick_dtype("fp32", cpu) == torch.float32
