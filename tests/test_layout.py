"""The project's shape: imports flow one way (the README's tour of the files), CI runs the README's test
command, a green run still lists what it skipped, the GPU check fails fast where there is no GPU, and every
command in README.md and docs/ names a file that exists and parses with that script's own argparse.

Run: python -m pytest tests/test_layout.py -q   (about 15 s: the GPU check's dry run starts bash twice)
"""
import argparse
import ast
import os
import re
import runpy
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import runner
from background import background
from background import run as run_in_background

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["data", "llava", "attention", "model", "eval", "strategies", "report", "runner", "train",
         "study"]  # top to bottom
ALLOWED = {  # which of our files each may import; every one lies above it in ORDER
    "data": set(), "llava": {"data"}, "attention": set(), "model": {"attention"},
    "eval": {"data", "llava"}, "strategies": {"llava", "model", "eval"}, "report": {"data", "eval"},
    "runner": {"data", "llava", "model", "strategies", "eval", "report"},
    "train": {"data", "llava", "model", "strategies", "eval", "report", "runner"},
    "study": {"data", "runner", "eval", "strategies", "report"},
}


# ----------------------------------------------------------------------------------------------
# the layout

def our_imports(name):
    """The project files that ROOT/<name>.py imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse((ROOT / f"{name}.py").read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(ORDER)


def test_every_project_file_is_in_the_layout():
    assert {p.stem for p in ROOT.glob("*.py")} == set(ORDER)


@pytest.mark.parametrize("name", ORDER)
def test_imports_flow_one_way(name):
    assert all(ORDER.index(dep) < ORDER.index(name) for dep in ALLOWED[name])  # the table itself is one-way
    extra = our_imports(name) - ALLOWED[name]
    assert not extra, f"{name}.py imports {sorted(extra)}, not allowed (allowed: {sorted(ALLOWED[name])})"


# ----------------------------------------------------------------------------------------------
# CI, skips, the GPU check

def test_ci_runs_the_readme_test_command():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text().splitlines()
    assert "&& python -m pytest " in readme  # the README's test command ...
    assert "python -m pytest" in ci  # ... is the line CI runs, with no flags of its own


def test_a_green_run_lists_its_skips_and_why(tmp_path):
    """pytest exits 0 when tests skip; with the project's pytest.ini it at least says which, and why."""
    (tmp_path / "test_gpu.py").write_text("import pytest\n\n\n@pytest.mark.skip(reason='needs CUDA')\n"
                                         "def test_kernel():\n    pass\n\n\ndef test_cpu():\n    pass\n")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(ROOT / "pytest.ini"),
           "--rootdir", str(tmp_path), str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout
    assert "SKIPPED [1] " in done.stdout and "needs CUDA" in done.stdout, done.stdout


@background
def gpu_check_dry_runs(folder):
    """DRY_RUN=1 bash tools/gpu_check.sh, calls 1 and 2 -> {call: (the finished script, its DEST)}; nothing
    where a GPU is (there the steps would really run)."""
    if torch.cuda.is_available():
        return None
    done = {}
    for call in ("1", "2"):
        env = {**os.environ, "DRY_RUN": "1", "GPU_CHECK_WORK": str(folder / f"work{call}"),
               "PYTHON": sys.executable}
        dest = folder / f"dest{call}"
        done[call] = run_in_background(["bash", ROOT / "tools" / "gpu_check.sh", call, dest], timeout=120,
                                       env=env, cwd=ROOT), dest
    return done


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the check's steps would really run")
@pytest.mark.parametrize("call,steps", [("1", ["env", "build", "tests", "bench"]),
                                        ("2", ["env", "paths", "study"])])
def test_the_gpu_check_without_a_gpu_fails_each_step_fast_in_one_line(call, steps, gpu_check_dry_runs):
    """DRY_RUN=1 runs every step although the env step failed: each must fail at once, not wait on a lock or
    a timeout, and the call must still leave its archive with the summary."""
    done, dest = gpu_check_dry_runs[call]
    assert done.returncode == 1, done.stdout + done.stderr
    outcomes = re.findall(r"^\d\d:\d\d:\d\d (\w+): (exit 1 after|skipped)", done.stdout, re.MULTILINE)
    assert [name for name, _ in outcomes] == steps, done.stdout
    with tarfile.open(dest / f"gpu-check-{call}.tar.gz") as archive:
        assert f"call{call}/summary.txt" in archive.getnames()


# ----------------------------------------------------------------------------------------------
# README commands cannot drift: each one's script exists and its flags parse with the script's own argparse.
# The script runs as `python script flags` (runpy) up to its first parse_args or parse_known_args, which
# then raises Parsed: nothing after parsing runs. Flags of train.py (also under torchrun, after a study's --,
# and the rest of a parse_known_args) then go through runner.parse, and a study's whole plan through
# runner.study_plan, which refuse unknown strategies, tasks and bases as the real commands would.

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


class Parsed(BaseException):
    """What a script's argparse parsed: raised right after parsing, so that nothing after it runs."""

    def __init__(self, namespace, rest):
        super().__init__()
        self.namespace, self.rest = namespace, rest


