"""The README's documented commands run as written (#27): each line of its command-by-command block,
against a micro run (the presets and budgets scaled down, nothing else changed)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from elasticmoe import cli

README = Path(__file__).resolve().parents[1] / "README.md"
# tiny -> micro: the preset, the budgets and the shapes of the micro parent (3 layers, width 64)
SCALE = {
    "tiny": "micro",
    "L3 E4 k1 W128": "L2 E4 k1 W32",
    "L4 E4 k2 W256": "L3 E4 k2 W64",
    "path/to/mixtral-or-qwen3moe": "hf-parent",
}


def readme_commands(heading: str) -> list[list[str]]:
    """The `elasticmoe ...` lines of the first bash block after `heading`, comments dropped."""
    text = README.read_text()
    block = text[text.index(heading) :].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [ln.split("  #")[0].strip() for ln in block.splitlines() if ln.startswith("elasticmoe ")]
    return [shlex.split(ln)[1:] for ln in lines]


def scaled(args: list[str]) -> list[str]:
    out = [SCALE.get(a, a) for a in args]
    for i, a in enumerate(out[:-1]):
        if a == "--tokens":
            out[i + 1] = "2048"
    return out


@pytest.mark.slow
def test_the_readmes_pipeline_commands_run_as_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(SCALE, "L3 E4 k1 W128", SCALE["L3 E4 k1 W128"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    commands = readme_commands("## The pipeline, command by command")
    assert len(commands) >= 15 and any(c[0] == "import-hf" for c in commands)
    for args in commands:
        args = scaled(args)
        if args[0] == "import-hf":  # the README's placeholder: a transformers folder of our own parent
            assert cli.main(["export", "runs/a/parent", "--out", "hf-parent"]) == 0
        code = cli.main(args)
        err = capsys.readouterr().err
        assert code == 0, (args, err[-2000:])
        if args[0] == "extract":  # the baselines are of the child the search picked (the README's tiny: that shape)
            meta = json.loads((tmp_path / args[-1] / "config.json").read_text())["meta"]
            SCALE["L3 E4 k1 W128"] = meta["subnet"]
    assert (tmp_path / "runs" / "a" / "report.md").is_file() and (tmp_path / "runs" / "imported" / "parent").is_dir()
    assert not [p for p in tmp_path.rglob("*") if re.search(r"\.tmp(-|$)", p.name) and os.path.exists(p)]
    run_elsewhere_blocks(tmp_path, capsys)


def shell_lines(heading: str, nth: int = 0) -> list[str]:
    """The command lines of the `nth` bash block after `heading`: continuations joined, comments dropped."""
    text = README.read_text()
    block = text[text.index(heading) :].split("```bash\n")[1 + nth].split("```", 1)[0]
    joined = re.sub(r"\\\n\s*", " ", block)
    return [ln.split("  #")[0].strip() for ln in joined.splitlines() if ln.strip() and not ln.startswith("#")]


def sh(line: str, cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    res = subprocess.run(line, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (line, res.stderr[-3000:])


def run_elsewhere_blocks(tmp_path: Path, capsys) -> None:
    """The export, lm-eval and CPU torchrun blocks, on the run the pipeline block made (#27): the
    placeholders filled in, the example count and the torchrun run's steps scaled down."""
    child = sorted((tmp_path / "runs" / "a" / "children").iterdir())[0].relative_to(tmp_path)
    fill = {"CHILD": str(child), "HF_DIR": "hf-doc", "GG_DIR": "gg-doc", "runs/default": "runs/a"}
    exports = shell_lines("## Running children elsewhere")
    assert [ln.split()[:2] for ln in exports] == [["elasticmoe", "export"]] * 2
    for line in exports:
        args = [fill.get(a, a) for a in shlex.split(line)[1:]]
        assert cli.main(args) == 0, (args, capsys.readouterr().err[-2000:])
    assert (tmp_path / "hf-doc" / "config.json").is_file() and list((tmp_path / "gg-doc").glob("*.gguf"))
    tasks_line, harness = shell_lines("## Running children elsewhere", 1)
    args = [fill.get(a, a) for a in shlex.split(tasks_line)[1:]]
    args[args.index("--examples") + 1] = "3"
    assert cli.main(args) == 0, capsys.readouterr().err[-2000:]
    harness = harness.replace("runs/default/hf/CHILD", "hf-doc")
    assert "add_bos_token=False" in harness and harness.startswith("HF_DATASETS_OFFLINE=1 ")
    sh(harness + " --output_path lm-eval-out", tmp_path)
    assert list((tmp_path / "lm-eval-out").rglob("results*.json"))
    cpu = [ln for ln in shell_lines("## Scaling out") if "gloo" in ln or "--config micro" in ln]
    assert len(cpu) == 1 and cpu[0].startswith("OMP_NUM_THREADS=1 torchrun ")
    sh(cpu[0] + " --set train.steps=4 --set train.eval_every=4 --set train.ckpt_every=4 --quiet", tmp_path)
    assert (tmp_path / "runs" / "cpu2" / "parent" / "manifest.json").is_file()
