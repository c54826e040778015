"""Every command the documentation shows runs as written.

The fenced ``bash`` blocks of README.md, of docs/*.md and of the files the docs include
(``include-markdown``) are split into simple commands: each ``iwae ...`` (also after
``VAR=value`` prefixes, and ``torchrun ... -m iwae.cli ...``) must parse with the CLI's own
parser, and each ``python FILE``/``bash FILE`` must name a file of the repository. The
README's quickstart and Python API example then run, on a tiny budget substituted into
them, on the real MNIST.
"""

import argparse
import re
import shlex
from pathlib import Path

import pytest

from iwae.cli import build_parser, main, options

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
INCLUDE = re.compile(r"include-markdown\s+\"([^\"]+)\"")
OPERATORS = {"&&", "||", ";", "&", "|"}


def documents() -> list[Path]:
    """README.md, docs/**/*.md and every file a docs page includes."""
    pages = sorted((ROOT / "docs").rglob("*.md"))
    included = {
        (page.parent / name).resolve()
        for page in pages
        for name in INCLUDE.findall(page.read_text(encoding="utf-8"))
    }
    return [README, *pages, *sorted(included)]


def blocks(path: Path, language: str) -> list[str]:
    """The fenced blocks of ``language`` in a Markdown file, in order."""
    text = path.read_text(encoding="utf-8")
    return [body for lang, body in FENCE.findall(text) if lang == language]


def logical_lines(block: str) -> list[str]:
    """A bash block's lines with continuations joined and here-document bodies left out."""
    lines, heredoc, pending = [], None, ""
    for line in block.splitlines():
        if heredoc is not None:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = pending + line, ""
        marker = re.search(r"<<-?\s*['\"]?(\w+)", line)
        heredoc = marker.group(1) if marker else None
        lines.append(line)
    return lines


def simple_commands(line: str) -> list[list[str]]:
    """The simple commands of one line (comments dropped, split at && || ; & |), each
    without its leading VAR=value assignments."""
    commands, current = [], []
    for token in shlex.split(line, comments=True):
        if token in OPERATORS:
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    stripped = []
    for tokens in commands:
        while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[0]):
            tokens = tokens[1:]
        if tokens:
            stripped.append(tokens)
    return stripped


def iwae_arguments(tokens: list[str]) -> list[str] | None:
    """The arguments after ``iwae`` of a command that runs the CLI, else None."""
    if tokens[0] == "iwae":
        return tokens[1:]
    if "-m" in tokens and tokens[0] in ("torchrun", "python", "python3"):
        i = tokens.index("-m")
        if tokens[i + 1 : i + 2] == ["iwae.cli"]:
            return tokens[i + 2 :]
    return None


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, tokens) of every simple command in the documents' bash blocks."""
    found = []
    for path in documents():
        for n, block in enumerate(blocks(path, "bash")):
            for line in logical_lines(block):
                for tokens in simple_commands(line):
                    found.append((f"{path.relative_to(ROOT)}[{n}]: {line.strip()}", tokens))
    return found


COMMANDS = documented_commands()
IWAE = [(where, iwae_arguments(t)) for where, t in COMMANDS if iwae_arguments(t) is not None]
FILES = [
    (where, tokens[1])
    for where, tokens in COMMANDS
    if iwae_arguments(tokens) is None
    and tokens[0] in ("python", "python3", "bash")
    and len(tokens) > 1
    and not tokens[1].startswith("-")
]


def test_the_documents_hold_the_commands_they_should():
    names = {Path(where.split("[")[0]).name for where, _ in IWAE}
    assert len(IWAE) >= 40 and {"README.md", "cli.md", "getting-started.md"} <= names
    subcommands = {args[0] for _, args in IWAE}
    assert subcommands >= {"train", "evaluate", "sample", "bdmc", "snr", "reproduce", "report"}
    assert any(path == "bench/run.py" for _, path in FILES)


def parser_of_the_docs() -> argparse.ArgumentParser:
    """The CLI's parser, less its check that a RUN_DIR exists (the docs' runs are examples)."""
    parser, checks = build_parser(), []
    stack = [parser]
    while stack:
        for action in stack.pop()._actions:
            if action.type is options._existing_run:
                action.type = Path
                checks.append(action)
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
    assert checks, "no RUN_DIR argument found: the test no longer matches the parser"
    return parser


