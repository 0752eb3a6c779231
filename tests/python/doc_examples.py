"""The documentation's examples, extracted and run as a reader would run them.

A fenced block in README.md or docs/*.md (not BENCHMARKS.md or architecture.md, which are
records and contracts) that has a language carries a marker, an HTML comment on the lines just
above its fence, which GitHub does not render:

    <!-- test: python -->              a Python script, run by the tests' interpreter
    <!-- test: python; continue -->    the same interpreter and namespace as the page's previous
                                       Python block: the chain runs whole, before the page's
                                       later blocks (a `pycon` block is run as a doctest)
    <!-- test: sh -->                  each command (a line; `\\` continues it) run by bash
    <!-- test: c -->                   a C program, compiled against the build and run
    <!-- test: no: REASON -->          not run (a sketch, a listing); the reason is required

Options, after `;` or on lines of their own:
    file: NAME      also saved as NAME in every page's folder (app.c for the README's commands)
    given: CODE     Python run before the block, unseen (what a sketch leaves to the reader)
    needs: gpu      run only where torch sees a CUDA GPU (else skipped, saying so); also
                    cupy, torch, and torch-1.13 (an output that only Debian's torch prints, or
                    what only it covers: the CPU bridge's torch.save)
    fails: TEXT     the command containing TEXT must fail (exit status not 0)
    skip: TEXT (REASON)  the command containing TEXT is not run
    timeout: SECONDS     for the block (default 120)

A fence without a language right after a run block is what it prints: each of its non-empty
lines must appear in the output in that order (spaces collapsed; lines between may differ).
Each page runs in a folder of its own with `build`, `python`, `tests` and `tools` linking to
the build and the sources, and HOME inside it, so the README's `build/spill ...` and
`~/.local/spill` work as written.

`python3 tests/python/doc_examples.py [PAGE...]` runs pages by hand (a PAGE path is taken from
the current folder, else from the repository's root; SPILL_CLI names the command, else
build/spill); tests/python/test_doc_examples.py runs them all from ctest.
"""
from __future__ import annotations

import contextlib
import dataclasses
import doctest
import io
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import traceback
from typing import Dict, List, Optional, Tuple

ROOT = pathlib.Path(__file__).resolve().parents[2]
RECORDS = {"BENCHMARKS.md", "architecture.md"}
KINDS = {"python", "sh", "c", "no"}
FENCE = re.compile(r"^( *)(```+)\s*([A-Za-z0-9_+-]*)\s*$")   # also inside a list item
MARKER = re.compile(r"<!--\s*test:(.*?)-->", re.S)


def pages() -> List[pathlib.Path]:
    """README.md, then docs/*.md in name order, less the records."""
    docs = sorted(p for p in (ROOT / "docs").glob("*.md") if p.name not in RECORDS)
    return [ROOT / "README.md"] + docs


@dataclasses.dataclass
class Block:
    page: str                 # path relative to the repository, e.g. docs/python.md
    line: int                 # line of the first line of code (1-based)
    lang: str
    code: str
    kind: str = "no"
    reason: str = ""
    options: Dict[str, List[str]] = dataclasses.field(default_factory=dict)
    expect: Optional[str] = None
    expect_line: int = 0

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    def option(self, key: str) -> Optional[str]:
        values = self.options.get(key)
        return values[-1] if values else None


class MarkerError(ValueError):
    pass


