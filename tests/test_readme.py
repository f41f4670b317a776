"""The README is a map (issue 24): short, every module of the package on it, no dead links.

- README.md stays under MAX_LINES; the design rationale lives in docs/.
- Its Layout block names every module of cbdtune/ (and of its subpackages) and none that is gone.
- Every relative link in README.md and docs/*.md reaches a file or folder of the repository.
- Every `python -m cbdtune.X` there names a module of this package; servers bind to loopback.

Text only, no Ray: the whole file runs in well under a second.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
MAX_LINES = 170  # issue 24: "README <= ~170 lines with every module listed"

_LINK_RE = re.compile(r"\]\(([^)\s]+)\)")
_MODULE_RE = re.compile(r"\bpython3?\s+-m\s+(cbdtune(?:\.\w+)+)")
_HOST_RE = re.compile(r"--host[ =](\S+)")


def _layout_block(text: str) -> list[str]:
    """The lines of the first code block after the ``## Layout`` heading."""
    after = text.split("\n## Layout", 1)[1]
    return after.split("```", 2)[1].splitlines()


def _listed_modules(text: str) -> set[str]:
    """Repo-relative paths the Layout names: ``cbdtune/x/`` opens a package, ``  name.py`` is
    a module of the package opened last, and so is each of ``  a.py, b.py`` (small modules of
    one package may share a line)."""
    listed: set[str] = set()
    package = None
    for line in _layout_block(text):
        head = line.split()[0] if line.strip() else ""
        if not line.startswith(" ") and head.startswith("cbdtune/"):
            package = head.rstrip("/")
        elif not line.startswith(" "):
            package = None  # cluster/, benchmarks/...: not the package
        elif package and head.endswith((".py", ".py,")) and line.startswith("  ") \
                and line[2] != " ":
            listed.update(f"{package}/{name}" for name in _leading_modules(line))
    return listed


def _leading_modules(line: str) -> list[str]:
    """The module names a Layout line starts with: ``x.py`` or ``a.py, b.py, c.py``."""
    names = []
    for word in line.split():
        names.append(word.rstrip(","))
        if not (word.endswith(".py,") and len(word) > 4):
            break
    return [name for name in names if name.endswith(".py")]


def _package_modules() -> set[str]:
    return {p.relative_to(REPO).as_posix() for p in (REPO / "cbdtune").rglob("*.py")
            if p.name != "__init__.py" and "__pycache__" not in p.parts}


def test_readme_is_short() -> None:
    lines = README.read_text().count("\n")
    assert lines <= MAX_LINES, f"README.md has {lines} lines (at most {MAX_LINES}); move the " \
        "reasons to docs/"


def test_readme_layout_lists_every_module() -> None:
    listed, actual = _listed_modules(README.read_text()), _package_modules()
    assert actual, "no modules found under cbdtune/"
    missing, gone = sorted(actual - listed), sorted(listed - actual)
    assert not missing, f"README.md's Layout does not list {missing}: add one line each"
    assert not gone, f"README.md's Layout lists modules that do not exist: {gone}"


def test_readme_layout_parser_sees_a_missing_module() -> None:
    text = README.read_text()
    without = text.replace("\n  ridge.py ", "\n  (removed) ", 1)
    assert without != text and "cbdtune/ridge.py" not in _listed_modules(without)


def test_readme_layout_parser_reads_modules_sharing_a_line() -> None:
    layout = ("## Layout\n```\ncbdtune/pkg/   a package\n  a.py, b.py   the first two; c.py\n"
              "  d.py         one, naming e.py\ncluster/\n  f.py, g.py\n```\n")
    assert _listed_modules("\n" + layout) == {"cbdtune/pkg/a.py", "cbdtune/pkg/b.py",
                                                "cbdtune/pkg/d.py"}
    without = README.read_text().replace(" save.py ", " (removed) ", 1)
    assert "cbdtune/serving/save.py" not in _listed_modules(without)


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: p.relative_to(REPO).as_posix())
def test_readme_links_resolve(doc: Path) -> None:
    for target in _LINK_RE.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a web address or an anchor in the same file
        path = (doc.parent / target.split("#", 1)[0]).resolve()
        assert path.exists(), f"{doc.relative_to(REPO)}: link {target} reaches nothing"


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: p.relative_to(REPO).as_posix())
def test_readme_commands_name_modules_and_bind_loopback(doc: Path) -> None:
    text = doc.read_text()
    for module in set(_MODULE_RE.findall(text)):
        spec = importlib.util.find_spec(module)
        assert spec is not None, f"{doc.name}: python -m {module}: no such module"
        if spec.submodule_search_locations is not None:
            assert importlib.util.find_spec(module + ".__main__"), f"{module} has no __main__"
    for host in _HOST_RE.findall(text):
        assert host in ("127.0.0.1", "localhost"), f"{doc.name}: --host {host} is not loopback"


def test_readme_keeps_the_two_setup_commands() -> None:
    text = README.read_text()
    assert "pip install -e '.[test]'" in text and "python -m pytest -q" in text
    assert "python -m cbdtune.search --dataset gesture" in text
