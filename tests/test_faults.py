"""Fault injection (issue 16): hostile folders, corrupted files of each kind, torn records, kills,
concurrency, disk full and bad input. Each test names the item of the issue it guards."""

from __future__ import annotations

import json
import math
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from elasticmoe import cli
from elasticmoe.checkpoint import (
    MARKER,
    AtomicFolder,
    CheckpointError,
    atomic_write_text,
    read_marker,
    verify_manifest,
    write_json,
)
from elasticmoe.config import ConfigError
from elasticmoe.jsonl import append_record, read_records
from elasticmoe.ledger import Ledger, sum_work
from elasticmoe.metrics import _truncate_metrics, read_metrics
from elasticmoe.runfolder import check_separate, claim, lock
from elasticmoe.trainstate import find_checkpoint, recipe_fingerprint

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_cli(*args, cwd=None, env=None, timeout=900):
    return subprocess.run(
        [sys.executable, "-m", "elasticmoe", *map(str, args)],
        capture_output=True,
        text=True,
        env=env or ENV,
        cwd=cwd,
        timeout=timeout,
    )


def one_line(code: int, err: str) -> bool:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    return code == 2 and "Traceback" not in err and len(lines) == 1 and "error:" in lines[0]


def in_process(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr().err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- item 1: ownership that cannot be fooled -------------------------------------------------------
def test_train_refuses_a_users_project_folder_and_leaves_it_untouched(tmp_path, capsys):
    proj = tmp_path / "myproj"
    (proj / "data").mkdir(parents=True)
    (proj / "data" / "results.csv").write_text("a,b\n1,2\n")
    (proj / "metrics.jsonl").write_text('{"mine": 1}\n')
    before = snapshot(proj)
    code, err = in_process(capsys, "train", "--config", "micro", "--out", proj, "--quiet")
    assert one_line(code, err) and "not an elasticmoe run folder" in err
    assert snapshot(proj) == before


def test_outputs_never_go_inside_inputs(tmp_path, capsys):
    docs = tmp_path / "proj2" / "data"
    docs.mkdir(parents=True)
    for i in range(3):
        (docs / f"doc{i}.txt").write_text(f"document {i} " * 50)
    before = snapshot(tmp_path / "proj2")
    for out in (tmp_path / "proj2", docs / "run", tmp_path / "elsewhere"):
        spec = str(docs) if out != tmp_path / "elsewhere" else str(out / "x.txt")
        code, err = in_process(
            capsys,
            "train",
            "--config",
            "micro",
            "--set",
            "data.source=files",
            "--set",
            f"data.paths=['{spec}']",
            "--out",
            out,
            "--quiet",
        )
        assert one_line(code, err) and "input" in err, err
    assert snapshot(tmp_path / "proj2") == before
    assert not (docs / "run").exists() and not (tmp_path / "elsewhere").exists()
    with pytest.raises(ConfigError, match="inside"):
        check_separate(tmp_path / "a" / "b", [str(tmp_path / "a" / "*.txt")])


def test_a_manifest_alone_does_not_make_a_folder_ours(tmp_path):
    webapp = tmp_path / "webapp"
    webapp.mkdir()
    (webapp / "manifest.json").write_text('{"name": "my app", "files": {}}')
    (webapp / "index.html").write_text("<html></html>")
    before = snapshot(webapp)
    with pytest.raises(CheckpointError, match="not a folder elasticmoe wrote"):
        with AtomicFolder(webapp, "hf-export") as tmp:
            (tmp / "config.json").write_text("{}")
    assert snapshot(webapp) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".webapp")]  # no temporary left


def test_a_folder_is_replaced_only_by_one_of_its_kind_and_never_written_into(tmp_path):
    run = tmp_path / "run"
    claim(run)
    with AtomicFolder(run / "parent", "elastic-parent") as tmp:
        (tmp / "model.safetensors").write_bytes(b"parent")
    with AtomicFolder(run / "checkpoints" / "step-000195", "checkpoint") as tmp:
        (tmp / "train_state.json").write_text("{}")
    assert read_marker(run / "parent")["run"] == read_marker(run)["id"]  # the run's identity travels with it
    before = snapshot(run)
    for path, kind in [
        (run / "parent", "child"),  # extract RUN --out RUN/parent
        (run / "checkpoints" / "step-000195", "folder"),  # export CKPT --out RUN/checkpoints/step-N
        (run / "parent" / "sub", "child"),  # inside a model folder
        (run, "child"),  # the run folder itself
    ]:
        with pytest.raises(CheckpointError, match="refusing"):
            with AtomicFolder(path, kind) as tmp:
                (tmp / "x").write_text("new")
    assert snapshot(run) == before
    with AtomicFolder(run / "parent", "elastic-parent") as tmp:  # the same kind, the same run: replaced
        (tmp / "model.safetensors").write_bytes(b"parent v2")
    assert (run / "parent" / "model.safetensors").read_bytes() == b"parent v2"


def test_published_files_and_folders_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with AtomicFolder(tmp_path / "out", "folder") as tmp:
            (tmp / "a.txt").write_text("x")
        atomic_write_text(tmp_path / "b.json", "{}")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "out") == 0o755
    for f in (tmp_path / "out" / "a.txt", tmp_path / "out" / "manifest.json", tmp_path / "out" / MARKER):
        assert mode(f) == 0o644, f
    assert mode(tmp_path / "b.json") == 0o644