def _parse_marker(text: str, where: str) -> Tuple[str, str, Dict[str, List[str]]]:
    items = [i.strip() for i in re.split(r"[;\n]", text) if i.strip()]
    if not items:
        raise MarkerError(f"{where}: empty test marker")
    head = items[0]
    kind, _, reason = head.partition(":")
    kind = kind.strip()
    if kind not in KINDS:
        raise MarkerError(f"{where}: unknown test kind {kind!r} (one of {sorted(KINDS)})")
    if kind == "no" and not reason.strip():
        raise MarkerError(f"{where}: `test: no` needs a reason (`test: no: why`)")
    options: Dict[str, List[str]] = {}
    for item in items[1:]:
        key, sep, value = item.partition(":")
        key = key.strip()
        if key not in {"continue", "file", "given", "needs", "fails", "skip", "timeout"}:
            raise MarkerError(f"{where}: unknown test option {key!r}")
        if key != "continue" and not sep:
            raise MarkerError(f"{where}: test option {key!r} needs a value")
        options.setdefault(key, []).append(value.strip())
    return kind, reason.strip(), options


def parse(path: pathlib.Path) -> Tuple[List[Block], List[str]]:
    """The fenced blocks of a page with their markers and expected outputs, and the problems
    (blocks with a language but no marker, bad markers)."""
    rel = str(path.relative_to(ROOT))
    lines = path.read_text().split("\n")
    blocks: List[Block] = []
    problems: List[str] = []
    i = 0
    last_run: Optional[Block] = None      # a run block whose output fence may follow
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            if lines[i].strip() and not lines[i].lstrip().startswith("<!--"):
                last_run = None
            i += 1
            continue
        indent, ticks, lang = len(m.group(1)), m.group(2), m.group(3)
        start = i
        j = i + 1
        while j < len(lines) and lines[j].strip() != ticks:
            j += 1
        code = "\n".join(line[indent:] if line[:indent].isspace() else line
                         for line in lines[start + 1:j]) + "\n"
        # The marker: an HTML comment ending on the line above the fence.
        marker = None
        k = start - 1
        if k >= 0 and lines[k].rstrip().endswith("-->"):
            while k >= 0 and "<!--" not in lines[k]:
                k -= 1
            found = MARKER.search("\n".join(lines[k:start]))
            marker = found.group(1) if found else None
        block = Block(rel, start + 2, lang, code)
        if not lang:
            if last_run is not None and marker is None:
                last_run.expect, last_run.expect_line = code, start + 2
            last_run = None
            i = j + 1
            continue
        if marker is None:
            problems.append(f"{block.where}: a ```{lang} block without a test marker "
                            "(<!-- test: python|sh|c|no: reason --> above it; "
                            "tests/python/doc_examples.py)")
        else:
            try:
                block.kind, block.reason, block.options = _parse_marker(
                    marker, f"{rel}:{start + 1}")
            except MarkerError as e:
                problems.append(str(e))
        blocks.append(block)
        last_run = block if block.kind != "no" else None
        i = j + 1
    return blocks, problems


def named_files(all_blocks: List[Block]) -> Dict[str, str]:
    return {name: b.code for b in all_blocks for name in b.options.get("file", [])}


def matches(expect: str, actual: str) -> Optional[str]:
    """None when every non-empty line of `expect` appears in `actual` in order (spaces
    collapsed), else the first line that does not."""
    norm = lambda s: " ".join(s.split())
    got = [norm(line) for line in actual.splitlines()]
    at = 0
    for want in (norm(line) for line in expect.splitlines()):
        if not want:
            continue
        while at < len(got) and got[at] != want:
            at += 1
        if at == len(got):
            return want
        at += 1
    return None


_PROBED: Dict[Tuple[str, str], Optional[str]] = {}


def missing_need(block: Block, python: str) -> Optional[str]:
    """Why the block cannot run here, or None (each need probed once per interpreter)."""
    for need in block.options.get("needs", []):
        if (python, need) not in _PROBED:
            _PROBED[(python, need)] = _probe(need, python)
        if _PROBED[(python, need)]:
            return _PROBED[(python, need)]
    return None


