"""The docs stay true: every command in README.md and docs/*.md parses with its script's own argparse parser,
every relative link and every named repository file exists, and every test a page names is a test.

A command is a `python SCRIPT ...` / `python3 SCRIPT ...` / `torchrun [opts] SCRIPT ...` line of a fenced code
block (backslash continuations joined) or an inline code span, where SCRIPT is a Python file of the repository
(the stages NN_*.py, experiments/, bench/). The script's parser is captured without running the script: its
`parse_args` (or `main`, for the bench scripts that build their parser there) is called with
ArgumentParser.parse_args patched to hand back the parser instead of parsing, so no model loads and no
post-parse check (a file that must exist) runs. The command's arguments are then parsed by that parser: an
unknown or renamed flag, a wrong choice or a missing value fails here, as it would for the user.
"""
import argparse
import importlib.util
import re
import shlex
import sys
from functools import lru_cache
from pathlib import Path

import pytest

from conftest import ROOT

PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
# Pages written on another branch that a link may name before they are merged (none now).
PENDING: set[str] = set()
# Folders whose files a page may name in backticks (outputs live under runs/, which is not checked).
REPO_DIRS = ("tests", "experiments", "bench", "docs", "data", "envs", ".ci")

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
LAUNCHER = re.compile(r"^(python3?|torchrun)$")


def page_text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def commands(text: str) -> list[str]:
    """Command lines of a page: fenced-block lines (continuations joined) and inline spans, split at && ; |."""
    lines = []
    for block in FENCE.findall(text):
        lines += block.replace("\\\n", " ").splitlines()
    lines += INLINE.findall(FENCE.sub("", text))
    out = []
    for line in lines:
        for part in re.split(r"&&|;|\|\|?", line.split(" #")[0]):
            if re.search(r"(^|\s)(python3?|torchrun)\s", part + " "):
                out.append(part.strip())
    return out


def script_and_args(cmd: str):
    """(repository script, its arguments) of a command, or None when it runs no repository script."""
    try:
        toks = shlex.split(cmd)
    except ValueError as e:
        raise AssertionError(f"cannot split {cmd!r}: {e}") from None
    while toks and re.match(r"^[A-Z_][A-Z0-9_]*=", toks[0]):  # OMP_NUM_THREADS=1 ...
        toks = toks[1:]
    if not toks or not LAUNCHER.match(toks[0]):
        return None
    i = 1
    if toks[0] == "torchrun":
        while i < len(toks) and toks[i].startswith("-"):  # torchrun's own options, --opt=value form
            i += 1
    elif i < len(toks) and toks[i] == "-m":
        return None
    if i >= len(toks) or not toks[i].endswith(".py") or "*" in toks[i]:  # "python NN_*.py": a pattern, not a command
        return None
    return toks[i], toks[i + 1:]


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