# -- item 10: temporaries left by kills are cleaned up ---------------------------------------------
def test_stale_temporaries_of_killed_writers_are_removed(tmp_path):
    pid = dead_pid()
    stale_dir = tmp_path / f".parent.tmp-{pid}-0123abcd"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"half")
    stale_file = tmp_path / f".x.json.{pid}-0123abcd.tmp"
    stale_file.write_text("half")
    legacy = tmp_path / ".parent.tmpabcd1234"
    legacy.mkdir()
    os.utime(legacy, (time.time() - 3600, time.time() - 3600))
    live = tmp_path / f".parent.tmp-{os.getpid()}-0123abcd"  # a live writer's: kept
    live.mkdir()
    with AtomicFolder(tmp_path / "parent", "elastic-parent") as tmp:
        (tmp / "w").write_text("ok")
    atomic_write_text(tmp_path / "x.json", "{}")
    assert not stale_dir.exists() and not stale_file.exists() and not legacy.exists()
    assert live.exists()


def test_locking_a_run_removes_what_killed_runs_left(tmp_path):
    run = tmp_path / "run"
    claim(run)
    pid = dead_pid()
    (run / "checkpoints" / ".step-000010.tmp-1-00000000").mkdir(parents=True)
    (run / f".recipe.yaml.{pid}-00000000.tmp").write_text("half")
    with lock(run):
        pass
    assert not list((run / "checkpoints").iterdir())
    assert not (run / f".recipe.yaml.{pid}-00000000.tmp").exists()


# -- item 3: resume never silently restarts ---------------------------------------------------------
def _checkpoint(run: Path, step: int, recipe_sha: str | None = None) -> Path:
    path = run / "checkpoints" / f"step-{step:06d}"
    import torch

    from elasticmoe.checkpoint import save_tensors

    state = {"step": step, "bad_in_row": 0, "tokens_seen": 0, "data": {}, "recipe_sha256": recipe_sha}
    with AtomicFolder(path, "checkpoint") as tmp:
        save_tensors({"w": torch.zeros(16)}, tmp / "model.safetensors")
        write_json(tmp / "train_state.json", state)
    return path


def test_resume_refuses_when_no_checkpoint_verifies_and_names_each(tmp_path):
    run = tmp_path / "run"
    a, b = _checkpoint(run, 100), _checkpoint(run, 200)
    (a / "model.safetensors").write_bytes(b"x" * 64)  # a flipped byte
    (b / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="refusing to restart from step 0") as err:
        find_checkpoint(run)
    assert "step-000100" in str(err.value) and "step-000200" in str(err.value)
    assert find_checkpoint(tmp_path / "fresh") is None  # a run that never checkpointed starts at 0


def test_corrupted_newer_checkpoints_are_moved_aside_so_steps_order_among_valid_ones(tmp_path):
    run = tmp_path / "run"
    good, bad = _checkpoint(run, 100), _checkpoint(run, 300)
    (bad / "model.safetensors").write_bytes(b"y" * 64)
    assert find_checkpoint(run) == good
    assert not bad.exists() and (run / "checkpoints" / "corrupted" / "step-000300").is_dir()


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda f: write_json(f / "manifest.json", {"files": {}}), "lists no files"),
        (lambda f: write_json(f / "manifest.json", ["model.safetensors"]), "must be an object"),
        (lambda f: (f / "extra.bin").write_bytes(b"?"), "does not list"),
        (lambda f: (f / "manifest.json").write_bytes(b"\xff\xfe"), "not valid JSON"),
    ],
)
def test_a_manifest_must_be_well_formed_and_list_every_file(tmp_path, damage, needle):
    folder = _checkpoint(tmp_path, 1)
    damage(folder)
    with pytest.raises(CheckpointError, match=needle):
        verify_manifest(folder)


def test_resume_refuses_a_recipe_that_changed_under_its_checkpoints(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("train:\n  lr: 0.0057\n")
    _checkpoint(run, 100, recipe_fingerprint(run))
    assert find_checkpoint(run).name == "step-000100"
    (run / "recipe.yaml").write_text("train:\n  lr: 0.028\n")
    with pytest.raises(ConfigError, match="not the recipe step-000100 was trained with"):
        find_checkpoint(run)


@pytest.mark.slow
def test_a_new_run_replaces_the_recipe_a_failed_attempt_left(tmp_path):
    run = tmp_path / "run"
    claim(run)
    (run / "recipe.yaml").write_text("stale: true\n")  # an attempt that died before its first checkpoint
    res = run_cli(
        "train", "--config", "micro", "--set", "train.steps=2", "--set", "train.lr=0.028", "--out", run, "--quiet"
    )
    assert res.returncode == 0, res.stderr[-2000:]
    from elasticmoe.recipe import load_recipe

    assert load_recipe(run / "recipe.yaml").train.lr == 0.028


@pytest.mark.slow
def test_ledger_totals_after_kills_equal_an_uninterrupted_runs(tmp_path):
    """kill -9 twice at random steps, resume each time: tokens and FLOPs of training and of its
    periodic evaluations equal those of an uninterrupted run exactly (redone segments and
    re-measured evaluations are counted once, by their keys)."""
    import random

    sets = ["train.steps=16", "train.ckpt_every=4", "train.eval_every=4"]
    args = ["--config", "micro", *[a for s in sets for a in ("--set", s)], "--quiet"]
    assert run_cli("train", *args, "--out", tmp_path / "ref").returncode == 0
    run, rng = tmp_path / "killed", random.Random(os.getpid())
    for kill_at in sorted(rng.sample(range(2, 15), 2)):
        resume = ["--resume"] if (run / "checkpoints").exists() else []
        cmd = [sys.executable, "-m", "elasticmoe", "train", *args, "--out", str(run), *resume]
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
            if max(steps, default=0) >= kill_at:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    resume = ["--resume"] if (run / "checkpoints").exists() else []
    res = run_cli("train", *args, "--out", run, *resume)
    assert res.returncode == 0, res.stderr[-2000:]
    for phase in ("train", "train-eval"):
        want, got = Ledger(tmp_path / "ref" / "ledger.jsonl").totals(phase), Ledger(run / "ledger.jsonl").totals(phase)
        assert (got["tokens"], got["flops"]) == (want["tokens"], want["flops"]), phase


# -- items 4 and 5: append-only records that survive torn writes and add up exactly -----------------
def test_a_torn_metrics_line_neither_breaks_resume_nor_the_next_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for step in (1, 2, 3):
        append_record(path, {"step": step})
    with open(path, "ab") as f:
        f.write(b'{"step": 4, "lo')  # killed mid-write
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    append_record(path, {"step": 4})
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]
    _truncate_metrics(path, 2)
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert read_records(path)[1] == []


