"""Every runnable example of README.md and docs/*.md, run as written (tests/python/
doc_examples.py says how blocks are marked): a failure names the page and line of the block."""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

import doc_examples as de
from spill_cli import spill_cli

UNITS, PROBLEMS = de.units(de.pages())
FILES = de.named_files([b for p in de.pages() for b in de.parse(p)[0]])


def test_every_block_is_marked():
    assert not PROBLEMS, "\n".join(PROBLEMS)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    cli = spill_cli()
    made = {}

    def folder(page: str) -> de.Context:
        if page not in made:
            ctx = de.Context(tmp_path_factory.mktemp(page.replace("/", "_")),
                             pathlib.Path(cli).resolve().parent, sys.executable, FILES)
            ctx.prepare()
            made[page] = ctx
        return made[page]
    return folder


@pytest.mark.parametrize("unit", UNITS, ids=[blocks[0].where for _, blocks in UNITS])
def test_example(unit, folders):
    page, blocks = unit
    failures, skips = de.run_unit(blocks, folders(page))
    if skips:
        pytest.skip("; ".join(skips))
    assert not failures, "\n\n".join(failures)


def test_a_page_is_found_from_any_folder(tmp_path):
    """`doc_examples.py docs/python.md` (as the README writes it) names the page from any
    folder, not only the repository's root; a path that is no page is refused in a line, not a
    traceback (audit 38b #11: run elsewhere it raised ValueError from relative_to)."""
    assert de.chosen_pages(["docs/python.md"], tmp_path) == [de.ROOT / "docs" / "python.md"]
    assert de.chosen_pages([str(de.ROOT / "README.md")], tmp_path) == [de.ROOT / "README.md"]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "python.md").write_text("another checkout's page\n")
    for bad in ("docs/python.md", "docs/BENCHMARKS.md", "docs/no-such-page.md"):
        r = subprocess.run([sys.executable, str(de.ROOT / "tests" / "python" / "doc_examples.py"),
                            bad], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, (bad, r.returncode, r.stdout, r.stderr)
        assert r.stderr.startswith(f"doc_examples.py: {bad}: not a page with examples"), r.stderr
        assert "Traceback" not in r.stderr


SUBCOMMANDS = {"info", "device-check", "bench", "link", "report", "demo", "plan", "train"}


def test_options_the_text_names_are_in_the_help():
    """`spill SUB ... --option` written in the text (not in a block, whose commands run) names
    an option that `spill SUB --help` lists."""
    cli = spill_cli()
    helps = {}
    wrong = []
    for path in de.pages():
        for n, line in enumerate(path.read_text().split("\n"), 1):
            for span in re.findall(r"`(?:build/)?spill ([^`]*)`", line):
                words = span.split()
                sub = []
                for w in words:
                    if w in SUBCOMMANDS:
                        sub.append(w)
                    elif not w.startswith("-") and sub:
                        break
                key = " ".join(sub)
                if key not in helps:
                    r = subprocess.run([cli, *sub, "--help"], capture_output=True, text=True)
                    helps[key] = r.stdout
                for option in re.findall(r"--[a-z][a-z-]*", span):
                    if not re.search(re.escape(option) + r"\b", helps[key]):
                        wrong.append(f"{path.relative_to(de.ROOT)}:{n}: `spill {span}`: "
                                     f"{option} is not in `spill {key} --help`")
    assert not wrong, "\n".join(wrong)


def test_the_readme_configuration_table_has_every_key():
    """The README's table of configuration keys lists the keys the command knows, no more."""
    cli = spill_cli()
    r = subprocess.run([cli, "--conf", "no_such_key:1", "info"], capture_output=True, text=True)
    known = re.search(r"known keys: ([a-z_, ]+)\)", r.stderr)
    assert known, r.stderr
    readme = (de.ROOT / "README.md").read_text()
    table = readme[readme.index("## Configuration"):]
    table = table[:table.index("\n## ")]
    listed = re.findall(r"^\| `([a-z_]+)` \|", table, re.M)
    assert sorted(listed) == sorted(known.group(1).split(", ")), (listed, known.group(1))


def _anchors(page: pathlib.Path) -> set:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to '-'."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", page.read_text(), re.M)}


def test_links_between_the_pages_resolve():
    """A link to a file of the repository names one that exists, and its #anchor a heading."""
    wrong = []
    for page in de.pages() + [de.ROOT / "docs" / "architecture.md"]:
        for n, line in enumerate(page.read_text().split("\n"), 1):
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"[a-z]+:", target):
                    continue
                path, _, anchor = target.partition("#")
                dest = (page.parent / path).resolve() if path else page
                where = f"{page.relative_to(de.ROOT)}:{n}: ({target})"
                if not dest.exists():
                    wrong.append(f"{where}: no file {path}")
                elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                    wrong.append(f"{where}: no heading makes #{anchor}")
    assert not wrong, "\n".join(wrong)


def test_source_files_the_text_names_exist():
    """A path such as graph/plan.hpp or tests/python/models.py (one under a top-level folder of
    the repository) names a file or folder that exists."""
    top = {p.name for p in de.ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")}
    wrong = []
    for page in de.pages():
        for n, line in enumerate(page.read_text().split("\n"), 1):
            for path in re.findall(r"(?<![\w/.~-])([a-z_]+/[\w./-]*\w)", line):
                if path.split("/")[0] in top - {"build"} and not (de.ROOT / path).exists():
                    wrong.append(f"{page.relative_to(de.ROOT)}:{n}: {path} does not exist")
    assert not wrong, "\n".join(wrong)
