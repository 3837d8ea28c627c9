"""README and docs/ cannot drift from tests/docs/readme_flows.sh: every embedcache/probes command line of the
bash blocks of README.md and of every docs/*.md page has a counterpart there (same command, every flag it
uses), or a recorded skip; every relative link between these pages resolves; and the script runs top to
bottom on the bundled cells (~2 min on two cores)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.paths import REPO as _REPO

REPO = _REPO
SCRIPT = REPO / "tests" / "docs" / "readme_flows.sh"
DOCS = REPO / "docs"
SHELL_BLOCK = re.compile(r"```(?:bash|sh|shell)\n(.*?)```", re.S)


def _documents() -> list[Path]:
    """README.md and every docs/*.md page: the files whose shell examples must stay runnable."""
    return [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


def _name(doc: Path) -> str:
    return str(doc.relative_to(REPO))


def _command_lines(text: str) -> list[list[str]]:
    lines = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.split("  #")[0].split("# ")[0].strip() if not line.lstrip().startswith("# skipped") else line
        words = line.split()
        if len(words) >= 2 and words[0] in ("embedcache", "probes"):
            lines.append(words)
    return lines


def _flags(words: list[str]) -> set[str]:
    return {w.split("=")[0] for w in words if w.startswith("-")}


def test_every_readme_command_has_a_counterpart_in_the_flows_script():
    script = SCRIPT.read_text()
    ours: dict[str, set[str]] = {}
    for words in _command_lines(script):
        ours.setdefault(" ".join(words[:2]), set()).update(_flags(words))
    skipped: dict[str, set[str]] = {}
    for m in re.finditer(r"^# skipped: (\S+ \S+)(.*?)\(", script, re.M):
        skipped.setdefault(m.group(1), set()).update(_flags(m.group(2).split()))
    docs = _documents()
    assert DOCS / "extract.md" in docs, f"the docs pages are missing from {DOCS}"
    missing, seen = [], 0
    for doc in docs:
        text = doc.read_text()
        for m in SHELL_BLOCK.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            for words in _command_lines(m.group(1)):
                seen += 1
                cmd = " ".join(words[:2])
                lacking = _flags(words) - ours.get(cmd, set()) - skipped.get(cmd, set())
                if cmd not in ours or lacking:
                    why = cmd if cmd not in ours else sorted(lacking)
                    missing.append(f"{_name(doc)} (block at line {line}): {' '.join(words)}  (not covered: {why})")
    assert seen, "no embedcache/probes command found in the bash blocks of README.md and docs/*.md"
    assert not missing, "commands of README.md / docs/*.md without a counterpart in tests/docs/readme_flows.sh:\n" + (
        "\n".join(missing)
    )


def _without_code(text: str) -> str:
    """``text`` with fenced code blocks and inline code removed (their '#' lines and brackets are not Markdown)."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"^ *```.*?^ *```", "", text, flags=re.S | re.M))


def _anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of ``text`` (lower case, punctuation dropped, spaces to '-')."""
    out: set[str] = set()
    for m in re.finditer(r"^#{1,6} +(.+?) *#*$", re.sub(r"^ *```.*?^ *```", "", text, flags=re.S | re.M), re.M):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        n = 1
        while (slug if n == 1 else f"{slug}-{n - 1}") in out:
            n += 1
        out.add(slug if n == 1 else f"{slug}-{n - 1}")
    return out


def test_links_between_readme_and_docs_resolve():
    docs = _documents()
    broken = []
    for doc in docs:
        for target in re.findall(r"\]\(([^)\s]+)\)", _without_code(doc.read_text())):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                broken.append(f"{_name(doc)}: {target} (no file {path})")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text()):
                broken.append(f"{_name(doc)}: {target} (no heading with anchor #{anchor} in {dest.name})")
    assert not broken, "broken links in README.md / docs/*.md:\n" + "\n".join(broken)
    readme = (REPO / "README.md").read_text()
    orphans = [_name(d) for d in docs[1:] if f"({_name(d)})" not in readme]
    assert not orphans, f"docs pages not linked from README.md: {orphans}"


@pytest.mark.slow
def test_readme_flows_run_top_to_bottom(tmp_path):
    r = subprocess.run(
        ["bash", str(SCRIPT), str(REPO / "tests" / "data"), str(tmp_path)], capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "README flows: all ran" in r.stdout


def test_the_backbone_list_in_the_docs_names_every_registry_entry():
    from embedcache.backbones.registry import list_models

    text = (DOCS / "extract.md").read_text()
    listed = text.split("`embedcache models` lists the registry:")[1].split("plus any")[0]
    names = set()
    for item in re.findall(r"`([^`]+)`", listed):
        head, _, tail = item.rpartition("-")
        first, *others = tail.split("/")  # dinov2-s/b/l/g, efficientnet-lite0/1/2
        names.update(f"{head}-{v}" if head else v for v in [first, *(first[: len(first) - len(o)] + o for o in others)])
    registry = {spec.name for spec in list_models()}
    assert registry - names == set(), f"docs/extract.md does not list: {sorted(registry - names)}"
    assert names - registry == set(), f"docs/extract.md lists unknown backbones: {sorted(names - registry)}"
