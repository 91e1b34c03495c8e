"""The README and docs/ say what the code does: every command they show parses, every flag they
name exists, every relative link resolves.

Each `python <script>.py …` / `torchrun … <script>.py …` command, in a code block or in inline
code, goes through its script's own argument parser (nothing runs): a flag that was renamed or
removed fails here, not in a user's terminal.
"""
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

import ablation
import bench
import evaluate
import prepare_coco
from config import ConfigError, parse_config

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
# Scripts kept outside this repository that a page may name (not parsed here).
EXTERNAL_SCRIPTS = {"release_step.py"}
# Flags of the launchers and tools around the scripts.
LAUNCHER_FLAGS = {"--nproc_per_node", "--nnodes", "--node_rank", "--master_addr", "--master_port",
                  "--standalone", "--rdzv_backend", "--rdzv_endpoint"}


def parse_train(argv):
    parse_config(argv)


def parse_ablation(argv):
    _, train_flags = ablation.parse_args(argv)
    parse_config(train_flags)               # what ablation.py passes on goes to train.py


PARSERS = {"train.py": parse_train, "evaluate.py": evaluate.parse_args,
           "bench.py": bench.parse_args, "ablation.py": parse_ablation,
           "prepare_coco.py": prepare_coco.parse_args}


def check_command(command: str) -> None:
    """Parse one shell command line with its script's parser; AssertionError if it is refused.
    Optional parts written `[--seed 1]` are kept; of alternatives `[a | b]` or `5|3`, the first."""
    command = re.sub(r"\[([^\]|]*)(\|[^\]]*)?\]", r"\1", command)
    words = shlex.split(command, comments=True)
    words = [w.split("|")[0] if re.fullmatch(r"[\w.-]+(\|[\w.-]+)+", w) else w for w in words]
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):      # VAR=value prefixes
        words.pop(0)
    if words[:1] == ["torchrun"]:
        words.pop(0)
        while words and words[0].startswith("-"):                      # torchrun's own flags
            words = words[1:] if "=" in words[0] or words[0] == "--standalone" else words[2:]
    elif words[:1] in (["python"], ["python3"]):
        words.pop(0)
    else:
        raise AssertionError(f"not a python/torchrun command: {command}")
    script, argv = Path(words[0]).name, words[1:]
    if script in EXTERNAL_SCRIPTS:
        return
    if script not in PARSERS:
        raise AssertionError(f"{command}: {script} is not a script of this repository with a "
                             f"command line ({', '.join(PARSERS)})")
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            PARSERS[script](argv)
    except SystemExit as e:
        if e.code == 0:                                                 # --help
            return
        raise AssertionError(f"{command}\n  is refused by {script}: {err.getvalue().strip()}") from e
    except (ConfigError, ablation.AblationError) as e:
        raise AssertionError(f"{command}\n  is refused by {script}: {e}") from e


def code_blocks(text: str) -> list:
    """(fenced code block contents) of a Markdown page."""
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M)


def inline_code(text: str) -> list:
    without_blocks = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    # a span may wrap onto the next line of the paragraph
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", without_blocks)]


def commands(text: str) -> list:
    """Every python/torchrun command of a page: block lines (with their continuations) and inline
    spans that start with `python X.py` or `torchrun`."""
    found = []
    for block in code_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if re.match(r"([A-Z_][A-Z0-9_]*=\S*\s+)*(python3? [\w/]+\.py|torchrun)\b", line):
                found.append(line)
    for span in inline_code(text):
        if re.match(r"([A-Z_][A-Z0-9_]*=\S*\s+)*(python3? [\w/]+\.py|torchrun)\b", span):
            found.append(span)
    return found


def page_commands():
    return [pytest.param(command, id=f"{page.name}: {command[:60]}")
            for page in PAGES for command in commands(page.read_text())]


def test_the_readme_has_the_commands_a_newcomer_runs():
    text = (ROOT / "README.md").read_text()
    found = commands(text)
    assert "python train.py" in found
    assert any(c.startswith("torchrun --nproc_per_node") for c in found)
    assert "python -m pytest -q" in inline_code(text) + [
        line.strip() for b in code_blocks(text) for line in b.splitlines()]


@pytest.mark.parametrize("command", page_commands())
def test_every_command_of_the_pages_parses(command):
    check_command(command)


@pytest.mark.parametrize("command", [
    "python train.py --no-such-flag",
    "python train.py --iter 10",                    # flags are never abbreviated
    "torchrun --nproc_per_node 2 train.py --data VOC2012 --batch-sise 4",
    "python evaluate.py --checkpoint x.pth --no-such-flag",
    "python bench.py --crops 320 --no-such-flag",
    "python ablation.py --rows par --no-such-flag",   # passed on to train.py, which refuses it
    "python prepare_coco.py --coco-root c --no-such-flag",
    "python visualize.py --checkpoint x.pth",         # no command line
    "python train.py --cam-iters 3 --switch-iters 2",  # contradictory: refused before running
])
def test_a_command_with_a_flag_that_does_not_exist_fails(command):
    with pytest.raises(AssertionError):
        check_command(command)


def known_flags() -> set:
    """Every --flag of every script's --help, and of the launchers."""
    flags = set(LAUNCHER_FLAGS)
    for name, parse in PARSERS.items():
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            {"ablation.py": ablation.parse_args}.get(name, parse)(["--help"])
        flags |= set(re.findall(r"--[a-z][a-z0-9_-]*", out.getvalue()))
    return flags


def test_every_flag_named_in_the_pages_exists():
    """Flags in prose and tables (`--seg-label par`, `--no-speed-paths`) exist in some script."""
    known = known_flags()
    unknown = {}
    for page in PAGES:
        text = page.read_text()
        # (a quoted error message may name a mistyped flag)
        spans = [s for s in inline_code(text) + code_blocks(text)
                 if "error:" not in s and not any(x in s for x in EXTERNAL_SCRIPTS)]
        for flag in set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]", " ".join(spans))):
            if flag not in known:
                unknown.setdefault(page.name, []).append(flag)
    assert not unknown, f"flags that no script has: {unknown}"


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue                                      # web links and anchors
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)} → {target}")
    assert not broken, f"links to files that do not exist: {broken}"


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
