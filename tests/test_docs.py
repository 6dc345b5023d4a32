"""The README's links, scripts and modules point at things that exist."""
from __future__ import annotations

import importlib.util
import re

from conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def _prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return "".join(part for i, part in enumerate(re.split(r"^```.*$", text, flags=re.M)) if i % 2 == 0)


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_slug_follows_the_heading_rules():
    assert _slug("Offline datasets without D4RL's servers") == "offline-datasets-without-d4rls-servers"
    assert _slug("`experiment.py` flags") == "experimentpy-flags"
    assert _slug("Analyses of the pre-training paper (`analysis/`, `mine/`)") == \
        "analyses-of-the-pre-training-paper-analysis-mine"


def test_every_in_page_link_names_a_heading():
    headings = {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", _prose(README), flags=re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", README)
    assert links, "the README has in-page links"
    assert sorted(set(links) - headings) == []


def test_every_relative_file_link_exists():
    targets = [t for t in re.findall(r"\]\(([^)#\s]+)\)", README) if "://" not in t]
    assert targets, "the README links files (figures)"
    assert [t for t in targets if not (ROOT / t).exists()] == []


def test_every_script_and_module_the_readme_runs_exists():
    """`python path.py` from the project root or from a folder the README says to `cd` into; `python -m module`
    importable."""
    folders = [ROOT] + [ROOT / d for d in set(re.findall(r"\bcd ([\w./-]+)", README)) if (ROOT / d).is_dir()]
    scripts = set(re.findall(r"\bpython3? ([\w./-]+\.py)\b", README))
    modules = set(re.findall(r"\bpython3? -m ([\w.]+)", README)) - {"pip", "venv", "pytest"}
    assert len(scripts) > 20 and len(modules) >= 4
    assert sorted(s for s in scripts if not any((f / s).is_file() for f in folders)) == []
    assert sorted(m for m in modules if importlib.util.find_spec(m) is None) == []
