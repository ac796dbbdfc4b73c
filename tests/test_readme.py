"""Every command of README.md and docs/*.md, in their bash blocks and inline in their prose, works as written from a fresh shell
(no venv on PATH): the cheap ones run as they are, the expensive ones in a form that runs nothing heavy
(`--check` validates the parameters of a step command, `make -n` a target, `--help` a script, papermill
lines are checked against their notebook's parameters and must create the folder of their executed copy);
those that need the network, GPUs or the real data are listed with the reason they are not run. The
real-data commands also run literally, in their order, on a synthetic download: tests/test_real_data.py."""
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
STEP_COMMANDS = r"(?:\$step|explore|prepare|train|predict|fuse|ensemble|aggregate|pseudo|submit)"
NOT_RUN = {  # what a line starts with -> why it is not run here
    "git clone": "needs the network (the install itself: tests/test_environment.py)",
    "pip install": "needs the network (tests/test_environment.py checks the install resolves with a preinstalled torch)",
    ".venv/bin/kaggle competitions download": "needs the network and a Kaggle account",
    "cd data/cdiscount && unzip": "needs the competition download",
    "mkdir -p weights && python -c": "downloads ImageNet weights",
    "accelerate launch --multi_gpu": "needs GPUs (the launcher on 2 CPU processes: tests/test_train.py)",
    "accelerate": "the multi-GPU launcher (tests/test_train.py runs it on 2 CPU processes)",
    "kaggle competitions submit": "needs the network and a Kaggle account",
    ".ci/run": "the whole suite on a clean clone (CI itself)",
    "python -m pytest": "the test suite itself",
    "jupyter lab": "starts a server (`make -n lab` is checked)",
}
# an inline command whose words hold one of these is a form with placeholders, not a line to type
PLACEHOLDER = re.compile(r"<|\[|\.\.\.|\\\||\b(?:FILE|N|D|DIR|PATH|BSON|OUT_DIR)\b")
PROGRAMS = ("cdkit", ".venv/bin/cdkit", "python -m cdkit", "make", "make -n", "papermill")  # names, not commands


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # the front door and the pages it links to


def readme_commands():
    "(line, block number) of every command line in the bash blocks of README.md and docs/*.md"
    out = []
    for page in PAGES:
        for i, block in enumerate(re.findall(r"^\s*```bash\n(.*?)^\s*```", page.read_text(), flags=re.S | re.M)):
            for line in block.splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    out.append((line, f"{page.name}:{i}"))
    return out


def readme_inline_commands():
    "Every command quoted inline in the prose and tables of README.md and docs/*.md (`cdkit ...`, `make ...`, `python ...`), once"
    text = "\n".join(re.sub(r"^\s*```.*?^\s*```", "", page.read_text(), flags=re.S | re.M) for page in PAGES)
    out = []
    for span in re.findall(r"`([^`]+)`", text):
        span = " ".join(span.split())
        first = span.split(" ")[0]
        if (first in ("cdkit", "papermill", "make", "python", "accelerate", "time", "mkdir", "jupyter", "pip",
                      "kaggle", ".ci/run") or first.startswith((".venv/bin/", "bench/"))) and span not in out:
            out.append(span)
    return out


def plan_inline(span):
    "plan() of an inline command: forms with placeholders and bare program names are listed, not run"
    if PLACEHOLDER.search(span):
        return "skip", "a form with placeholders (the table of commands), not a line to type"
    if span in PROGRAMS:
        return "skip", "the name of a program, not a command line"
    if span.endswith("/"):
        return "skip", "a folder, not a command line"
    if re.match(r"\S+ [\w ]+: ", span):  # e.g. pytest's header line `cdkit numerics: seed shift 0, ...` (docs/TESTING.md)
        return "skip", "output quoted from a run, not a command line"
    if span.startswith("time "):
        span = span[5:]
    if span.startswith("bench/"):
        span = "python " + span
    if span.startswith(("cdkit", "python -m cdkit", ".venv/bin/cdkit")) and len(span.split()) == 1 + span.startswith("python"):
        return "run", span + " --help"
    return plan(span)


def plan(line):
    "('run', shell command) / ('papermill', args) / ('skip', why) for one README line"
    for start, why in NOT_RUN.items():
        if line.startswith(start): return "skip", why
    cmd = line.split(" #", 1)[0].strip()
    mkdir = re.match(r"mkdir -p (\S+) && (papermill .*)", cmd)
    if mkdir:  # the folder of papermill's executed copy, made by the line itself
        return "papermill", shlex.split(mkdir.group(2))[1:] + ["--made", mkdir.group(1)]
    if cmd.startswith("make "):
        return "run", "make -n " + cmd[5:]
    if cmd.startswith("source "):
        return "run", cmd + " && command -v cdkit papermill"
    if cmd.startswith("papermill "):
        return "papermill", shlex.split(cmd)[1:]
    if cmd.startswith("python bench/"):
        return "run", f"python {cmd.split()[1]} --help"
    if cmd.startswith("python -m cdkit"):
        cmd = "cdkit" + cmd[len("python -m cdkit"):]
    cmd = re.sub(r"^accelerate launch .*? -m cdkit ", "cdkit ", cmd)  # the launcher itself: tests/test_train.py
    if cmd.startswith("cdkit demo"):
        return "run", "cdkit demo --help"
    if re.fullmatch(r"cdkit (synth|index|demo)", cmd):  # named in the prose without their arguments
        return "run", cmd + " --help"
    if re.search(rf"cdkit {STEP_COMMANDS}(\s|;|$)", cmd) and not re.search(r"\s--(check|help)\b", cmd):
        return "run", re.sub(rf"(cdkit {STEP_COMMANDS})(\s|;|$)", r"\1 --check\2", cmd)
    if cmd.startswith("cdkit "):
        return "run", cmd  # --help forms, synth of the tiny preset
    return "skip", "not recognised: add it to tests/test_readme.py"