def test_damaged_ledger_lines_are_reported_not_dropped(tmp_path):
    led = Ledger(tmp_path / "ledger.jsonl")
    led.append({"event": "end", "phase": "search", "tokens": 10, "flops": 5})
    with open(led.path, "ab") as f:
        f.write(b'{"event": "end", "phase": "search", "tok\xff\n[1, 2]\n')
    led.append({"event": "end", "phase": "search", "tokens": "many", "flops": 1})
    led.append({"event": "end", "phase": "search", "tokens": 1, "flops": 1})
    assert sum_work(led.records(), phase="search")["tokens"] == 11
    problems = led.problems()
    assert len(problems) == 3 and problems[0].startswith("line 2") and "not an object" in problems[1]


def test_every_unit_of_work_is_counted_once(tmp_path):
    led = Ledger(tmp_path / "ledger.jsonl")
    seg = {"event": "progress", "phase": "train", "run": ".", "steps": [0, 50], "tokens": 100, "flops": 7}
    led.append({**seg, "attempt": "a1"})
    led.append({**seg, "attempt": "a2"})  # the same segment trained again after a resume
    final_eval = {"event": "end", "status": "ok", "phase": "train-eval", "run": ".", "step": 50, "tokens": 3}
    led.append({**final_eval, "attempt": "a1"})
    led.append({**final_eval, "attempt": "a3"})  # a resumed finished run measures its closing evaluation again
    assert led.totals("train")["tokens"] == 100 and led.totals("train-eval")["tokens"] == 3
    later = {**seg, "steps": [50, 100], "attempt": "a2"}
    assert led.append_once(later) and not led.append_once(later)  # a resume re-recording a checkpoint's segment
    assert led.totals("train")["tokens"] == 200


# -- item 6: a run-folder lock ------------------------------------------------------------------------
def test_a_second_writer_gets_one_line_and_exit_2(tmp_path, capsys):
    run = tmp_path / "run"
    claim(run)
    (run / "recipe.yaml").write_text("{}\n")
    with lock(run, "train"):
        with lock(run):  # reentrant in one process (the pipeline calls stages that lock)
            pass
        res = run_cli("train", "--config", "micro", "--out", run, "--resume", "--quiet")
        assert one_line(res.returncode, res.stderr) and "in use by another elasticmoe command" in res.stderr
        assert f"pid {os.getpid()}" in res.stderr
    with lock(run):  # released: the next writer gets it
        pass


def test_a_lock_dies_with_its_holder(tmp_path):
    run = tmp_path / "run"
    claim(run)
    code = f"from elasticmoe.runfolder import lock\nwith lock({str(run)!r}):\n    print('held', flush=True)\n"
    code += "    import time; time.sleep(60)\n"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(ConfigError, match="in use"):
        with lock(run):
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with lock(run):
        pass


# -- item 7: import-hf holes -----------------------------------------------------------------------------
@pytest.fixture
def hf_folder(tmp_path, tiny_config):
    import torch

    from elasticmoe.hf import export_hf
    from elasticmoe.model import ElasticMoE

    torch.manual_seed(0)
    export_hf(ElasticMoE(tiny_config), tmp_path / "hf")
    return tmp_path / "hf"


