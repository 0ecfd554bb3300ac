"""The documentation cannot rot: its commands name real flags, its links resolve.

- Every ``helip ...`` command line in README.md and docs/*.md (fenced code blocks, and inline code
  spans that start with ``helip <subcommand>``), including ``torchrun ... -m helip.cli ...``, names a
  subcommand of helip's parser and only flags that subcommand (or the top-level parser) defines.
- Every ``python -m helip.open_clip_train ...`` line names only flags that entry point accepts; skipped
  while that module does not exist.
- Every relative link in the repository's Markdown files points at a file or directory that exists,
  and a ``#fragment`` at a heading of the target page.
"""
import contextlib
import importlib
import importlib.util
import io
import re
import runpy
import sys
import warnings
from unittest import mock
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP_DIRS = {".git", ".venv", "node_modules", "build", "demo_out", ".cache", ".pytest_cache"}

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE = re.compile(r"`([^`\n]+)`")
FLAG = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")
# "helip SUB", "python -m helip.cli SUB", "torchrun ... -m helip.app.cli SUB"
HELIP_CMD = re.compile(r"(?:^|[\s;&|(])(?:helip|-m\s+(helip(?:\.app)?\.cli))\s+(.*)$")
OCT_CMD = re.compile(r"-m\s+helip\.open_clip_train(?:\s+(.*))?$")


def build_parser():
    from helip.app.cli import build_parser as bp

    return bp()


def _code_lines(path: Path):
    """(line number, text) of every command line in fenced blocks (continuations joined) and of inline
    code spans; comments after ' #' dropped."""
    out, fenced, pending, start = [], False, "", 0
    for no, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            pending = ""
            continue
        if fenced:
            text = re.sub(r"\s#.*$", "", line).rstrip()
            if not pending:
                start = no
            if text.endswith("\\"):
                pending += text[:-1] + " "
                continue
            out.append((start, pending + text))
            pending = ""
        else:
            out.extend((no, span) for span in INLINE.findall(line))
    return out


def _helip_commands():
    cmds = []
    for page in DOC_PAGES:
        for no, text in _code_lines(page):
            text = text.strip().removeprefix("$ ")
            m = HELIP_CMD.search(text)
            if not m or "import" in text.split()[:2] or text.startswith(("from ", "import ")):
                continue
            rest = m.group(2).split()
            if not rest or not re.fullmatch(r"[a-z][a-z-]*", rest[0]):
                continue                         # "helip's", a bare word in prose: not a command
            cmds.append((f"{page.relative_to(ROOT)}:{no}", m.group(1), rest[0], " ".join(rest[1:])))
    return cmds


def _subparsers(parser):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            return action.choices
    raise AssertionError("helip's parser has no subcommands")


def test_docs_have_helip_commands():
    # the extraction itself must find the pages' commands, or the next test checks nothing
    subs = {sub for _, _, sub, _ in _helip_commands()}
    assert {"demo", "embed", "mine", "train", "eval", "report", "convert-slip"} <= subs, subs


def test_documented_helip_flags_exist():
    parser = build_parser()
    subs = _subparsers(parser)
    top = set(parser._option_string_actions)
    bad = []
    for where, module, sub, args in _helip_commands():
        if module and importlib.util.find_spec(module) is None:
            bad.append(f"{where}: `-m {module}` is not an importable module")
        if sub not in subs:
            bad.append(f"{where}: `helip {sub}` is not a helip subcommand ({', '.join(sorted(subs))})")
            continue
        known = set(subs[sub]._option_string_actions) | top
        bad += [f"{where}: `helip {sub}` has no flag {flag}" for flag in FLAG.findall(args) if flag not in known]
    assert not bad, "\n".join(bad)


def _open_clip_train_flags():
    if importlib.util.find_spec("helip.open_clip_train") is None:
        pytest.skip("helip.open_clip_train does not exist on this branch")
    mod = importlib.import_module("helip.open_clip_train")
    if hasattr(mod, "build_parser"):
        return set(mod.build_parser()._option_string_actions)
    # no parser object: read the flags off `--help`, as a user would (in this process: torch is loaded)
    out = io.StringIO()
    with mock.patch.object(sys, "argv", ["helip.open_clip_train", "--help"]), \
            contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)       # runpy: the module is already imported
        with pytest.raises(SystemExit) as exit_:
            runpy.run_module("helip.open_clip_train", run_name="__main__", alter_sys=True)
    assert exit_.value.code in (0, None), out.getvalue()[-2000:]
    flags = set(FLAG.findall(out.getvalue()))
    assert "--help" in flags, "`python -m helip.open_clip_train --help` printed no usage"
    return flags


def test_documented_open_clip_train_flags_exist():
    cmds = []
    for page in DOC_PAGES:
        for no, text in _code_lines(page):
            m = OCT_CMD.search(text)
            if m:
                cmds.append((f"{page.relative_to(ROOT)}:{no}", m.group(1) or ""))
    if not cmds:
        pytest.skip("no `python -m helip.open_clip_train` command in the docs")
    known = _open_clip_train_flags()
    bad = [f"{where}: python -m helip.open_clip_train has no flag {flag}"
           for where, args in cmds for flag in FLAG.findall(args) if flag not in known]
    assert not bad, "\n".join(bad)


# ----------------------------------------------------------------------------------------------- links

LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")


def _markdown_files():
    for path in sorted(ROOT.rglob("*.md")):
        if not SKIP_DIRS.intersection(path.relative_to(ROOT).parts):
            yield path


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\*|_(?=\w)|(?<=\w)_", "", heading.strip()).lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path):
    anchors, fenced = set(), False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and (m := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)):
            slug, n = _slug(m.group(1)), 0
            while (slug if n == 0 else f"{slug}-{n}") in anchors:
                n += 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _links(path: Path):
    fenced = False
    for no, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        for m in LINK.finditer(re.sub(r"`[^`]*`", "", line)):
            yield no, m.group(1) or m.group(2)


def test_markdown_files_found():
    names = {p.relative_to(ROOT).as_posix() for p in _markdown_files()}
    assert {"README.md", "docs/README.md", "benchmarks/RESULTS.md"} <= names


def test_relative_links_resolve():
    bad = []
    for page in _markdown_files():
        for no, target in _links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):       # http:, https:, mailto:
                continue
            file_part, _, fragment = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            where = f"{page.relative_to(ROOT)}:{no}"
            if not dest.exists():
                bad.append(f"{where}: link to {target} (no such file)")
            elif fragment and dest.is_file() and dest.suffix == ".md" and fragment not in _anchors(dest):
                bad.append(f"{where}: link to {target} (no heading #{fragment} in {dest.name})")
    assert not bad, "\n".join(bad)


def test_slug_follows_github():
    assert _slug("Hard Negative Margin Loss (HNML)") == "hard-negative-margin-loss-hnml"
    assert _slug("results.json") == "resultsjson"
    assert _slug("Several GPUs (DDP)") == "several-gpus-ddp"
    assert _slug("Checkpoints and resume") == "checkpoints-and-resume"
