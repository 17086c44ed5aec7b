"""The names the README and docs/ give in code spans exist: every `slimserve ...` command and
its flags, every `--flag`, every repository path and every `Class.attr` of the code. A renamed
flag, file or method fails here instead of leaving a stale claim behind."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from slimserve.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Spans that are another tool's command line: their flags are that tool's.
FOREIGN = ("llama-server", "llama-bench", "pip", "python", "pytest", "nginx", "ray", "docker")

SPAN = re.compile(r"`([^`\n]+)`")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
PATH = re.compile(
    r"(?<![\w/.~<>-])((?:slimserve|tests|scripts|docs|recipes|examples|proto)/[\w./-]*)"
)
PRIVATE = re.compile(r"(_[A-Za-z]\w*)(?:\(\))?")
ATTR = re.compile(r"([A-Z]\w*)\.([A-Za-z_]\w*)(?:\(.*\))?")


def _spans() -> list[tuple[str, str]]:
    return [(doc.name, span) for doc in DOCS for span in SPAN.findall(doc.read_text())]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    flags = {s for a in parser._actions for s in a.option_strings}
    for sub in _subparsers(parser).values():
        flags |= _flags(sub)
    return flags


def _command(words: list[str]) -> tuple[argparse.ArgumentParser, str]:
    """The parser of `slimserve WORDS...` and the path walked ("" when a word is no command)."""
    parser = build_parser()
    walked = ["slimserve"]
    for word in words:
        subs = _subparsers(parser)
        if not subs or word.startswith("-"):
            break
        if word not in subs:
            return parser, ""
        parser = subs[word]
        walked.append(word)
    return parser, " ".join(walked)


def _sources() -> dict[Path, str]:
    return {p: p.read_text() for p in (ROOT / "slimserve").rglob("*.py")}


def test_the_docs_have_code_spans() -> None:
    spans = _spans()
    assert len(spans) > 100 and any(FLAG.search(s) for _, s in spans)


def _script_flags() -> set[str]:
    """Flags the scripts/ programs declare: `add_argument("--x"` in Python, a test
    `[ "$arg" = --x ]` in shell."""
    declared = re.compile(
        r"""add_argument\(\s*["'](--[a-z][a-z0-9-]*)|\[ "\$\w+" = (--[a-z][a-z0-9-]*) \]"""
    )
    return {
        f
        for p in (ROOT / "scripts").iterdir()
        if p.is_file()
        for pair in declared.findall(p.read_text(errors="replace"))
        for f in pair
        if f
    }


@pytest.mark.parametrize("doc", [d.name for d in DOCS])
def test_commands_and_flags_in_the_docs_exist(doc: str) -> None:
    every_flag = _flags(build_parser()) | _script_flags()
    stale = []
    for name, span in _spans():
        if name != doc or span.split()[0] in FOREIGN:
            continue
        words = span.split()
        if words[0] == "slimserve" and len(words) > 1:
            parser, walked = _command(words[1:])
            if not walked:
                stale.append(f"{span!r}: no such command")
                continue
            known = _flags(parser)
        else:
            known = every_flag
        stale += [f"{span!r}: no flag {f}" for f in FLAG.findall(span) if f not in known]
    assert not stale, f"{doc}: " + "; ".join(stale)


@pytest.mark.parametrize("doc", [d.name for d in DOCS])
def test_paths_and_code_names_in_the_docs_exist(doc: str) -> None:
    sources = _sources()
    stale = []
    for name, span in _spans():
        if name != doc:
            continue
        for path in PATH.findall(span):
            if not (ROOT / path.split("::")[0].rstrip(".,:")).exists():
                stale.append(f"{span!r}: no file {path}")
        m = PRIVATE.fullmatch(span)
        if m is not None and not any(re.search(rf"\b{m[1]}\b", t) for t in sources.values()):
            stale.append(f"{span!r}: no such name in slimserve/")
        if (m := ATTR.fullmatch(span)) is not None:
            cls, attr = m.groups()
            homes = [t for t in sources.values() if re.search(rf"^\s*class {cls}\b", t, re.M)]
            # A class of another library (torch, llama.cpp, ...) is not ours to check; ours
            # names the attribute in the module that defines it.
            if homes and not any(re.search(rf"\b{attr}\b", t) for t in homes):
                stale.append(f"{span!r}: {cls} has no {attr}")
    assert not stale, f"{doc}: " + "; ".join(stale)