def test_import_refuses_symlinks_leaving_the_folder(hf_folder, tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    (hf_folder / "tokenizer.json").symlink_to(secret)
    code, err = in_process(capsys, "import-hf", hf_folder, "--out", tmp_path / "imported")
    assert one_line(code, err) and "symbolic links" in err
    assert not (tmp_path / "imported").exists()


def test_import_refuses_non_finite_weights(hf_folder):
    from safetensors.torch import load_file, save_file

    from elasticmoe.hf import HFError
    from elasticmoe.hf_import import import_hf

    tensors = load_file(str(hf_folder / "model.safetensors"))
    key = next(k for k in tensors if "experts" in k or "mlp" in k)
    tensors[key][0].view(-1)[0] = float("nan")
    save_file(tensors, str(hf_folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFError, match="NaN or infinite"):
        import_hf(hf_folder)


def test_import_refuses_a_config_bigger_than_its_weights_before_allocating(hf_folder):
    from elasticmoe.hf import HFError
    from elasticmoe.hf_import import import_hf

    cfg = json.loads((hf_folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 10_000_000
    (hf_folder / "config.json").write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    with pytest.raises(HFError, match="does not describe these weights"):
        import_hf(hf_folder)
    assert time.perf_counter() - t0 < 5


def test_imported_paths_do_not_depend_on_the_working_directory(hf_folder, tmp_path, capsys):
    from tokenizers import Tokenizer, models

    from elasticmoe.recipe import load_recipe

    Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a")).save(str(hf_folder / "tokenizer.json"))
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        code, err = in_process(capsys, "import-hf", "hf", "--out", "imported")
    finally:
        os.chdir(old)
    assert code == 0, err
    recipe = load_recipe(tmp_path / "imported" / "recipe.yaml")
    tok = Path(recipe.data.tokenizer)
    assert tok.is_absolute() and tok.is_relative_to((tmp_path / "imported").resolve()) and tok.is_file()
    code, err = in_process(capsys, "import-hf", hf_folder, "--out", tmp_path / "imported")
    assert one_line(code, err)  # never onto an existing import


def test_import_never_writes_onto_a_users_folder(hf_folder, tmp_path, capsys):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "recipe.yaml").write_text("mine: true\n")
    code, err = in_process(capsys, "import-hf", hf_folder, "--out", proj)
    assert one_line(code, err)
    assert snapshot(proj) == {"recipe.yaml": b"mine: true\n"}


# -- item 8: every bad input gives one line and exit 2, and leaves nothing behind --------------------------
def _bad_inputs(tmp: Path) -> list[tuple[str, list[str], str]]:
    """(label, argv, what the one error line must name)."""
    binary = tmp / "binary.yaml"
    binary.write_bytes(bytes(range(256)))
    latin = tmp / "latin.yaml"
    latin.write_bytes("train:\n  steps: 5 # caf\xe9\n".encode("latin-1"))
    bad_jsonl = tmp / "docs.jsonl"
    bad_jsonl.write_bytes(b'{"text": "caf\xe9 ' + b"x" * 100 + b'"}\n')
    listing = tmp / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    a_dir = tmp / "a_dir"
    a_dir.mkdir()
    users = tmp / "users"
    users.mkdir()
    (users / "README.md").write_text("my notes\n")
    out = str(tmp / "out")
    sets = [
        "distill.temperature=abc",
        "distill.temperature=0",
        "distill.kd_weight=nan",
        "train.seed=-1",
        "train.lr=.inf",
        "train.lr=0",
        "train.beta1=2",
        "train.beta2=-0.1",
        "train.steps=true",
        "train.steps=0",
        "train.batch_size=1.5",
        "train.grad_clip=0",
        "train.min_lr_ratio=2",
        "train.weight_decay=-1",
        "train.device=tpu",
        "train.init_from=[1]",
        "reorder.at_steps=5",
        "reorder.at_steps=[0]",
        "reorder.batches=0",
        "reorder.neurons=maybe",
        "data.scale=0",
        "data.seq_len=100000",
        "data.task_weights={kv: -1}",
        "data.loss_on=prompts",
        "sampling.n_random=-1",
        "sampling.full_fraction=1.5",
        "sampling.target_weights=[nan]",
        "sampling.phases={full: .nan}",
        "model.rope_theta=.inf",
        "model.norm_eps=.nan",
        "model.layers=0",
    ]
    cases = [
        (
            f"--set {s}",
            ["train", "--config", "micro", "--set", s, "--out", out, "--quiet"],
            s.split("=")[0].split(".")[-1],
        )
        for s in sets
    ]
    files = ["--set", "data.source=files", "--set", f"data.paths=['{bad_jsonl}']", "--out", out, "--quiet"]
    cases += [
        ("info --rows 0", ["info", "--config", "micro", "--rows", "0"], "--rows"),
        ("binary config", ["train", "--config", str(binary), "--out", out], "UTF-8"),
        ("non-UTF-8 recipe", ["info", "--config", str(latin)], "UTF-8"),
        ("config is a list", ["info", "--config", str(listing)], "mapping"),
        ("non-UTF-8 .jsonl", ["train", "--config", "micro", *files], "UTF-8"),
        ("finetune --temperature 0", ["finetune", a_dir, "--steps", "1", "--temperature", "0", "--out", out], "--temp"),
        ("finetune --kd-weight nan", ["finetune", a_dir, "--steps", "1", "--kd-weight", "nan", "--out", out], "--kd"),
        ("finetune --lr -1", ["finetune", a_dir, "--steps", "1", "--lr", "-1", "--out", out], "--lr"),
        ("finetune --steps 0", ["finetune", a_dir, "--steps", "0", "--out", out], "--steps"),
        ("eval --out DIR", ["eval", a_dir, "--out", a_dir], "--out"),
        ("eval --device tpu", ["eval", a_dir, "--device", "tpu"], "--device"),
        ("eval --examples 0", ["eval", a_dir, "--examples", "0"], "--examples"),
        (
            "run --finetune-fraction -1",
            ["run", "--config", "micro", "--finetune-fraction", "-1", "--out", out],
            "--fin",
        ),
        (
            "run --finetune-fraction nan",
            ["run", "--config", "micro", "--finetune-fraction", "nan", "--out", out],
            "--fin",
        ),
        ("search --windows 0", ["search", a_dir, "--windows", "0"], "--windows"),
        ("search --device tpu", ["search", a_dir, "--device", "tpu"], "--device"),
        ("report on a non-run", ["report", a_dir], "run folder"),
        ("lm-eval-tasks onto a user folder", ["lm-eval-tasks", a_dir, "--out", users], "elasticmoe did not write"),
        ("extract without a parent", ["extract", a_dir, "--subnet", "L1", "--out", out], "run folder"),
        ("train --resume on nothing", ["train", "--out", out, "--resume"], "run folder"),
    ]
    return [(label, [str(a) for a in argv], needle) for label, argv, needle in cases]


def test_bad_inputs_give_one_line_exit_2_and_leave_nothing(tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    cases = _bad_inputs(inputs)
    failures = []
    for label, argv, needle in cases:
        before = sorted(p.name for p in tmp_path.rglob("*"))
        code, err = in_process(capsys, *argv)
        after = sorted(p.name for p in tmp_path.rglob("*"))
        if not one_line(code, err) or needle not in err or after != before:
            failures.append(
                f"{label}: exit {code}, {err.strip()[-300:]!r}, new files {sorted(set(after) - set(before))}"
            )
    print(f"bad inputs with one line, exit 2 and nothing left behind: {len(cases) - len(failures)} of {len(cases)}")
    assert not failures, "\n".join(failures)


def test_disk_full_is_one_line_not_a_traceback(capsys, monkeypatch):
    import errno

    def full(args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "run/checkpoints/step-000010")

    monkeypatch.setattr(cli, "cmd_info", full)
    code, err = in_process(capsys, "info", "--config", "micro")
    assert code == 1 and "No space left on device" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_a_write_that_fails_for_lack_of_space_leaves_the_previous_version(tmp_path, monkeypatch):
    import errno

    import elasticmoe.checkpoint as ck

    atomic_write_text(tmp_path / "recipe.yaml", "old\n")
    with AtomicFolder(tmp_path / "parent", "elastic-parent") as tmp:
        (tmp / "w").write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ck.os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(tmp_path / "recipe.yaml", "new\n")
    with pytest.raises(OSError, match="No space"):
        with AtomicFolder(tmp_path / "parent", "elastic-parent") as tmp:
            (tmp / "w").write_text("new")
    monkeypatch.undo()
    assert (tmp_path / "recipe.yaml").read_text() == "old\n" and (tmp_path / "parent" / "w").read_text() == "old"
    verify_manifest(tmp_path / "parent")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parent", "recipe.yaml"]  # no temporary left


# -- item 9: torchrun watchdog ---------------------------------------------------------------------------
def test_collective_timeout_is_configurable_and_validated(monkeypatch):
    from elasticmoe import dist as distmod

    monkeypatch.setenv(distmod.COLLECTIVE_TIMEOUT_ENV, "7")
    assert distmod.collective_timeout().total_seconds() == 7
    assert "waited more than 7 s" in distmod.describe_failure(RuntimeError("[gloo] Timed out waiting 7000ms"))
    assert distmod.describe_failure(RuntimeError("shape mismatch")) is None
    monkeypatch.setenv(distmod.COLLECTIVE_TIMEOUT_ENV, "0")
    with pytest.raises(ConfigError):
        distmod.collective_timeout()
    assert math.isclose(distmod.DEFAULT_COLLECTIVE_TIMEOUT_S, 600)


# == issue 27 ======================================================================================
@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, train_micro):
    """Run A (trained, with an extracted child) and OTHER (a copy of A under its own identity)."""
    import shutil

    from elasticmoe.checkpoint import write_marker

    root = tmp_path_factory.mktemp("two")
    a = train_micro(root / "a", "train.steps=10", "train.eval_every=10", "train.ckpt_every=10", "train.keep_last=1")
    assert cli.main(["extract", str(a), "--subnet", "L2 E4 k1 W32", "--out", str(a / "children" / "c")]) == 0
    other = root / "other"
    shutil.copytree(a, other, ignore=shutil.ignore_patterns("children", ".elasticmoe.lock"))
    write_marker(other, "run")
    return a, other


# -- item 1: one run's outputs are never replaced by another's --------------------------------------
def test_another_runs_model_is_never_written_inside_a_run(two_runs, tmp_path, capsys):
    a, other = two_runs
    before = snapshot(a)
    link = tmp_path / "link"
    link.symlink_to(a)
    for out in (a / "children" / "c", link / "children" / "c", a / "children" / "new"):
        code, err = in_process(capsys, "extract", other, "--subnet", "L2 E4 k1 W32", "--out", out)
        assert one_line(code, err) and "not from that run" in err, err
    for out in (a / "hf" / "c", link / "hf" / "c"):
        code, err = in_process(capsys, "export", other / "parent", "--out", out)
        assert one_line(code, err) and "not from that run" in err, err
    for args in (("search", other, "--max-params-ratio", "1/2", "--windows", 1), ("lm-eval-tasks", other)):
        for out in (a / "search", link / "lm-eval"):
            code, err = in_process(capsys, *args, "--out", out)
            assert one_line(code, err) and "not from that run" in err, err
    assert snapshot(a) == before
    code, err = in_process(capsys, "lm-eval-tasks", other, "--out", other / "lm-eval")  # its own run: fine
    assert code == 0 and (other / "lm-eval").is_dir(), err


def test_a_folder_recorded_by_the_pipeline_is_not_replaced_by_a_command(two_runs, capsys):
    a, _ = two_runs
    state = {"phases": {"extract": {"done": True, "outputs": {"c": {"dir": "runs/a/children/c"}}}}}
    (a / "pipeline.json").write_text(json.dumps(state))
    try:
        before = snapshot(a)
        code, err = in_process(capsys, "extract", a, "--subnet", "L2 E4 k1 W32", "--out", a / "children" / "c")
        assert one_line(code, err) and "pipeline.json" in err, err
        assert snapshot(a) == before
    finally:
        (a / "pipeline.json").unlink()


# -- item 5: documented usage that works ------------------------------------------------------------
def test_the_readmes_finetune_into_its_own_run_works(two_runs, capsys):
    a, other = two_runs
    code, err = in_process(
        capsys, "finetune", a / "children" / "c", "--teacher", a, "--steps", 2, "--out", a / "finetuned" / "c"
    )
    assert code == 0, err
    assert (a / "finetuned" / "c" / "model" / "manifest.json").is_file()
    code, err = in_process(
        capsys, "finetune", a / "children" / "c", "--teacher", other, "--steps", 2, "--out", other / "finetuned" / "c"
    )
    assert one_line(code, err) and "not from that run" in err, err


def _copy_run(src: Path, dest: Path) -> Path:
    import shutil

    from elasticmoe.checkpoint import write_marker

    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("finetuned", ".elasticmoe.lock"))
    write_marker(dest, "run")
    return dest


# -- item 2: limits before allocation ---------------------------------------------------------------
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefg", "bcdefgh")
)


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    for args in (["info", "--config", bomb], ["train", "--config", bomb, "--out", tmp_path / "r", "--quiet"]):
        t0 = time.perf_counter()
        code, err = in_process(capsys, *args)
        assert one_line(code, err) and "aliases" in err, err
        assert time.perf_counter() - t0 < 5
    assert not (tmp_path / "r").exists()
    code, err = in_process(capsys, "info", "--config", "micro", "--set", "train.steps=[1")
    assert one_line(code, err) and "not valid YAML" in err, err


@pytest.mark.parametrize("field, value", [("layers", 10**9), ("expert_width", 2**34)])
def test_a_model_config_bigger_than_its_weights_is_refused_before_allocating(two_runs, tmp_path, capsys, field, value):
    import shutil

    from elasticmoe.checkpoint import write_manifest

    a, _ = two_runs
    model = tmp_path / "m"
    shutil.copytree(a / "children" / "c", model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["model"][field] = value
    (model / "config.json").write_text(json.dumps(cfg))
    (model / "manifest.json").unlink()
    write_manifest(model)  # the attacker recomputes the checksums
    t0 = time.perf_counter()
    for args in (
        ["export", model, "--out", tmp_path / "hf"],
        ["eval", model, "--data", a, "--out", tmp_path / "e.json"],
    ):
        code, err = in_process(capsys, *args)
        assert one_line(code, err) and "does not describe these weights" in err, err
    assert time.perf_counter() - t0 < 10
    assert not (tmp_path / "hf").exists() and not (tmp_path / "e.json").exists()


def test_data_sources_must_be_regular_files(tmp_path, capsys):
    code, err = in_process(
        capsys, "train", "--config", "micro", "--set", "data.source=files", "--set", "data.paths=['/dev/zero']",
        "--out", tmp_path / "r", "--quiet",
    )  # fmt: skip
    assert one_line(code, err) and "not a regular file" in err, err
    assert not (tmp_path / "r").exists()


def _npy_with_header(path: Path, descr: str, shape: tuple, payload: bytes) -> None:
    from numpy.lib import format as npformat

    with open(path, "wb") as f:
        npformat.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": shape})
        f.write(payload)


@pytest.mark.parametrize(
    "descr, shape, needle", [("<i4", (10**12,), "claims"), ("|O", (2,), "1-D integers"), ("<i4", (2, 2), "1-D")]
)
def test_a_token_arrays_header_is_checked_against_the_file(two_runs, tmp_path, capsys, descr, shape, needle):
    a, _ = two_runs
    run = _copy_run(a, tmp_path / "run")
    _npy_with_header(run / "data" / "tokens" / "val.text.npy", descr, shape, b"\0" * 16)
    t0 = time.perf_counter()
    code, err = in_process(capsys, "extract", run, "--subnet", "L2 E4 k1 W32", "--out", tmp_path / "c")
    assert one_line(code, err) and needle in err, err
    assert time.perf_counter() - t0 < 10 and not (tmp_path / "c").exists()


def test_deeply_nested_json_is_one_line_and_a_damaged_ledger_line_in_the_report(two_runs, tmp_path, capsys):
    a, _ = two_runs
    run = _copy_run(a, tmp_path / "run")
    deep = "[" * 100_000 + "]" * 100_000
    with open(run / "ledger.jsonl", "a") as f:
        f.write('{"event": "end", "x": ' + deep + "}\n")
    code, err = in_process(capsys, "report", run)
    assert code == 0, err
    assert "damaged" in (run / "report.md").read_text().lower()
    (run / "parent" / "manifest.json").write_text(deep)
    code, err = in_process(capsys, "export", run / "parent", "--out", tmp_path / "hf")
    assert one_line(code, err) and "nested too deeply" in err, err


def test_a_data_file_whose_name_looks_like_a_glob_is_read_as_that_file(tmp_path):
    from elasticmoe.data import load_user_texts

    f = tmp_path / "notes[1]*?.txt"
    f.write_text("one paragraph\n\nanother paragraph\n")
    assert "another paragraph" in " ".join(load_user_texts([str(f)]))


# -- item 3: a resume refuses inputs that changed under it, naming them ------------------------------
def _replace_tokens(run: Path) -> None:
    import numpy as np

    path = run / "data" / "tokens" / "train.text.npy"
    arr = np.load(path)
    np.save(path, arr[::-1].copy())  # the same tokens, in another order: a corpus prepared again


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda run: (run / "data" / "tokenizer.json").write_text((run / "data" / "tokenizer.json").read_text() + " "),
         "data/tokenizer.json changed"),
        (_replace_tokens, "data/tokens changed"),
        (lambda run: __import__("shutil").rmtree(run / "checkpoints"), "finished parent/"),
    ],
)  # fmt: skip
def test_resume_refuses_changed_inputs_and_a_finished_run_without_checkpoints(
    two_runs, tmp_path, capsys, damage, needle
):
    a, _ = two_runs
    run = _copy_run(a, tmp_path / "run")
    damage(run)
    before = snapshot(run)
    code, err = in_process(capsys, "train", "--out", run, "--resume", "--quiet")
    assert one_line(code, err) and needle in err, err
    mine = lambda files: {k: v for k, v in files.items() if k not in ("ledger.jsonl", ".elasticmoe.lock")}  # noqa: E731
    assert mine(snapshot(run)) == mine(before)