def _probe(need: str, python: str) -> Optional[str]:
    def runs(code: str) -> bool:
        return subprocess.run([python, "-c", code], capture_output=True).returncode == 0
    if need == "gpu":
        if not runs("import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"):
            return "needs a CUDA GPU (torch.cuda.is_available() is False here)"
    elif need == "torch-1.13":
        if not runs("import sys, torch; sys.exit(0 if torch.__version__.startswith('1.13') else 1)"):
            return ("runs on Debian's torch 1.13 only (what it prints or relies on is that "
                    f"torch's); {python} has another torch or none")
    elif need in {"cupy", "torch"}:
        if not runs(f"import {need}"):
            return f"needs {need}, which {python} cannot import"
    else:
        return f"unknown need {need!r}"
    return None


@dataclasses.dataclass
class Context:
    """Where a page's examples run and with what."""
    folder: pathlib.Path
    build: pathlib.Path
    python: str
    files: Dict[str, str]

    def env(self) -> Dict[str, str]:
        env = dict(os.environ)
        for key in ("SPILL_CONF", "SPILL_BUILD_DIR", "PYTHONPATH"):
            env.pop(key, None)
        env["HOME"] = str(self.folder / "home")
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        return env

    def prepare(self) -> None:
        (self.folder / "home").mkdir(parents=True, exist_ok=True)
        links = {"build": self.build, "python": ROOT / "python", "tests": ROOT / "tests",
                 "tools": ROOT / "tools"}
        for name, target in links.items():
            link = self.folder / name
            if not link.exists():
                link.symlink_to(target)
        for name, text in self.files.items():
            (self.folder / name).write_text(text)


def _sh_commands(block: Block) -> List[Tuple[int, str]]:
    commands: List[Tuple[int, str]] = []
    pending, first = "", 0
    for n, line in enumerate(block.code.split("\n")):
        if not pending:
            first = block.line + n
            if not line.strip() or line.lstrip().startswith("#"):
                continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        commands.append((first, pending + line))
        pending = ""
    return commands


