"""The README and docs/ stay true: their relative links resolve (files and #anchors),
every example is linked, the README's Quick start has the two commands and its test
command is the one CI runs (``.ci/run``), every ``shmalloc`` command and option of the
real parser is documented in docs/cli.md and nothing there is invented, the Python
blocks compile, and the README's zone and mbuf examples run.  No process is spawned.
"""

import argparse
import pathlib
import re
import shlex
import unicodedata

import pytest

from shmalloc.scripts.cli import _parser

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, ROOT / "CHANGELOG.md", *DOCS]
CLI_DOC = ROOT / "docs" / "cli.md"

FENCE = re.compile(r"^```.*?^```", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
PY_BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)


def _prose(text):
    """``text`` without its fenced code blocks and inline code spans."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def _slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to -."""
    s = heading.strip().lower()
    s = "".join(c for c in s if c in " -_" or unicodedata.category(c)[0] in "LN")
    return s.replace(" ", "-")


def _anchors(path):
    seen, out = {}, set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"#{1,6} (.*)", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links(path):
    """(target path, anchor or None) of every relative link on page ``path``."""
    out = []
    for target in LINK.findall(_prose(path.read_text())):
        if re.match(r"[a-z]+:", target):           # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        out.append(((path.parent / file).resolve() if file else path, anchor or None))
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    for target, anchor in _links(page):
        assert target.exists(), f"{page.name}: link to missing {target}"
        if anchor is not None and target.suffix == ".md":
            assert anchor in _anchors(target), f"{page.name}: no #{anchor} in {target.name}"


def test_every_example_is_linked_from_the_readme_or_the_buffers_page():
    linked = {t for page in (README, ROOT / "docs" / "buffers.md") for t, _ in _links(page)}
    for example in sorted((ROOT / "examples").glob("*.py")):
        assert example.resolve() in linked, f"examples/{example.name} is linked nowhere"


def test_the_readme_pastes_no_example():
    readme = README.read_text()
    for example in sorted((ROOT / "examples").glob("*.py")):
        body = example.read_text().split('"""', 2)[-1].strip()
        assert body not in readme, f"README pastes examples/{example.name}: link it"


def test_every_page_is_listed_in_the_index_and_the_readme():
    for listing in (ROOT / "docs" / "index.md", README):
        linked = {t for t, _ in _links(listing)}
        for page in DOCS:
            if page.name != "index.md" or listing == README:
                assert page.resolve() in linked, f"{listing.name} does not link {page.name}"
    assert (ROOT / "CHANGELOG.md").resolve() in {t for t, _ in _links(README)}


def test_readme_length():
    n = len(README.read_text().splitlines())
    assert 120 <= n <= 220, f"README has {n} lines: the front door is 150-200"


# ============================================================================ Quick start
def _quick_start_commands():
    text = README.read_text()
    m = re.search(r"^## Quick start\n(.*?)(?=^## )", text, re.M | re.S)
    assert m, "README has no '## Quick start' section"
    return [line[4:] for line in m.group(1).splitlines() if line.startswith("    ")]


def _ci_commands():
    """The install and the test command of .ci/run, as token lists."""
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    install = [shlex.split(ln) for ln in lines if re.match(r"(\S*/)?pip3? install", ln)]
    test = [shlex.split(ln) for ln in lines if re.match(r"(\S*/)?python3? -m pytest", ln)]
    assert len(install) == 1 and len(test) == 1, ".ci/run: one pip install, one pytest"
    return install[0], test[0]


def _steps(command):
    return [shlex.split(step) for step in command.split("&&")]


def _editable_target(tokens):
    return tokens[tokens.index("-e") + 1]


def test_quick_start_has_the_main_job_and_the_test_command():
    cmds = _quick_start_commands()
    assert len(cmds) == 2, cmds
    main, tests = (_steps(c) for c in cmds)
    for steps in (main, tests):
        assert steps[0] == ["python3", "-m", "venv", ".venv"], steps
        assert steps[1][:2] == [".venv/bin/pip", "install"], steps
    assert _editable_target(main[1]) == "."
    assert main[2] == [".venv/bin/shmalloc", "launch", "-n", "4"], main