# -- item 6: SIGTERM and SIGHUP end a command as Ctrl-C does ----------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_stop_like_ctrl_c(tmp_path, sig):
    run = tmp_path / "run"
    args = ["train", "--config", "micro", "--out", run, "--quiet", "--set", "train.steps=100000"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "elasticmoe", *map(str, args)], stderr=subprocess.PIPE, text=True, env=ENV
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list((run / "checkpoints").glob("step-*")):
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == f"interrupted ({signal.Signals(sig).name})"
    train = [r for r in read_records(run / "ledger.jsonl")[0] if r.get("phase") == "train"]
    assert train[-1]["event"] == "end" and train[-1]["status"] == "crashed"
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]


def test_sigterm_stops_a_finetune_like_ctrl_c(two_runs, tmp_path):
    """The handler belongs to the CLI, not to `train`: a fine-tune (its own loop, ledger phase and
    output folder) stops the same way, and its --resume goes on from the last checkpoint."""
    a, _ = two_runs
    run = _copy_run(a, tmp_path / "run")
    out = run / "finetuned" / "c"
    args = ["finetune", run / "children" / "c", "--teacher", run, "--tokens", 10**7, "--out", out]
    proc = subprocess.Popen(
        [sys.executable, "-m", "elasticmoe", *map(str, args)], stderr=subprocess.PIPE, text=True, env=ENV
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "checkpoints").glob("step-*")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted (SIGTERM)"
    ft = [r for r in read_records(run / "ledger.jsonl")[0] if r.get("phase") == "finetune"]
    assert ft[-1]["event"] == "end" and ft[-1]["status"] == "crashed"
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]
    assert not (out / "model").exists() and list((out / "checkpoints").glob("step-*"))