def doc_commands(path):
    """Every `python`, `python3`, `torchrun` and `bash` command in a markdown file's code blocks and code
    spans -> [(script, its arguments, the command as written)], pytest and pip left out."""
    text = path.read_text()
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))
    found = []
    for line in (line for snippet in blocks + spans for line in snippet.splitlines()):
        for part in re.split(r"&&|;|\|", line):
            if not re.match(r"\s*([A-Z_]+=\S*\s+)*(python3?|torchrun|bash)\s", part):
                continue  # not a command: output, code, prose
            words = shlex.split(part, comments=True)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # OMP_NUM_THREADS=1 python ...
                words.pop(0)
            if not words or words[0] not in ("python", "python3", "torchrun", "bash"):
                continue
            if words[0].startswith("python") and (len(words) < 2 or words[1] in ("-m", "-c")):
                continue  # python -m pytest, python -c ...: no script of ours
            script = next((i for i, w in enumerate(words) if w.endswith((".py", ".sh"))), None)
            if script is not None:
                found.append((words[script], [w for w in words[script + 1:] if w != "..."], part.strip()))
    return found


def parse_only(script, args, monkeypatch):
    """`python script args`, up to its argparse -> Parsed (what it parsed), or None if the script has none.
    An argparse error comes out as SystemExit 2 (train.py's as runner.CLIError, which its main turns into
    exit code 2)."""
    if not re.search(r"parse(_args|_known_args)?\(", (ROOT / script).read_text()):  # runner.parse too
        return None  # no parser: it would run (tools/bench_attention.py), or read sys.argv itself
    parser = argparse.ArgumentParser
    parse_args, parse_known_args = parser.parse_args, parser.parse_known_args
    depth = [0]  # parse_args calls parse_known_args: only the outermost call stops the script

    def stopping(parse):
        def parse_then_stop(self, args=None, namespace=None):
            depth[0] += 1
            try:
                parsed = parse(self, args, namespace)
            finally:
                depth[0] -= 1
            if depth[0] == 0:
                raise Parsed(*(parsed if isinstance(parsed, tuple) else (parsed, [])))
            return parsed
        return parse_then_stop
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stopping(parse_args))
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", stopping(parse_known_args))
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), *args])
    environ = dict(os.environ)  # train.py sets OMP_WAIT_POLICY as it loads, a tool TQDM_DISABLE
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except Parsed as parsed:
        return parsed
    finally:
        os.environ.clear()
        os.environ.update(environ)
        monkeypatch.undo()
    raise AssertionError("the script ran to its end without parsing its flags")


def command_errors(paths, monkeypatch):
    """Every command in these markdown files that does not parse -> one line each, naming it."""
    errors = []
    for path in paths:
        for script, args, written in doc_commands(path):
            if not (ROOT / script).is_file():
                errors.append(f"{path.name}: `{written}`: there is no {script}")
                continue
            if script.endswith(".sh"):
                continue  # bash: the script exists; its dry run is checked above
            try:
                parsed = parse_only(script, args, monkeypatch)
                if parsed is None:
                    continue
                extra = args[args.index("--") + 1:] if "--" in args else []
                if Path(script).name == "train.py":
                    runner.parse(args)
                elif Path(script).name == "study.py":  # flags after -- go to every train.py run
                    names, bases = parsed.namespace.strategies.split(","), parsed.namespace.bases.split(",")
                    runner.study_plan(parsed.namespace, names, bases, extra)
                elif parsed.rest:  # what the script's own parser left: train.py flags (tools/probe_lookup.py)
                    runner.parse(parsed.rest)
            except SystemExit as e:
                if e.code:
                    errors.append(f"{path.name}: `{written}`: argparse refused it (exit {e.code})")
            except Exception as e:  # runner.CLIError, or anything a script raised before its parser was done
                errors.append(f"{path.name}: `{written}`: {type(e).__name__}: {e}")
    return errors


def test_every_command_in_the_readme_and_docs_parses(monkeypatch, capsys):
    commands = [c for path in DOCS for c in doc_commands(path)]
    assert len(commands) > 20 and any(s == "study.py" and "--" in a for s, a, _ in commands)  # found them
    errors = command_errors(DOCS, monkeypatch)
    assert errors == [], "\n".join(errors) + "\n" + capsys.readouterr().err[-2000:]


def test_a_command_that_drifted_is_caught(tmp_path, monkeypatch):
    """The check above can fail: README commands, each broken one way, are refused one line each."""
    good = ["python train.py --strategy replay", "python study.py --seeds 1 -- --steps 20",
            "python tools/mutants.py --list", "torchrun --nproc_per_node=2 train.py --strategy replay"]
    bad = ["python train.py --strategy replay --no-such-flag", "python train.py --strategy no-such-strategy",
           "python study.py --seeds 1 -- --no-such-flag", "python study.py --no-such-flag",
           "OMP_NUM_THREADS=1 python tools/bench_train.py --no-such-flag", "python tools/no_such_tool.py",
           "torchrun --nproc_per_node=2 train.py --no-such-flag"]
    readme = tmp_path / "README.md"
    readme.write_text("```\n" + "\n".join(good) + "\n```\n\n" + "".join(f"Run `{c}`.\n" for c in bad))
    errors = command_errors([readme], monkeypatch)
    assert len(errors) == len(bad), "\n".join(errors)
    for command, error in zip(bad, errors):
        assert f"`{command}`" in error, error