def test_quick_start_test_command_is_the_one_ci_runs():
    ci_install, ci_test = _ci_commands()
    steps = _steps(_quick_start_commands()[1])
    assert _editable_target(steps[1]) == _editable_target(ci_install)
    pytest_step = [s for s in steps if "pytest" in s]
    assert len(pytest_step) == 1
    assert pytest_step[0][1:] == ci_test[1:], (pytest_step[0], ci_test)
    assert pytest_step[0][0] == ".venv/bin/python"


# (that the main job needs only the base dependencies is test_layers.py's
# test_the_core_install_needs_no_extra, which imports every module with the extras refused)


def test_launch_in_the_quick_start_parses():
    args = _parser().parse_args(_steps(_quick_start_commands()[0])[2][1:])
    assert args.command == "launch" and args.workers == 4


# ============================================================================ docs/cli.md
def _subparsers():
    parser = _parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def _options(subparser):
    return {s for a in subparser._actions for s in a.option_strings} - {"-h", "--help"}


def _code(text):
    """The text of the code spans, indented blocks and fenced blocks of ``text``."""
    parts = re.findall(r"`([^`\n]+)`", FENCE.sub("", text))
    parts += [ln for ln in text.splitlines() if ln.startswith("    ")]
    parts += FENCE.findall(text)
    return "\n".join(parts)


def _sections(text):
    """``## `shmalloc X` `` heading -> the section's text (to the next ## heading)."""
    out = {}
    for m in re.finditer(r"^## `shmalloc ([a-z-]+)`\n(.*?)(?=^## |\Z)", text, re.M | re.S):
        out[m.group(1)] = m.group(2)
    return out


def test_every_command_named_in_cli_md_exists():
    named = set(re.findall(r"(?:^|[\s`(])shmalloc ([a-z][\w-]*)", _code(CLI_DOC.read_text()),
                           re.M))
    assert named, "docs/cli.md names no command"
    unknown = named - set(_subparsers())
    assert not unknown, f"docs/cli.md names commands the parser lacks: {sorted(unknown)}"


def test_every_command_and_option_of_the_parser_is_documented():
    sections = _sections(CLI_DOC.read_text())
    for name, sub in _subparsers().items():
        assert name in sections, f"docs/cli.md has no section for shmalloc {name}"
        for opt in _options(sub):
            assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", sections[name]), \
                f"docs/cli.md: shmalloc {name} {opt} is not documented"


def test_the_synopses_in_cli_md_name_only_real_options():
    subs = _subparsers()
    for name, body in _sections(CLI_DOC.read_text()).items():
        m = re.match(r"\s*((?:    .*\n)+)", body)
        assert m and m.group(1).strip().startswith(f"shmalloc {name}"), f"{name}: no synopsis"
        synopsis = m.group(1)
        used = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", synopsis))
        assert used <= _options(subs[name]), \
            f"shmalloc {name}: synopsis names unknown options {sorted(used - _options(subs[name]))}"


def test_the_manager_module_takes_serves_options():
    from shmalloc.workers import manager
    p = argparse.ArgumentParser()
    manager.add_serve_arguments(p)
    assert _options(p) == _options(_subparsers()["serve"])
    assert "python -m shmalloc.workers.manager" in CLI_DOC.read_text()


# ============================================================================ code blocks
@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_python_blocks_compile(page):
    for block in PY_BLOCK.findall(page.read_text()):
        compile(block, str(page), "exec")


def _readme_example(marker):
    blocks = [b for b in PY_BLOCK.findall(README.read_text()) if marker in b]
    assert len(blocks) == 1, f"README: one example with {marker}"
    assert len(blocks[0].splitlines()) <= 15, f"README example with {marker}: over 15 lines"
    return blocks[0]


def test_readme_buffer_example_is_short():
    _readme_example("arena.alloc(")


@pytest.mark.parametrize("marker", ["zcreate", "m_getcl"])
def test_readme_example_runs(marker, arena_name, capsys):
    code = _readme_example(marker)
    assert code.count('"demo"') == 1
    exec(compile(code.replace('"demo"', repr(arena_name)), "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()