# -- item 4: a search redone after a kill is counted once -------------------------------------------
def test_a_search_redone_after_a_kill_is_counted_once(two_runs, tmp_path, capsys):
    a, _ = two_runs
    run = _copy_run(a, tmp_path / "run")
    args = ("search", run, "--max-params-ratio", "1/2", "--windows", 1)
    assert in_process(capsys, *args)[0] == 0
    once = Ledger(run / "ledger.jsonl").totals("search")
    assert once["flops"] > 0
    with open(run / "ledger.jsonl", "a") as f:  # a second attempt killed mid-search: a start, no end
        f.write(json.dumps({"event": "start", "phase": "search", "model": "cli"}) + "\n")
    assert in_process(capsys, *args)[0] == 0
    assert Ledger(run / "ledger.jsonl").totals("search")["flops"] == once["flops"]
    assert in_process(capsys, *args[:3], "1/3", "--windows", 1)[0] == 0  # another search counts on its own
    assert Ledger(run / "ledger.jsonl").totals("search")["flops"] > once["flops"]


# -- item 7: a full disk during a tensor write is one line ------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 64 KB tmpfs (skipped where mounting is not allowed)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_a_full_disk_during_a_safetensors_write_is_one_line(two_runs, small_disk, capsys):
    a, _ = two_runs
    code, err = in_process(capsys, "extract", a, "--subnet", "L2 E4 k1 W32", "--out", small_disk / "c")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and "Traceback" not in err and len(lines) == 1, err
    assert "No space left on device" in err and "model.safetensors needs" in err and "MiB" in err
    assert list(small_disk.iterdir()) == []


