"""Every code block in README.md and docs/*.md runs as written.

- ```python blocks run per file, in order, in one namespace per file (like a notebook): a block may
  use names defined by the blocks above it in the same file, never names from another file. Each
  file runs in a fresh temporary working directory (training examples write runs/ there).
- ```bash blocks are checked, not run: the whole block must pass ``bash -n``; every
  ``gift-fast ...`` command is parsed by the CLI's own parser and its settings validated (paths
  given to --resume / --warm-start are not looked up); ``python -m <module>`` must name an
  importable module; pip lines are not run. A ``|`` after a gift-fast command fails: a list of
  alternatives written ``a|b`` is a shell pipe when pasted.
- A block opts out only with a first line ``# docs-test: skip <reason>`` (a reason is required);
  each opt-out is reported as a skipped test with its reason, so ``pytest -ra`` counts them.

New blocks (other sections, other docs/*.md files) are picked up automatically.
"""
from __future__ import annotations

import pathlib
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from typing import List

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
SKIP_MARKER = re.compile(r"^#\s*docs-test:\s*skip\b\s*(.*)$")
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass
class Block:
    path: pathlib.Path
    line: int          # 1-based line of the opening fence
    lang: str
    source: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def skip_reason(self):
        first = self.source.lstrip("\n").splitlines()[0] if self.source.strip() else ""
        m = SKIP_MARKER.match(first.strip())
        return None if m is None else m.group(1).strip()


def code_blocks(path: pathlib.Path) -> List[Block]:
    blocks, lang, start, body = [], None, 0, []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = FENCE.match(line.strip()) if line.startswith("```") else None
        if lang is None and m is not None:
            lang, start, body = m.group(1).lower(), i, []
        elif lang is not None and line.strip() == "```":
            blocks.append(Block(path, start, lang, "\n".join(body) + "\n"))
            lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, f"{path}: unclosed code fence opened at line {start}"
    return blocks


ALL_BLOCKS = [b for p in DOC_FILES for b in code_blocks(p)]
PYTHON_FILES = sorted({b.path for b in ALL_BLOCKS if b.lang == "python"})
BASH_BLOCKS = [b for b in ALL_BLOCKS if b.lang in ("bash", "sh", "shell", "console")]


def test_docs_have_code_blocks():
    """The collector works (a parsing regression would otherwise make every check vacuous)."""
    assert any(b.path.name == "README.md" and b.lang == "python" for b in ALL_BLOCKS)
    assert any(b.lang == "bash" for b in ALL_BLOCKS)


def test_opt_outs_give_a_reason():
    for b in ALL_BLOCKS:
        if b.skip_reason is not None:
            assert b.skip_reason, f"{b.where}: '# docs-test: skip' needs a reason after it"


@pytest.mark.parametrize("path", PYTHON_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    skipped = []
    for b in (b for b in code_blocks(path) if b.lang == "python"):
        if b.skip_reason is not None:
            skipped.append(f"{b.where}: {b.skip_reason}")
            continue
        code = compile(b.source, b.where, "exec")
        try:
            exec(code, namespace)
        except Exception as exc:  # name the block, keep the original traceback
            raise AssertionError(f"python block at {b.where} failed: {exc!r}") from exc
    if skipped:
        pytest.skip(f"{len(skipped)} opted-out python block(s): " + "; ".join(skipped))


def _commands(source: str) -> List[List[str]]:
    """Shell words of each simple command of a block, split at ``&&``, ``||``, ``;``, ``|``, ``&``
    (written as separate words) and line ends (continuations joined, comments dropped); a ``|``
    is kept as its own command."""
    commands = []
    for line in source.replace("\\\n", " ").splitlines():
        current = []
        for word in shlex.split(line, comments=True):
            if word in ("&&", "||", ";", "|", "&"):
                if current:
                    commands.append(current)
                if word == "|":
                    commands.append(["|"])
                current = []
            else:
                current.append(word)
        if current:
            commands.append(current)
    return commands


def _check_gift_fast(argv: List[str], where: str) -> None:
    from gift_fast.cli import _parse_compare, build_parser, config_from_args
    from gift_fast.train.config import validate
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"{where}: `gift-fast {' '.join(argv)}` is rejected by the CLI "
                             "parser (see stderr)") from exc
    if args.command != "train":
        return
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    try:
        losses = _parse_compare(train_parser, args.compare)
    except SystemExit as exc:
        raise AssertionError(f"{where}: --compare {args.compare!r} is rejected") from exc
    cfg = config_from_args(args).replace(resume=None, warm_start=None)
    for loss in losses or [cfg.loss]:
        validate(cfg.replace(loss=loss))


@pytest.mark.parametrize("block", BASH_BLOCKS, ids=lambda b: b.where)
def test_bash_blocks_parse(block):
    if block.skip_reason is not None:
        pytest.skip(f"opted out at {block.where}: {block.skip_reason}")
    if shutil.which("bash"):
        r = subprocess.run(["bash", "-n"], input=block.source, text=True, capture_output=True)
        assert r.returncode == 0, f"{block.where}: bash -n: {r.stderr}"
    commands = _commands(block.source)
    for prev, cmd in zip([None] + commands[:-1], commands):
        if cmd == ["|"]:
            assert prev is None or prev[0] != "gift-fast", \
                f"{block.where}: `{' '.join(prev)} | ...` is a shell pipe; list alternatives in prose"
            continue
        words = [w for w in cmd if not re.match(r"^\w+=", w)]   # drop VAR=value prefixes
        if not words:
            continue
        if words[0] == "gift-fast":
            piped = [w for w in words if "|" in w]
            assert not piped, (f"{block.where}: {piped[0]!r} in a gift-fast command is a shell pipe "
                               "when pasted; list alternatives in prose")
            _check_gift_fast(words[1:], block.where)
        elif words[0] in ("python", "python3") and words[1:2] == ["-m"]:
            module = words[2]
            if module == "pip":
                continue          # installs are not run
            import importlib.util
            assert importlib.util.find_spec(module) is not None, \
                f"{block.where}: python -m {module}: no such module"