def run_sh(block: Block, ctx: Context) -> Tuple[List[str], str]:
    """Runs each command; returns the failures and the output of all."""
    failures: List[str] = []
    output = ""
    timeout = float(block.option("timeout") or 120)
    for line, command in _sh_commands(block):
        skipped = [s for s in block.options.get("skip", []) if s.split(" (")[0] in command]
        if skipped:
            output += f"[not run: {skipped[0]}]\n"
            continue
        must_fail = any(f in command for f in block.options.get("fails", []))
        env = ctx.env()
        env.pop("SPILL_LIBRARY", None)     # the README's commands find the library themselves
        try:
            r = subprocess.run(["bash", "-c", command], cwd=ctx.folder, env=env,
                               capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            failures.append(f"{block.page}:{line}: `{command.strip()}` ran past {timeout:.0f} s")
            continue
        output += r.stdout + r.stderr
        if must_fail and r.returncode == 0:
            failures.append(f"{block.page}:{line}: `{command.strip()}` should fail, as the "
                            f"text says, but exited 0:\n{r.stdout}{r.stderr}")
        elif not must_fail and r.returncode != 0:
            failures.append(f"{block.page}:{line}: `{command.strip()}` exited "
                            f"{r.returncode}:\n{(r.stdout + r.stderr)[-3000:]}")
        elif must_fail and not r.stderr.strip():
            failures.append(f"{block.page}:{line}: `{command.strip()}` failed without an "
                            "error message")
    return failures, output


def run_c(block: Block, ctx: Context) -> Tuple[List[str], str]:
    name = (block.options.get("file") or [f"example_{block.line}.c"])[0]
    source = ctx.folder / name
    source.write_text(f'#line {block.line} "{block.page}"\n' + block.code)
    exe = source.with_suffix("")
    cc = [os.environ.get("CC", "cc"), "-std=c11", "-Wall", "-Wextra", "-Werror",
          f"-I{ROOT / 'integrations' / 'c'}", str(source), "-o", str(exe),
          f"-L{ctx.build}", "-lspill", f"-Wl,-rpath,{ctx.build}"]
    r = subprocess.run(cc, cwd=ctx.folder, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        return [f"{block.where}: does not compile:\n{r.stderr[-3000:]}"], ""
    env = ctx.env()
    env.pop("SPILL_LIBRARY", None)
    r = subprocess.run([str(exe)], cwd=ctx.folder, env=env, capture_output=True, text=True,
                       timeout=float(block.option("timeout") or 120))
    if r.returncode != 0:
        return [f"{block.where}: the program exited {r.returncode}:\n"
                f"{(r.stdout + r.stderr)[-3000:]}"], r.stdout + r.stderr
    return [], r.stdout + r.stderr


def run_python_chain(chain: List[Block], ctx: Context) -> List[Tuple[Block, List[str], str]]:
    """Runs blocks in one interpreter (the driver below); per block: failures and stdout."""
    spec = [{"page": b.page, "line": b.line, "code": b.code, "doctest": b.lang == "pycon",
             "given": b.options.get("given", [])} for b in chain]
    with tempfile.TemporaryDirectory() as tmp:
        results_path = pathlib.Path(tmp) / "results.jsonl"
        env = ctx.env()
        env["SPILL_DOC_RESULTS"] = str(results_path)
        env["PYTHONPATH"] = str(ctx.folder / "python")   # "from a build tree" (docs/python.md)
        timeout = sum(float(b.option("timeout") or 120) for b in chain)
        try:
            r = subprocess.run([ctx.python, str(pathlib.Path(__file__)), "--driver"],
                               input=json.dumps(spec), cwd=ctx.folder, env=env,
                               capture_output=True, text=True, timeout=timeout)
            died = None if r.returncode == 0 else (
                f"the interpreter exited {r.returncode}:\n{(r.stdout + r.stderr)[-3000:]}")
        except subprocess.TimeoutExpired:
            died = f"the interpreter ran past {timeout:.0f} s"
        records = ([json.loads(line) for line in results_path.read_text().splitlines()]
                   if results_path.exists() else [])
    out: List[Tuple[Block, List[str], str]] = []
    for n, block in enumerate(chain):
        if n < len(records):
            rec = records[n]
            fails = [f"{block.where}: {rec['error']}"] if rec["error"] else []
            out.append((block, fails, rec["stdout"]))
        else:
            why = died or "an earlier block of its chain failed"
            out.append((block, [f"{block.where}: not run to its end: {why}"], ""))
            died = "an earlier block of its chain failed"
    return out


def _driver() -> int:
    """Runs the blocks on stdin in one namespace per chain, writing one record per block."""
    spec = json.load(sys.stdin)
    sys.path[0] = os.getcwd()    # as for a script saved in the page's folder, not this one
    results = open(os.environ["SPILL_DOC_RESULTS"], "w")
    namespace: Dict[str, object] = {"__name__": "__main__"}
    for block in spec:
        captured = io.StringIO()
        error = ""
        try:
            with contextlib.redirect_stdout(captured):
                for given in block["given"]:
                    exec(compile(given, f"<given of {block['page']}:{block['line']}>",
                                 "exec"), namespace)
                if block["doctest"]:
                    error = _run_doctest(block, namespace)
                else:
                    padded = "\n" * (block["line"] - 1) + block["code"]
                    exec(compile(padded, block["page"], "exec"), namespace)
        except BaseException:  # noqa: B902 -- a block's SystemExit is a failure as well
            error = traceback.format_exc(limit=-8)
        results.write(json.dumps({"error": error, "stdout": captured.getvalue()}) + "\n")
        results.flush()
        if error:
            break
    return 0


def _run_doctest(block: dict, namespace: Dict[str, object]) -> str:
    test = doctest.DocTestParser().get_doctest(block["code"], namespace, block["page"],
                                               block["page"], block["line"] - 1)
    report = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test, out=report.write, clear_globs=False)
    namespace.update(test.globs)          # the DocTest ran in a copy: later blocks see its names
    return report.getvalue() if runner.failures else ""


def units(all_pages: List[pathlib.Path]) -> Tuple[List[Tuple[str, List[Block]]], List[str]]:
    """The runnable units in order: a chain of Python blocks, an sh block, a C block; and the
    marker problems of every page."""
    out: List[Tuple[str, List[Block]]] = []
    problems: List[str] = []
    for path in all_pages:
        blocks, page_problems = parse(path)
        problems += page_problems
        for b in blocks:
            if b.kind == "no":
                continue
            if b.kind == "python" and "continue" in b.options:
                # The page's latest Python chain (it runs whole, before the page's later units).
                chain = next((u for u in reversed(out) if u[0] == b.page
                              and u[1][0].kind == "python"), None)
                if chain is None:
                    problems.append(f"{b.where}: `continue` without a Python block before it")
                    continue
                chain[1].append(b)
            else:
                out.append((b.page, [b]))
    return out, problems


def run_unit(blocks: List[Block], ctx: Context) -> Tuple[List[str], List[str]]:
    """Runs a unit; returns failures and skip reasons."""
    first = blocks[0]
    need = missing_need(first, ctx.python)
    if need:
        return [], [f"{first.where}: {need}"]
    if first.kind == "python":
        results = run_python_chain(blocks, ctx)
    elif first.kind == "sh":
        fails, output = run_sh(first, ctx)
        results = [(first, fails, output)]
    else:
        fails, output = run_c(first, ctx)
        results = [(first, fails, output)]
    failures: List[str] = []
    for block, fails, output in results:
        failures += fails
        if not fails and block.expect is not None:
            missing = matches(block.expect, output)
            if missing is not None:
                failures.append(
                    f"{block.where}: the output the text shows ({block.page}:"
                    f"{block.expect_line}) has a line the run did not print:\n  {missing}\n"
                    f"it printed:\n{output[-4000:]}")
    return failures, []


def chosen_pages(names: List[str], cwd: pathlib.Path) -> List[pathlib.Path]:
    """The pages named on the command line: a path from `cwd`, else from the repository's root
    (so `docs/python.md` works from any folder). Raises ValueError naming one that is not a
    page with examples of this repository."""
    chosen = []
    for name in names:
        path = cwd / name
        if not path.exists():
            path = ROOT / name
        path = path.resolve()
        if path not in pages():
            raise ValueError(f"{name}: not a page with examples of {ROOT} (README.md or "
                             f"docs/*.md less {' and '.join(sorted(RECORDS))}; a relative "
                             f"path is taken from the current folder, else from the root)")
        chosen.append(path)
    return chosen


def main(argv: List[str]) -> int:
    if argv[1:2] == ["--driver"]:
        return _driver()
    try:
        chosen = chosen_pages(argv[1:], pathlib.Path.cwd()) or pages()
    except ValueError as e:
        print(f"doc_examples.py: {e}", file=sys.stderr)
        return 2
    cli = os.environ.get("SPILL_CLI") or str(ROOT / "build" / "spill")
    all_units, problems = units(pages())
    files = named_files([b for p in pages() for b in parse(p)[0]])
    for p in problems:
        print(p)
    bad = bool(problems)
    with tempfile.TemporaryDirectory() as tmp:
        for path in chosen:
            rel = str(path.relative_to(ROOT))
            ctx = Context(pathlib.Path(tmp) / rel.replace("/", "_"),
                          pathlib.Path(cli).resolve().parent, sys.executable, files)
            ctx.prepare()
            for page, blocks in all_units:
                if page != rel:
                    continue
                failures, skips = run_unit(blocks, ctx)
                for s in skips:
                    print(f"skipped {s}")
                for f in failures:
                    print(f"FAILED {f}")
                bad |= bool(failures)
                if not failures and not skips:
                    print(f"ok {blocks[0].where}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