def test_a_full_disk_during_a_sharded_checkpoint_names_what_it_needs(small_disk):
    """torchrun's checkpoints (torch.distributed.checkpoint) report a full disk as torch.save's
    "unexpected pos"; the save says what it is, and leaves no temporary folder."""
    import errno

    import torch

    from elasticmoe import dist as distmod
    from elasticmoe.model import ElasticMoE
    from elasticmoe.recipe import load_recipe
    from elasticmoe.train import make_optimizer

    r = load_recipe("micro", [])
    model = ElasticMoE(r.model)
    par = distmod.setup(torch.device("cpu"), "auto")
    with pytest.raises(OSError) as info:
        distmod.save_sharded(par, small_disk / "step-000005", model, make_optimizer(model, r), {"x.json": {}})
    assert info.value.errno == errno.ENOSPC and "checkpoint step-000005 needs about" in str(info.value)
    assert "MiB free" in str(info.value) and list(small_disk.iterdir()) == []


def test_safetensors_files_honour_the_umask(two_runs):
    a, _ = two_runs
    mode = (a / "children" / "c" / "model.safetensors").stat().st_mode & 0o777
    assert mode == 0o666 & ~_current_umask()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize(
    "args, needle",
    [
        (["finetune", "x", "--tokens", "nan", "--out", "y"], "invalid int value: 'nan'"),
        (["finetune", "x", "--tokens", "1e30", "--out", "y"], "invalid int value: '1e30'"),
        (["export", "x", "--out", ""], "--out is empty"),
        (["info", "--config", "micro", "--set", "train.seed=" + "9" * 100_000], "train.seed=<100,000 characters>"),
    ],
)
def test_bad_command_lines_are_one_line(args, needle):
    res = run_cli(*args, timeout=120)
    assert one_line(res.returncode, res.stderr) and needle in res.stderr, res.stderr[:500]


def _bad_state(ckpt: Path) -> None:
    (ckpt / "train_state.json").write_text(json.dumps({"step": "ten"}))


def _bad_header(ckpt: Path) -> None:
    with open(ckpt / "model.safetensors", "r+b") as f:
        f.write((2**40).to_bytes(8, "little"))


@pytest.mark.parametrize("damage", [_bad_state, _bad_header])
def test_a_newest_checkpoint_that_verifies_but_cannot_load_falls_back_to_the_previous(
    tmp_path, train_micro, capsys, damage
):
    from elasticmoe.checkpoint import write_manifest

    run = train_micro(tmp_path / "run", "train.steps=10", "train.ckpt_every=5", "train.eval_every=10")
    newest = run / "checkpoints" / "step-000010"
    damage(newest)
    (newest / "manifest.json").unlink()
    write_manifest(newest)  # the manifest alone cannot tell
    code, err = in_process(capsys, "train", "--out", run, "--resume", "--quiet")
    assert code == 0 and "Traceback" not in err, err
    assert (run / "checkpoints" / "corrupted" / "step-000010").is_dir()
    assert json.loads((run / "checkpoints" / "step-000010" / "train_state.json").read_text())["step"] == 10