@pytest.mark.parametrize("where, args", IWAE, ids=[where for where, _ in IWAE])
def test_every_iwae_command_parses(where, args, capsys):
    try:
        parser_of_the_docs().parse_args(args)
    except SystemExit as e:
        pytest.fail(f"{where}\n{capsys.readouterr().err.strip()} (exit {e.code})")


@pytest.mark.parametrize("where, path", FILES, ids=[where for where, _ in FILES])
def test_every_script_the_docs_run_exists(where, path):
    assert (ROOT / path).is_file(), where


def test_a_command_that_does_not_parse_is_caught():
    """The check above fails on a command the parser refuses."""
    with pytest.raises(SystemExit):
        parser_of_the_docs().parse_args(simple_commands("iwae train --stages three")[0][1:])


def _section(path: Path, heading: str, language: str) -> str:
    """The first ``language`` block after ``heading`` in a Markdown file."""
    text = path.read_text(encoding="utf-8")
    start = text.index(f"\n{heading}\n")
    return next(body for lang, body in FENCE.findall(text[start:]) if lang == language)


def _substituted(text: str, replacements: dict[str, str]) -> str:
    """``text`` with each replacement made, failing where the documented text has changed."""
    for old, new in replacements.items():
        assert old in text, f"the test's substitution no longer matches: {old!r}"
        text = text.replace(old, new)
    return text


TINY_TRAINING = "--epochs 1 --n-train 200 --eval-n 20 --stage-nll-k 0 --quiet"


def test_the_readme_quickstart_runs(shared_data_dir, tmp_path, monkeypatch, capsys):
    """README's "Quickstart: MNIST", with a tiny budget in place of --stages 3 and L_100 on 20
    test images in place of L_5000 on 10,000."""
    block = _section(README, "## Quickstart: MNIST", "bash")
    block = _substituted(
        block,
        {
            "--stages 3 ": f"{TINY_TRAINING} ",
            "iwae evaluate runs/iwae-k5\n": "iwae evaluate runs/iwae-k5 --k 100 --n-test 20\n",
        },
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IWAE_DATA", str(shared_data_dir))
    commands = [tokens for line in logical_lines(block) for tokens in simple_commands(line)]
    assert commands[0] == ["export", "IWAE_DATA=../shared/data"]
    for tokens in commands[1:]:
        assert tokens[0] == "iwae" and main(tokens[1:]) == 0, tokens
    assert (tmp_path / "runs" / "iwae-k5" / "evaluation.json").is_file()
    assert (tmp_path / "samples.png").is_file()
    assert "test NLL (L_100, 20 images)" in capsys.readouterr().out


def test_the_readme_python_example_runs(shared_data_dir, tmp_path, monkeypatch, capsys):
    """README's Python API example (also on Getting started), on a tiny budget."""
    code = _section(README, "## The Python API", "python")
    assert code in (ROOT / "docs" / "getting-started.md").read_text(encoding="utf-8")
    code = _substituted(
        code,
        {
            "schedule=3,": "epochs=1, n_train=200, eval_n=20, stage_nll_k=0, progress=False,",
            'evaluate_model(model, "mnist")': 'evaluate_model(model, "mnist", k=100, n_test=20)',
        },
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IWAE_DATA", str(shared_data_dir))
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    assert "1 passes, test NLL" in capsys.readouterr().out
    assert (tmp_path / "runs" / "api-iwae-k5" / "summary.json").is_file()


def test_the_building_blocks_example_runs(capsys):
    """Getting started's example of log-weights and bounds, as written (no data needed)."""
    code = blocks(ROOT / "docs" / "getting-started.md", "python")[1]
    assert "Objective" in code
    exec(compile(code, "getting-started.md", "exec"), {"__name__": "building_blocks"})
    assert capsys.readouterr().out.strip()


def test_ci_runs_the_readmes_install_and_test_commands():
    """.ci/run installs with the README's line plus the docs extra, and runs its tests."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    readme = README.read_text(encoding="utf-8")
    install, tests = [body.strip() for lang, body in FENCE.findall(readme) if lang == "bash"][:2]
    assert install == 'pip install torch==2.13.0 -e ".[test,ray]"'
    assert install.replace('".[test,ray]"', '".[test,ray,docs]"') in ci
    assert tests in ci
