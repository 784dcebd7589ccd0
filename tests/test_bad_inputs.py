"""Bad inputs through the real entry points (issue #17.7): each gives exit code 2, exactly one ``error:`` line on
stderr naming what is wrong, no traceback, and no run left RUNNING or FINISHED in the store.

The entry points run as the interpreter runs them: MLproject's ``mlproject/<entry>.py`` scripts (``runpy``, as
``python mlproject/main.py ...``) and the ``scaling-lab`` console script (``sys.exit(cli.main())``, what its
wrapper does), each in its own process forked from one driver process that imported the libraries once (a fresh
interpreter per case would spend ~6 s importing torch and mlflow). Two cases also start a fresh interpreter, to
show the driver changes nothing. Each case has its own folder, MLflow store and Optuna storage; the token cache
and calibrations are shared.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA_DIR, ROOT

DRIVER = r"""
import json, os, runpy, sys, traceback
import datasets, mlflow, optuna, tiktoken, torch  # noqa: F401  imported once, shared by every forked case
from scaling_lab import cli
for line in sys.stdin:
    case = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.chdir(case["cwd"])
        os.environ.update(case["env"])
        for fd, name in ((1, "stdout.txt"), (2, "stderr.txt")):
            f = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(f, fd)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        code = 0
        try:
            if case["script"] == "scaling-lab":  # what the console script's wrapper does
                sys.argv = ["scaling-lab", *case["argv"]]
                sys.exit(cli.main())
            sys.argv = [case["script"], *case["argv"]]
            runpy.run_path(case["script"], run_name="__main__")
        except SystemExit as exc:  # as the interpreter ends on SystemExit
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if not isinstance(exc.code, (int, type(None))):
                print(exc.code, file=sys.stderr)
        except BaseException:  # as the interpreter ends on an uncaught exception
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""

ENTRY = {e: str(ROOT / "mlproject" / f"{e}.py") for e in ("main", "search", "analyze", "doctor", "tune")}
WIKI = str(DATA_DIR)
TINY = ["--mode", "tiny", "--dataset", WIKI, "--train_split", "test", "--val_split", "validation"]
SEARCH = ["--mode", "tiny", "--dataset", WIKI, "--train_split", "test", "--val_split", "validation",
          "--budgets", "6e9,1.8e10"]
TUNE = ["--mode", "tiny", "--dataset", WIKI, "--train_split", "test", "--val_split", "validation"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """The driver process, the shared caches and the broken data sets."""
    root = tmp_path_factory.mktemp("bad-inputs")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(root / "hf-datasets"), "SCALING_LAB_CACHE": str(root / "token-cache")}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MLFLOW_RUN_ID", None)
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env=env, text=True, cwd=root)
    _write_data(root / "data")
    yield {"root": root, "proc": proc, "env": env}
    proc.stdin.close()
    proc.wait(timeout=60)


