"""The README's quick-start commands and its Python run."""

import os
import re
import shlex
from importlib.metadata import entry_points, metadata
from pathlib import Path

from tuning import cli
from tuning.datasets import load_dataset

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def code_blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_quick_start_commands_install_and_run():
    """Each quick-start line installs what exists and runs a command that works:
    the tune command's arguments parse and its dataset loads; the test command
    is the one CI runs (.ci/run), which runs the suite."""
    commands = code_blocks("bash")[0].strip().splitlines()
    extras = metadata("keras-adam").get_all("Provides-Extra")
    scripts = {entry.name: entry for entry in entry_points(group="console_scripts")}
    ci = (ROOT / ".ci" / "run").read_text()
    for line in commands:
        install, _, command = line.partition(" && ")
        target = shlex.split(install)[2:]
        assert shlex.split(install)[:2] == ["pip", "install"] and len(target) == 1, line
        package, _, extra = target[0].partition("[")
        assert package == "." and extra.rstrip("]") in ("", *extras), line
        argv = shlex.split(command)
        if argv[0] in scripts:
            main = scripts[argv[0]].load()
            assert main.__module__ == "tuning.cli"
            args = cli.build_parser().parse_args(argv[1:])
            assert load_dataset(args.dataset).x_train.shape[0] > 0
        else:
            assert argv[1:3] == ["-m", "pytest"], line
            assert line in ci, "CI runs the README's test command"


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