# -- item 10: the printed lm-eval command is the one that reproduces `eval` -------------------------
def test_lm_eval_tasks_prints_add_bos_token_false(two_runs, tmp_path, capsys):
    a, _ = two_runs
    capsys.readouterr()
    assert cli.main(["lm-eval-tasks", str(a), "--out", str(tmp_path / "tasks"), "--examples", "3"]) == 0
    printed = [ln for ln in capsys.readouterr().out.splitlines() if "lm_eval --model hf" in ln]
    assert len(printed) == 1 and "add_bos_token=False" in printed[0]
    assert "add_bos_token=False" in (tmp_path / "tasks" / "README.md").read_text()


@pytest.fixture
def read_only_run(two_runs, tmp_path):
    """A copy of run A on a read-only bind mount (skipped where mounting is not allowed)."""
    a, _ = two_runs
    src, mnt = _copy_run(a, tmp_path / "src"), tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "--bind", str(src), str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot bind-mount here")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(mnt)], capture_output=True).returncode != 0:
            pytest.skip("cannot remount read-only here")
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_run_on_a_read_only_mount_can_be_read_with_out_elsewhere(read_only_run, tmp_path, capsys):
    ro = read_only_run
    code, err = in_process(capsys, "extract", ro, "--subnet", "L2 E4 k1 W32", "--out", tmp_path / "c")
    assert code == 0, err
    code, err = in_process(
        capsys, "eval", ro / "parent", tmp_path / "c", "--data", ro, "--examples", 2, "--out", tmp_path / "e.json"
    )
    assert code == 0, err
    assert (tmp_path / "c" / "manifest.json").is_file() and (tmp_path / "e.json").is_file()


# -- item 11: model cards name the model, say what it is, and count only its own work ----------------
def test_cards_say_zero_shot_or_fine_tuned_and_count_only_their_own_fine_tune(two_runs, tmp_path, capsys):
    a, _ = two_runs
    run = _copy_run(a, tmp_path / "run")
    ft = run / "finetuned" / "c"
    code, err = in_process(capsys, "finetune", run / "children" / "c", "--teacher", run, "--steps", 2, "--out", ft)
    assert code == 0, err
    subnet = json.loads((run / "children" / "c" / "config.json").read_text())["meta"]["subnet"]
    distill = {"event": "end", "status": "ok", "phase": "finetune", "model": subnet, "tokens": 7_777_777_777}
    Ledger(run / "ledger.jsonl").append({**distill, "out": "baselines/c-prune-distill/distilled", "flops": 1})
    result = {"tasks": {"kv": {"metric": "exact_match", "score": 0.5, "ci": [0.25, 0.75]}}}
    (run / "eval").mkdir(exist_ok=True)
    (run / "eval" / "results.json").write_text(json.dumps({"models": {"c": result, "c-ft": result}}))
    for src, out in ((ft, tmp_path / "hf-ft"), (run / "children" / "c", tmp_path / "hf-zero")):
        code, err = in_process(capsys, "export", src, "--out", out)
        assert code == 0, err
    tuned, zero = ((tmp_path / d / "README.md").read_text() for d in ("hf-ft", "hf-zero"))
    assert "# run-c-finetuned" in tuned and "**fine-tuned** child" in tuned and "| fine-tuning of this model |" in tuned
    assert "7.78G" not in tuned and "| results.json | c-ft | kv |" in tuned
    assert "# run-c" in zero and "**zero-shot** child" in zero and "fine-tuning" not in zero
    for card in (tuned, zero):
        assert str(tmp_path) not in card and 'split("\\n")[0]' in card


# -- item 8: smaller things --------------------------------------------------------------------------
def test_a_legal_240_byte_output_name_is_written(tmp_path):
    long = tmp_path / ("c" * 240)
    with AtomicFolder(long, "child") as tmp:
        (tmp / "a.txt").write_text("x")
    atomic_write_text(long.with_name("d" * 250), "y")
    verify_manifest(long)
    assert (tmp_path / ("d" * 250)).read_text() == "y"


@pytest.mark.parametrize(
    "write, needle",
    [
        (lambda f: f.write_text('{"garbage": 1}'), "cannot load tokenizer"),
        (lambda f: os.truncate(f, 200 << 20) if f.write_text("{}") is not None else None, "more than"),
    ],
)
def test_import_checks_the_tokenizer_it_would_copy(hf_folder, tmp_path, capsys, write, needle):
    write(hf_folder / "tokenizer.json")
    code, err = in_process(capsys, "import-hf", hf_folder, "--out", tmp_path / "imported")
    assert one_line(code, err) and needle in err, err
    assert not (tmp_path / "imported").exists()


def test_random_bytes_as_a_corpus_are_warned_about(tmp_path, caplog):
    import logging

    from elasticmoe.data import load_user_texts

    noise, prose = tmp_path / "noise.txt", tmp_path / "prose.txt"
    noise.write_bytes(os.urandom(64 << 10))
    prose.write_text("Plain prose.\n\nAnother paragraph of it.\n")
    with caplog.at_level(logging.WARNING, logger="elasticmoe.data"):
        load_user_texts([str(prose)])
        assert not caplog.records
        load_user_texts([str(noise)])
    assert any("does not look like text" in r.getMessage() for r in caplog.records)
