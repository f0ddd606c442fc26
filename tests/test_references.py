"""Citations resolve inside the repository: every paper key cited in code, tests and docs is defined in
docs/references.md with its authors, title, venue and year, and every link into docs/notes.md names an
anchor that exists there."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCES = ROOT / "docs" / "references.md"
NOTE_DOC = ROOT / "docs" / "notes.md"

KEY = re.compile(r"\[([A-Z][A-Za-z]+-[A-Za-z0-9-]+)\](?!\()")  # [Abdi-thesis], not a markdown link [x](y)
NOTE_LINK = re.compile(r"notes\.md#([A-Za-z0-9_-]+)")
ANCHOR = re.compile(r'<a id="([^"]+)"></a>')
DEFINITION = re.compile(r'^\| <a id="[^"]+"></a>\[([^\]]+)\] \| (.+) \|$', re.M)


def _cited_in() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "CHANGELOG.md"]
    for sub, suffixes in (("fl_sim", {".py", ".yaml"}), ("tests", {".py"}), ("docs", {".md"})):
        files += [p for p in (ROOT / sub).rglob("*") if p.suffix in suffixes]
    this = Path(__file__).resolve()
    return [p for p in files if p.is_file() and p.resolve() != this]


def _definitions() -> dict[str, str]:
    return dict(DEFINITION.findall(REFERENCES.read_text(encoding="utf-8")))


def test_every_cited_key_is_defined():
    keys = _definitions()
    missing = sorted({f"{p.relative_to(ROOT)}: [{k}]" for p in _cited_in()
                      for k in KEY.findall(p.read_text(encoding="utf-8", errors="replace")) if k not in keys})
    assert not missing, "keys cited but not defined in docs/references.md:\n" + "\n".join(missing)


def test_every_definition_names_authors_title_and_year():
    keys = _definitions()
    assert len(keys) >= 5
    for key, text in keys.items():
        assert re.search(r"\b(19|20)\d\d\b", text) or "undated" in text, f"[{key}] has no year"
        assert "*" in text, f"[{key}] has no title (in italics)"
        assert re.match(r"[A-Z][\w.\-' ]+", text), f"[{key}] does not start with its authors"


def test_every_notes_link_names_an_existing_anchor():
    anchors = set(ANCHOR.findall(NOTE_DOC.read_text(encoding="utf-8")))
    bad = sorted({f"{p.relative_to(ROOT)}: #{a}" for p in _cited_in()
                  for a in NOTE_LINK.findall(p.read_text(encoding="utf-8", errors="replace")) if a not in anchors})
    assert not bad, "links to anchors that docs/notes.md does not have:\n" + "\n".join(bad)


@pytest.mark.parametrize("module,key", [
    ("strategies/qcs.py", "Abdi-thesis"), ("strategies/rlc.py", "Abdi-thesis"),
    ("strategies/onebit.py", "Mitra-Khisti-2020"), ("strategies/fihtcs.py", "Tang-FIHT"),
    ("strategies/daqusgd.py", "Hanna-DaQuSGD"), ("strategies/fetchsgd.py", "Rothchild-2020"),
])
def test_each_method_cites_its_paper_by_key(module, key):
    head = (ROOT / "fl_sim" / module).read_text(encoding="utf-8")[:1500]
    assert f"[{key}]" in head, f"fl_sim/{module}'s docstring should cite [{key}] (docs/references.md)"


def test_the_checks_can_fail():
    assert KEY.findall("see [Abdi-thesis] eq. 4.14 and [FIHT-CS](#x)") == ["Abdi-thesis"]
    assert NOTE_LINK.findall("docs/notes.md#qcs-1bit-erratum") == ["qcs-1bit-erratum"]
    assert DEFINITION.findall('| <a id="k"></a>[K-1] | A. Author. *T.* V, 2001. |') == [("K-1", "A. Author. *T.* V, 2001.")]