def fresh_shell(cmd, tmp_path):
    "Run `cmd` with bash as a new login would: no venv on PATH; the README's activation first"
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8",
           "CDKIT_SYNTH_ROOT": str(tmp_path)}
    if os.environ.get("PYTHONPATH"):  # a worktree's cdkit ahead of the venv's editable install, as in the tests
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    cwd = ROOT
    if cmd.startswith("cdkit synth"):  # a path typed is relative to the current folder: a temporary one, not the clone
        env["CDKIT_ROOT"], cwd = str(tmp_path), tmp_path
    activate = f"source {shlex.quote(str(VENV / 'bin' / 'activate'))}"
    cmd = cmd.replace("source .venv/bin/activate", activate)
    prefix = "" if cmd.startswith(("make ", "source ")) else activate + " && "
    return subprocess.run(["bash", "-c", prefix + cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


COMMANDS = readme_commands()
INLINE = readme_inline_commands()
PLANS = {**{c: plan(c) for c, _ in COMMANDS}, **{c: plan_inline(c) for c in INLINE}}


def test_every_readme_command_is_checked_or_listed():
    assert len(COMMANDS) >= 15 and len(INLINE) >= 30
    unknown = [line for line, p in PLANS.items() if p == ("skip", "not recognised: add it to tests/test_readme.py")]
    assert not unknown, unknown
    ran = [line for line, p in PLANS.items() if p[0] != "skip"]
    assert len(ran) >= 40, ran
    # the inline step commands of the prose are among those run (e.g. the rerun of part of the demo)
    assert ("run", "cdkit demo --help") == PLANS["cdkit demo --only 06,07,08"]


RUNS = sorted({p[1]: line for line, p in PLANS.items() if p[0] == "run"}.items())  # each shell command once


@pytest.mark.parametrize("cmd,line", RUNS, ids=[c for c, _ in RUNS])
def test_readme_command_runs_from_a_fresh_shell(cmd, line, tmp_path):
    r = fresh_shell(cmd, tmp_path)
    if "--check" in cmd and r.returncode == 1:
        # a fresh clone has neither the download nor a split: --check validates the parameters and lists what is
        # missing on disk (exit 1); every other refusal still fails the test
        errors = [x for x in r.stderr.splitlines() if x.startswith("ERROR:")]
        assert errors and all("missing on disk" in x for x in errors) and "missing:" in r.stdout, \
            f"{line}\n-> {cmd}\n{r.stdout[-1500:]}\n{r.stderr[-1500:]}"
        return
    assert r.returncode == 0, f"{line}\n-> {cmd}\n{r.stdout[-1500:]}\n{r.stderr[-1500:]}"
    if cmd.startswith("cdkit synth data/tiny"):
        assert (tmp_path / "data" / "tiny" / "train.bson").exists()


@pytest.mark.parametrize("line", [c for c, p in PLANS.items() if p[0] == "papermill"])
def test_readme_papermill_lines_match_their_notebooks(line):
    """The notebook exists and takes every -f file and -p key with a valid value (what papermill would inject),
    and the line makes the folder of the executed copy (papermill fails with a traceback where it is missing,
    as on a fresh clone)"""
    import yaml
    from cdkit.base.params import make_params, notebook_parameters
    from cdkit.steps.pipeline import params_class, step_parameters
    args = PLANS[line][1]
    nb, files, values, made = ROOT / args[0], [], {}, None
    k = 2
    while k < len(args):
        if args[k] == "-f": files.append(args[k + 1]); k += 2
        elif args[k] == "-p": values[args[k + 1]] = yaml.safe_load(args[k + 2]); k += 3
        elif args[k] == "--made": made = args[k + 1]; k += 2
        else: raise AssertionError(f"unexpected papermill argument {args[k]!r} in {line}")
    assert nb.exists(), nb
    assert made is not None and Path(args[1]).parent == Path(made), \
        f"{line}: the folder of {args[1]} may not exist (a fresh clone has no runs/): `mkdir -p` it first"
    injected = step_parameters(nb, [ROOT / f for f in files])
    make_params(params_class(nb.stem), {**notebook_parameters(nb), **injected, **values}, where=line)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_between_pages_resolve(page):
    "Every relative link of the README and docs/*.md names a file of the repository (and an anchor its page holds)"
    text = re.sub(r"^\s*```.*?^\s*```", "", page.read_text(), flags=re.S | re.M)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link {target!r} names no file"
        if anchor:
            slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                     for h in re.findall(r"^#+ (.*)$", dest.read_text(), flags=re.M)}
            assert anchor in slugs, f"{page.name}: link {target!r}: no heading with that anchor"


def test_the_readme_stays_a_front_door():
    "Results, benchmarks and promises live in docs/; the README says what it is and how to start"
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 170
    assert text.splitlines()[2:5] == ["```bash", "make demo   # sets up .venv, writes the synthetic demo data, runs every notebook headless -> runs/demo/",
                                      "make test   # sets up .venv if needed, runs the test suite (python -m pytest)"]
    for page in ("RECIPES", "RESULTS", "BENCHMARKS", "RELIABILITY", "TESTING"):
        assert f"(docs/{page}.md)" in text, page