@lru_cache(maxsize=None)
def script_parser(script: str) -> argparse.ArgumentParser:
    """The script's own parser, built by its code but not run (see the module docstring)."""
    path = ROOT / script
    assert path.exists(), f"{script}: no such script"
    spec = importlib.util.spec_from_file_location(f"docs_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    build = getattr(mod, "parse_args", None) or getattr(mod, "main")

    def capture(self, args=None, namespace=None):
        raise _Captured(self)

    real, argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_args, capture
    try:
        try:
            build([])
        except TypeError:  # parse_args() / main() without an argv parameter
            build()
    except _Captured as c:
        return c.parser
    finally:
        argparse.ArgumentParser.parse_args = real
    raise AssertionError(f"{script}: its parse_args/main built no parser")


def parse_failure(parser: argparse.ArgumentParser, args: list[str]) -> str | None:
    """The parser's error message for args, or None when they parse."""
    def error(message):
        raise _Captured(message)

    parser.error = error  # argparse reports every bad argument through error() (prints and exits otherwise)
    args = [a for a in args if a not in ("-h", "--help")]  # `python NN_x.py --help` is a command the docs show
    try:
        parser.parse_args(args)
    except _Captured as c:
        return str(c.parser)
    except SystemExit as e:  # e.g. --help
        return f"exited {e.code}"
    # argparse also takes an unambiguous prefix of a flag (--prompts-per for --prompts-per-step): the docs spell flags whole
    for tok in args:
        flag = tok.split("=")[0]
        if re.match(r"^--?[A-Za-z]", flag) and flag not in parser._option_string_actions:
            return f"{flag} is not a flag of this script (an abbreviation?)"
    return None


def all_commands():
    for page in PAGES:
        for cmd in commands(page_text(page)):
            sa = script_and_args(cmd)
            if sa:
                yield page.relative_to(ROOT).as_posix(), cmd, *sa


CASES = list(all_commands())


def test_the_pages_have_stage_commands():
    """The extraction finds the commands (a regex that matched nothing would make the next test vacuous)."""
    stages = {s for _, _, s, _ in CASES if re.match(r"^0\d_\w+\.py$", s)}
    assert stages == {"01_select.py", "02_simulate.py", "03_train_rm.py", "04_grpo.py", "05_rapo.py", "06_eval.py"}
    assert any(c.startswith("torchrun") for _, c, _, _ in CASES)
    assert any("\\" in block for p in PAGES for block in FENCE.findall(page_text(p)))  # continuations joined


@pytest.mark.parametrize("page,cmd,script,args", CASES, ids=[f"{p}:{c[:60]}" for p, c, _, _ in CASES])
def test_every_command_parses_with_its_scripts_parser(page, cmd, script, args):
    msg = parse_failure(script_parser(script), args)
    assert msg is None, f"{page}: `{cmd}`: {script} says: {msg}"


def test_relative_links_and_named_files_exist():
    missing = []
    for page in PAGES:
        text, rel = page_text(page), page.relative_to(ROOT).as_posix()
        for target in LINK.findall(text):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            name = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
            if not path.exists() and name not in PENDING:
                missing.append(f"{rel}: link {target}")
        for span in INLINE.findall(text):
            for tok in span.split():
                tok = tok.strip(",.;:()")
                file, _, test = tok.partition("::")
                first = file.split("/")[0]
                named = (first in REPO_DIRS and "/" in file) or re.match(r"^(\w+\.py|requirements[\w-]*\.txt)$", file)
                if not named or "*" in file or file in PENDING:
                    continue
                bare_elsewhere = "/" not in file and any(ROOT.glob(f"*/{file}"))  # e.g. conftest.py in tests/
                if not (ROOT / file).exists() and not bare_elsewhere:
                    missing.append(f"{rel}: file {file}")
                elif test and not re.search(rf"^def {re.escape(test.split('[')[0])}\(", (ROOT / file).read_text(), re.M):
                    missing.append(f"{rel}: test {tok}")
    assert not missing, "named in the docs but not in the repository:\n" + "\n".join(missing)


def section_of_tests(text: str) -> str:
    """The page's "## Tests" section (up to the next heading of that level), where tests are named bare."""
    m = re.search(r"^## Tests\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    return m.group(1) if m else ""


def test_named_tests_exist():
    """Every `test_...` a page's Tests section names (bare or as file::name) is a test function."""
    defined = set()
    for f in (ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)\(", f.read_text(), re.M))
    unknown = [f"{p.relative_to(ROOT).as_posix()}: {t}" for p in PAGES for span in INLINE.findall(section_of_tests(page_text(p)))
               for t in re.findall(r"(?:^|[\s:])(test_\w+)(?![\w.])", span) if t not in defined]
    assert not unknown, "tests named in the docs that do not exist:\n" + "\n".join(unknown)


STAGES = ("01_select.py", "02_simulate.py", "03_train_rm.py", "04_grpo.py", "05_rapo.py", "06_eval.py")


def test_flags_named_on_the_stage_pages_exist():
    """A flag a stage page names outside a command (its flag tables, its prose) is a flag of one of the stages: a
    renamed or removed flag fails here too, not only in the commands."""
    known = {"--nproc_per_node"}  # torchrun's
    for s in STAGES:
        known |= set(script_parser(s)._option_string_actions)
    unknown = []
    for page in sorted((ROOT / "docs").glob("0[1-6]_*.md")):
        for span in INLINE.findall(FENCE.sub("", page_text(page))):
            for flag in re.findall(r"(?:^|[\s(/])(--[a-z][a-z0-9-]*[a-z0-9])(?![\w<-])", span):
                if flag not in known:
                    unknown.append(f"{page.relative_to(ROOT).as_posix()}: {flag} (in `{span}`)")
    assert not unknown, "flags named on the stage pages that no stage has:\n" + "\n".join(unknown)


def test_committed_results_name_no_absolute_paths():
    """Result files in experiments/results/ name paths relative to the repository (experiments/repo_paths.py),
    never the absolute paths of the machine they ran on."""
    sys.path.insert(0, str(ROOT / "experiments"))
    from repo_paths import repo_relative

    got = repo_relative({"command": f"{sys.executable} {ROOT / '04_grpo.py'} --data {ROOT.parent / 'd.json'}",
                         "results": [str(ROOT / "experiments" / "results")], "text": "a /s reply </think>", "n": 3})
    assert got == {"command": "python 04_grpo.py --data ../d.json", "results": ["experiments/results"],
                   "text": "a /s reply </think>", "n": 3}
    found = []
    for f in sorted((ROOT / "experiments" / "results").iterdir()):
        if f.suffix in (".json", ".csv", ".md", ".log", ".txt"):
            for m in re.finditer(r"(?<![\w.~])/(?:work|root|home|tmp|Users|mnt|data|opt|srv)/[^\s\"']*", f.read_text()):
                found.append(f"{f.name}: {m.group(0)}")
    assert not found, "absolute paths in committed result files:\n" + "\n".join(found[:20])


def test_named_functions_exist():
    """A `module.name` a page names (common.load_dialogues, speed.shared_prefix_logits, ...) is defined in that module
    of the repository: a function that moved or was renamed fails here."""
    modules = {p.stem: p for p in ROOT.glob("*.py") if not p.stem[0].isdigit()}
    missing = []
    for page in PAGES:
        for span in INLINE.findall(page_text(page)):
            m = re.fullmatch(r"(\w+)\.([A-Za-z_]\w*)(?:\.\w+)?(?:\(.*\))?", span.strip())
            if not m or m.group(1) not in modules or m.group(2) == "py":  # common.py is a file (checked above)
                continue
            if not re.search(rf"^(?:def|class) {m.group(2)}\b|^{m.group(2)}\s*[:=]", modules[m.group(1)].read_text(), re.M):
                missing.append(f"{page.relative_to(ROOT).as_posix()}: {span}")
    assert not missing, "named in the docs but not defined there:\n" + "\n".join(missing)