def _write_data(d: Path) -> None:
    """One folder per broken data set (a valid split beside the broken one), and analyze's CSVs."""
    valid = (DATA_DIR / "wiki.valid.raw").read_bytes()[:100_000]
    rng = np.random.default_rng(0)
    train = {
        "empty": ("train.txt", b""),
        "binary": ("train.txt", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()),
        "latin1": ("train.txt", "caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 50),
        "spaces": ("train.txt", b"  \n\n \t\n"),
        "gzbad": ("train.txt.gz", gzip.compress(b"ok text\nthen a bad byte \xff here\n")),
        "short": ("train.txt", b"hello world\n"),
        "jsonl": ("train.jsonl", b'{"body": "no text field here"}\n'),
        "jsonbroken": ("train.jsonl", b'{"text": "unterminated\n'),
        "csv": ("train.csv", b"title,body\nx,y\n"),
    }
    for name, (fname, raw) in train.items():
        (d / name).mkdir(parents=True)
        (d / name / fname).write_bytes(raw)
        (d / name / "valid.txt").write_bytes(valid)
    import pyarrow as pa
    import pyarrow.parquet as pq

    (d / "parquet").mkdir()
    pq.write_table(pa.table({"body": ["a", "b"]}), d / "parquet" / "train.parquet")
    (d / "parquet" / "valid.txt").write_bytes(valid)
    (d / "emptyval").mkdir()
    (d / "emptyval" / "train.txt").write_bytes(valid)
    (d / "emptyval" / "valid.txt").write_bytes(b"")
    (d / "nosplits").mkdir()
    (d / "nosplits" / "notes.txt").write_text("no split in this name\n")
    (d / "afile").write_text("a file where a folder is wanted\n")
    (d / "empty.csv").write_bytes(b"")
    (d / "header.csv").write_text("params,tokens,loss\n")
    (d / "binary.csv").write_bytes(rng.integers(0, 256, 2048, dtype=np.uint8).tobytes())
    # 2 budgets x 4 sizes x 2 seeds, loss falling with N at both: no minimum is bracketed, Approach 2 has nothing
    # to fit (the seeds give it its noise, so bracketing is what it misses)
    rows = ["params,flops,loss"] + [f"{n:.0f},{c:.0e},{3 + 1e3 / n + s:.4f}" for c in (1e12, 1e13)
                                    for n in (1e5, 2e5, 4e5, 8e5) for s in (0.0, 0.01)]
    (d / "unbracketed.csv").write_text("\n".join(rows) + "\n")


def D(name: str) -> str:
    return f"@data/{name}"  # replaced by the data folder


# (id, entry, argv, words the error line must contain, environment)
CASES = [
    # --- data files (main entry, a run would be tiny)
    ("empty-train", "main", ["--mode", "tiny", "--dataset", D("empty")], ["train.txt", "split 'train'", "is empty"], {}),
    ("binary-train", "main", ["--mode", "tiny", "--dataset", D("binary")], ["not text", "NUL byte", "'train'"], {}),
    ("latin1-train", "main", ["--mode", "tiny", "--dataset", D("latin1")],
     ["not valid utf-8", "0xe9", "byte offset 3", "encoding="], {}),
    ("whitespace-train", "main", ["--mode", "tiny", "--dataset", D("spaces")], ["no text"], {}),
    ("gzip-bad-byte", "main", ["--mode", "tiny", "--dataset", D("gzbad")], ["0xff", "decompressed"], {}),
    ("jsonl-no-text", "main", ["--mode", "tiny", "--dataset", D("jsonl")], ["no 'text' field", "body"], {}),
    ("jsonl-broken", "main", ["--mode", "tiny", "--dataset", D("jsonbroken")], ["not JSON lines"], {}),
    ("csv-no-text", "main", ["--mode", "tiny", "--dataset", D("csv")], ["no 'text' column", "title"], {}),
    ("parquet-no-text", "main", ["--mode", "tiny", "--dataset", D("parquet")], ["no 'text' column", "body"], {}),
    ("empty-validation", "main", ["--mode", "tiny", "--dataset", D("emptyval")],
     ["valid.txt", "split 'validation'", "empty"], {}),
    ("shorter-than-a-block", "main", ["--mode", "tiny", "--dataset", D("short")],
     ["fewer than block_size+2 = 66", "block_size"], {}),
    ("bad-encoding", "main", [*TINY, "--encoding", "klingon"], ["encoding", "codec"], {}),
    ("no-such-dataset", "main", ["--mode", "tiny", "--dataset", "/no/such/dir"], ["dataset", "/no/such/dir"], {}),
    ("no-split-files", "main", ["--mode", "tiny", "--dataset", D("nosplits")], ["dataset", "train*"], {}),
    ("missing-split", "main", ["--mode", "tiny", "--dataset", WIKI], ["train_split", "test, validation"], {}),
    # --- training parameters
    ("unknown-mode", "main", ["--mode", "huge"], ["mode", "huge"], {}),
    ("unknown-flag", "main", [*TINY, "--bogus", "1"], ["bogus"], {}),
    ("head-divides-width", "main", [*TINY, "--n_embd", "30", "--n_head", "4"], ["n_embd", "n_head=4"], {}),
    ("negative-tokens", "main", [*TINY, "--tokens", "-5"], ["tokens", "non-negative"], {}),
    ("lr-not-a-number", "main", [*TINY, "--lr", "abc"], ["lr", "a number"], {}),
    ("yes-not-a-bool", "main", [*TINY, "--yes", "maybe"], ["yes", "true or false"], {}),
    ("schedule", "main", [*TINY, "--schedule", "linear"], ["schedule", "cosine, wsd"], {}),
    ("cooldown-frac", "main", [*TINY, "--schedule", "wsd", "--cooldown_frac", "0"], ["cooldown_frac", "(0, 1]"], {}),
    ("no-such-device", "main", [*TINY, "--device", "tpu"], ["device", "tpu"], {}),
    ("tokens-1e30", "main", [*TINY, "--tokens", "1e30"], ["'yes'", "--yes", "more than a day"], {}),
    ("flops-1e30", "main", [*TINY, "--flops", "1e30"], ["'yes'", "--yes", "more than a day"], {}),
    ("checkpoint-dir-under-a-file", "main", [*TINY, "--checkpoint_dir", D("afile/ckpt")],
     ["checkpoint_dir", "afile/ckpt", "is a file"], {}),
    ("resume-path", "main", [*TINY, "--resume", "../../etc"], ["resume", "'../../etc'"], {}),
    ("resume-unknown-run", "main", [*TINY, "--resume", "0123abcd"], ["resume", "'0123abcd'", "last.pt"], {}),
    # --- search parameters (#14's options among them)
    ("search-budgets", "search", [*SEARCH, "--budgets", "abc"], ["budgets", "abc"], {}),
    ("search-anchors", "search", [*SEARCH, "--anchors", "bogus"], ["anchors", "kaplan"], {}),
    ("search-bracket", "search", [*SEARCH, "--bracket", "-1"], ["bracket", "non-negative"], {}),
    ("search-replicas", "search", [*SEARCH, "--replicas", "1.5"], ["replicas", "an integer"], {}),
    ("search-hparams-file", "search", [*SEARCH, "--hparams", "/no/such/rule.json"], ["hparams"], {}),
    ("search-hparams-tuned", "search", [*SEARCH, "--hparams", "tuned"], ["hparams", "no tuned rule"], {}),
    ("search-storage", "search", [*SEARCH, "--storage", "notaurl"], ["storage", "notaurl"], {}),
    ("search-empty-train", "search", ["--mode", "tiny", "--dataset", D("empty")], ["train.txt", "is empty"], {}),
    ("search-checkpoint-dir", "search", [*SEARCH, "--checkpoint_dir", D("afile")], ["checkpoint_dir", "is a file"],
     {}),
    ("search-over-a-day", "search", [*SEARCH, "--replicas", "100000"], ["'yes'", "a search", "--yes"], {}),
    # --- analyze
    ("csv-empty", "analyze", ["--csv", D("empty.csv"), "--log", "false"], ["csv", "empty.csv", "is empty"], {}),
    ("csv-header-only", "analyze", ["--csv", D("header.csv"), "--log", "false"],
     ["csv", "header only", "params, tokens, loss"], {}),
    ("csv-binary", "analyze", ["--csv", D("binary.csv"), "--log", "false"], ["csv", "binary.csv"], {}),
    ("csv-missing", "analyze", ["--csv", "/no/such.csv", "--log", "false"], ["csv", "/no/such.csv"], {}),
    ("csv-unbracketed", "analyze", ["--csv", D("unbracketed.csv"), "--log", "false", "--bootstrap", "20"],
     ["budgets", "bracketed minimum"], {}),
    ("analyze-convention", "analyze", ["--source", "simulate", "--convention", "bogus", "--log", "false"],
     ["convention", "bogus"], {}),
    ("analyze-bootstrap", "analyze", ["--source", "simulate", "--bootstrap", "-1", "--log", "false"],
     ["bootstrap"], {}),
    ("analyze-fit-workers", "analyze", ["--source", "simulate", "--fit_workers", "-2", "--log", "false"],
     ["fit_workers", "one per CPU core"], {}),
    # --- tune and doctor
    ("tune-mode", "tune", ["--mode", "huge"], ["mode", "huge"], {}),
    ("tune-budgets", "tune", [*TUNE, "--budgets", "abc"], ["budgets", "abc"], {}),
    ("tune-lr-range", "tune", [*TUNE, "--lr_min", "-1"], ["lr_min"], {}),
    ("tune-empty-train", "tune", ["--mode", "tiny", "--dataset", D("empty")], ["train.txt", "is empty"], {}),
    ("doctor-mode", "doctor", ["--mode", "huge"], ["mode", "huge"], {}),
    ("doctor-flag", "doctor", ["--bogus", "1"], ["bogus"], {}),
    # --- the scaling-lab console script
    ("console-unknown-command", "scaling-lab", ["bogus"], ["unknown command 'bogus'"], {}),
    ("console-train-mode", "scaling-lab", ["train", "--mode", "huge"], ["mode", "huge"], {}),
    ("console-analyze-empty-csv", "scaling-lab", ["analyze", "--csv", D("empty.csv"), "--log", "false"],
     ["csv", "is empty"], {}),
    # --- stores
    pytest.param("malformed-tracking-uri", "main", TINY, ["MLFLOW_TRACKING_URI"],
                 {"MLFLOW_TRACKING_URI": "notascheme://x"}, id="malformed-tracking-uri"),
]


def _resolve(value: str, lab) -> str:
    return value.replace("@data/", str(lab["root"] / "data") + "/")


def run_case(lab, case_id: str, entry: str, argv: list[str], env: dict[str, str],
             launched: str | None = None) -> tuple[int, str, Path]:
    """Run one entry point in its own folder and store (the driver forks it); (exit code, stderr, folder)."""
    cwd = lab["root"] / "cases" / case_id
    cwd.mkdir(parents=True, exist_ok=True)
    case_env = {"MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}", **env}
    if launched:
        case_env["MLFLOW_RUN_ID"] = launched
    script = entry if entry == "scaling-lab" else ENTRY[entry]
    argv = [_resolve(a, lab) for a in argv]
    if entry == "search" and "--storage" not in argv:
        argv += ["--storage", f"sqlite:///{cwd / 'optuna.db'}"]
    proc = lab["proc"]
    proc.stdin.write(json.dumps({"script": script, "argv": argv, "cwd": str(cwd), "env": case_env}) + "\n")
    proc.stdin.flush()
    rc = json.loads(proc.stdout.readline())["rc"]
    return rc, (cwd / "stderr.txt").read_text(), cwd


def runs_in(cwd: Path) -> list:
    """Every run of the case's store (none when the store was never created)."""
    if not (cwd / "mlflow.db").exists():
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def assert_one_clear_line(rc: int, err: str, words: list[str]) -> str:
    assert "Traceback" not in err, err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.mark.parametrize("case_id, entry, argv, words, env",
                         [c if hasattr(c, "marks") else pytest.param(*c, id=c[0]) for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_no_run(lab, case_id, entry, argv, words, env):
    rc, err, cwd = run_case(lab, case_id, entry, argv, env)
    assert_one_clear_line(rc, err, words)
    assert runs_in(cwd) == []  # every case fails before any run exists


def test_under_mlflow_run_the_launched_run_ends_failed_with_the_reason(lab):
    """As ``mlflow run`` does: a run exists (MLFLOW_RUN_ID) before the entry point starts; a bad data file ends
    it FAILED with the one-line reason, never RUNNING or FINISHED."""
    from mlflow.tracking import MlflowClient

    for entry, argv in (("main", ["--mode", "tiny", "--dataset", D("latin1")]),
                        ("search", ["--mode", "tiny", "--dataset", D("binary")])):
        cwd = lab["root"] / "cases" / f"launched-{entry}"
        cwd.mkdir(parents=True)
        client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
        run = client.create_run(client.create_experiment("scaling-lab"))
        rc, err, _ = run_case(lab, f"launched-{entry}", entry, argv, {}, launched=run.info.run_id)
        line = assert_one_clear_line(rc, err, ["'dataset'", "split 'train'"])
        got = client.get_run(run.info.run_id)
        assert got.info.status == "FAILED"
        assert len(got.data.tags["error"]) > 20 and line.removeprefix("error: ").startswith(got.data.tags["error"])
        assert [r.info.run_id for r in runs_in(cwd)] == [run.info.run_id]  # and no other run


@pytest.mark.parametrize("entry, argv, words", [
    ("main", ["--mode", "huge"], ["mode", "huge"]),
    ("analyze", ["--csv", "@data/header.csv", "--log", "false"], ["csv", "header only"]),
])
def test_a_fresh_interpreter_gives_the_same_line(lab, tmp_path, entry, argv, words):
    """The driver's forks behave as ``python mlproject/<entry>.py`` does."""
    env = {**lab["env"], "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    p = subprocess.run([sys.executable, ENTRY[entry], *[_resolve(a, lab) for a in argv]], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert_one_clear_line(p.returncode, p.stderr, words)
    assert runs_in(tmp_path) == []


def test_an_internal_error_keeps_its_traceback_and_exit_1():
    """Only user mistakes become one line: anything else (a bug) propagates from the one error path."""
    from scaling_lab import cli
    from scaling_lab.errors import ConfigError

    def mistake() -> None:
        raise ConfigError("lr", "abc", "a number")

    assert cli.guarded(None, lambda: 7) == (7, None)
    assert cli.guarded(None, mistake) == (None, 2)
    with pytest.raises(ZeroDivisionError):
        cli.guarded(None, lambda: 1 / 0)


def test_yes_is_a_bare_flag_and_lets_a_long_plan_start(lab):
    """``--yes`` alone means true (the one parser), ``-P yes=true`` the same; with it a plan over a day is not
    refused, without it the refusal names --yes; a dry run of such a plan says a real run needs it."""
    from scaling_lab import cli, config

    args = cli.parse(["--yes", "--tokens", "1e30"], config.field_names(), "", (config.RunConfig,))
    assert config.resolve({**args, "mode": "tiny"}).train.yes is True
    assert config.resolve({"mode": "tiny", "yes": "true"}).train.yes is True
    assert config.resolve({"mode": "tiny"}).train.yes is False
    cli.confirm_long_plan(2 * cli.DAY_S, "a run", yes=True)
    cli.confirm_long_plan(0.5 * cli.DAY_S, "a run", yes=False)
    with pytest.raises(config.ConfigError, match="--yes"):
        cli.confirm_long_plan(2 * cli.DAY_S, "a run", yes=False)
    rc, err, cwd = run_case(lab, "dry-run-over-a-day", "main", [*TINY, "--tokens", "1e30", "--dry_run"], {})
    out = (cwd / "stdout.txt").read_text()
    assert rc == 0 and "Traceback" not in err and cli.LONG_PLAN_NOTE in out
    assert runs_in(cwd) == []
