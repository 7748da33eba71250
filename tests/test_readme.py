"""The README opens with a two-command quick start, and its Python runs."""

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def code_blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_quick_start_is_two_commands_install_and_run_then_test():
    first_section = README.split("\n## ")[1]
    assert first_section.startswith("Quick start")
    commands = code_blocks("bash")[0].strip().splitlines()
    assert commands == [
        "pip install . && keras-adam-tune --dataset digits",
        'pip install ".[test]" && python -m pytest -n 2',
    ]
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci


def test_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for block in code_blocks("python"):
        exec(compile(block, "README.md", "exec"), namespace)
    assert os.path.exists(tmp_path / "model.keras")
    assert type(namespace["ours"]) is namespace["keras_adam"].Adam
    result = namespace["result"]
    assert len(result.trials) == 2 and result.comparison is not None
    assert type(namespace["tuned_optimizer"]) is namespace["keras_adam"].Adam
    assert (tmp_path / "runs" / "readme" / "trial_0").is_dir()
    # One epoch (45 batches) with Keras's Adam; ours resumes at step 45 for one more.
    assert int(namespace["ours"].iterations.numpy()) == 2 * 45
