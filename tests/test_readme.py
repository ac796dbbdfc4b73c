"""Every command in README.md's bash blocks works as written from a fresh shell (no venv on PATH): the
cheap ones run as they are, the expensive ones in a form that runs nothing heavy (`--check` validates the
parameters of a step command, `make -n` a target, papermill lines are checked against their notebook's
parameters); those that need the network or the real data are listed with the reason they are not run."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the virtual environment running these tests: the clone's .venv under `make test`, the one `.ci/run` keeps
# outside the clone in CI; the README's `.venv` stands for it
VENV = Path(sys.prefix)
STEP_COMMANDS = r"(?:\$step|explore|prepare|train|predict|ensemble|aggregate|pseudo|submit)"
NOT_RUN = {  # what a line starts with -> why it is not run here
    "git clone": "needs the network (the install itself: tests/test_environment.py)",
    "pip install": "needs the network (tests/test_environment.py checks the install resolves with a preinstalled torch)",
    ".venv/bin/kaggle competitions download": "needs the network and a Kaggle account",
    "cd data/cdiscount && unzip": "needs the competition download",
    "mkdir -p weights && python -c": "downloads ImageNet weights",
}


def readme_commands():
    "(line, block number) of every command line in README.md's bash blocks, continuation lines joined"
    text = (ROOT / "README.md").read_text()
    out = []
    for i, block in enumerate(re.findall(r"^\s*```bash\n(.*?)^\s*```", text, flags=re.S | re.M)):
        for line in block.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append((line, i))
    return out


def plan(line):
    "('run', shell command) / ('papermill', args) / ('skip', why) for one README line"
    for start, why in NOT_RUN.items():
        if line.startswith(start): return "skip", why
    cmd = line.split(" #", 1)[0].strip()
    if cmd.startswith("make "):
        return "run", "make -n " + cmd[5:]
    if cmd.startswith("source "):
        return "run", cmd + " && command -v cdkit papermill"
    if cmd.startswith("papermill "):
        return "papermill", shlex.split(cmd)[1:]
    if cmd.startswith("python bench/"):
        return "run", f"python {cmd.split()[1]} --help"
    cmd = re.sub(r"^accelerate launch .*? -m cdkit ", "cdkit ", cmd)  # the launcher itself: tests/test_train.py
    if cmd.startswith("cdkit demo"):
        return "run", "cdkit demo --help"
    if re.search(rf"cdkit {STEP_COMMANDS}(\s|;|$)", cmd):
        return "run", re.sub(rf"(cdkit {STEP_COMMANDS})(\s|;|$)", r"\1 --check\2", cmd)
    if cmd.startswith("cdkit "):
        return "run", cmd  # --help forms, synth of the tiny preset
    return "skip", "not recognised: add it to tests/test_readme.py"


def fresh_shell(cmd, tmp_path):
    "Run `cmd` with bash as a new login would: no venv on PATH; the README's activation first"
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8",
           "CDKIT_SYNTH_ROOT": str(tmp_path)}
    if cmd.startswith("cdkit synth"):  # written under a temporary root instead of the clone's data/
        env["CDKIT_ROOT"] = str(tmp_path)
    activate = f"source {shlex.quote(str(VENV / 'bin' / 'activate'))}"
    cmd = cmd.replace("source .venv/bin/activate", activate)
    prefix = "" if cmd.startswith(("make ", "source ")) else activate + " && "
    return subprocess.run(["bash", "-c", prefix + cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


COMMANDS = readme_commands()


def test_every_readme_command_is_checked_or_listed():
    assert len(COMMANDS) >= 15
    unknown = [line for line, _ in COMMANDS if plan(line) == ("skip", "not recognised: add it to tests/test_readme.py")]
    assert not unknown, unknown
    ran = [line for line, _ in COMMANDS if plan(line)[0] != "skip"]
    assert len(ran) >= 12, ran


@pytest.mark.parametrize("line", [c for c, _ in COMMANDS if plan(c)[0] == "run"])
def test_readme_command_runs_from_a_fresh_shell(line, tmp_path):
    _, cmd = plan(line)
    r = fresh_shell(cmd, tmp_path)
    assert r.returncode == 0, f"{line}\n-> {cmd}\n{r.stdout[-1500:]}\n{r.stderr[-1500:]}"
    if cmd.startswith("cdkit synth"):
        assert (tmp_path / "data" / "tiny" / "train.bson").exists()


@pytest.mark.parametrize("line", [c for c, _ in COMMANDS if plan(c)[0] == "papermill"])
def test_readme_papermill_lines_match_their_notebooks(line):
    "The notebook exists and takes every -f file and -p key with a valid value (what papermill would inject)"
    import yaml
    from cdkit.params import make_params, notebook_parameters
    from cdkit.pipeline import params_class, step_parameters
    args = plan(line)[1]
    nb, files, values = ROOT / args[0], [], {}
    k = 2
    while k < len(args):
        if args[k] == "-f": files.append(args[k + 1]); k += 2
        elif args[k] == "-p": values[args[k + 1]] = yaml.safe_load(args[k + 2]); k += 3
        else: raise AssertionError(f"unexpected papermill argument {args[k]!r} in {line}")
    assert nb.exists(), nb
    injected = step_parameters(nb, [ROOT / f for f in files])
    make_params(params_class(nb.stem), {**notebook_parameters(nb), **injected, **values}, where=line)
