"""The docs stay walkable: generated pages current, links and anchors alive, the schema and metrics documented."""
from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # JetPack 6 ships Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
# Pages the pretrained-base work (issue 16) adds; the docs map links them already. Drop a name once its page exists.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def _prose(text: str) -> str:
    """The page without its code blocks and inline code (a pasted report's image links are not the page's)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to hyphens."""
    text = "".join(c for c in heading.strip().lower() if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"#{1,6} (.*)", line)
        if m:
            s = slug(m.group(1))
            out.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return out


def test_reference_pages_are_generated_from_the_code():
    from fedlab import configdoc

    for rel, text in configdoc.pages(ROOT).items():
        assert (ROOT / rel).read_text() == text, (
            f"{rel} is stale: run `python -m fedlab.configdoc` and commit the result")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_existing_files_and_headings(page):
    broken = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.is_file() and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_readme_maps_every_docs_page():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in LINK.findall((ROOT / "README.md").read_text())}
    missing = [str(p.relative_to(ROOT)) for p in DOCS.rglob("*.md") if p.resolve() not in linked]
    assert not missing, f"README's map of the docs lacks {missing}"


def test_docs_pages_the_code_cites_exist():
    """Messages and comments that send a reader to a page (hwreport's MFU formula, the method seam) stay true."""
    sources = [p for d in ("fedcore", "fedserver", "fedclient", "fedlab", "netem", "bench", "tests", "systemd")
               for p in (ROOT / d).rglob("*") if p.is_file() and p.suffix in (".py", ".service")]
    cited = {(p, m) for p in [*sources, ROOT / "pyproject.toml", ROOT / ".ci" / "run"]
             for m in re.findall(r"\bdocs/[\w./-]+\.md\b", p.read_text())}
    assert cited, "no docs page cited in the code"
    missing = [f"{p.relative_to(ROOT)}: {m}" for p, m in sorted(cited)
               if not (ROOT / m).is_file()]
    assert not missing, "cited docs pages that do not exist: " + "; ".join(missing)


def test_the_readme_stays_short():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= 200, f"README.md has {n} lines; move the detail into docs/ (see its map)"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_page_says_first_what_it_is_for(page):
    lines = page.read_text().splitlines()
    assert lines[0].startswith("# "), f"{page.relative_to(ROOT)} starts without a title"
    first = next(line for line in lines[1:] if line.strip())
    assert not first.startswith(("#", "|", "```", "-")), (
        f"{page.relative_to(ROOT)}: the title is followed by {first[:40]!r}, not a line saying what the page is for")


def test_no_page_names_a_machine_path():
    found = [f"{p.relative_to(ROOT)}:{i}: {line.strip()[:80]}" for p in PAGES
             for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"/(tmp|work|root|home)/", line)]
    assert not found, "absolute machine paths (use runs/..., fleet/... instead):\n" + "\n".join(found)


def _table_keys(page: Path, heading: str) -> set[str]:
    """The first-column keys (`key`) of the first table under a heading that starts with `heading`."""
    text = page.read_text()
    start = next(m.end() for m in re.finditer(r"^#+ (.*)$", text, re.M) if m.group(1).startswith(heading))
    keys: set[str] = set()
    in_table = False
    for line in text[start:].splitlines():
        if line.startswith("|"):
            in_table = True
            keys |= set(re.findall(r"`([^`]+)`", line.split("|")[1]))
        elif in_table:
            break
    return keys


def test_every_round_record_key_is_documented():
    from fedcore.records import DeviceRound, RoundSummary

    page = DOCS / "reference" / "rounds-jsonl.md"
    for cls, heading in ((DeviceRound, "`rounds.jsonl`"), (RoundSummary, "`summary.json`")):
        schema = {f.name for f in dataclasses.fields(cls)} - {"more"}
        documented = _table_keys(page, heading)
        assert schema == documented, (f"{page.relative_to(ROOT)}, {heading}: undocumented {sorted(schema - documented)}, "
                                      f"not in {cls.__name__} {sorted(documented - schema)}")


def _registered_metrics() -> set[str]:
    from fedclient.metrics import DeviceStats, client_registry
    from fedserver.metrics import server_registry

    # The families exist once registered; a server stub with no snapshot leaves them without samples.
    server = server_registry(SimpleNamespace(snapshot=dict)).render()
    client = client_registry(DeviceStats(), "dev-00").render()
    return set(re.findall(r"^# TYPE (\S+) ", server + client, re.M))


def test_every_prometheus_metric_is_documented():
    page = DOCS / "reference" / "metrics.md"
    documented = set(re.findall(r"`(fedtune_(?:server|client)_\w+)`", page.read_text()))
    registered = _registered_metrics()
    assert registered == documented, (f"{page.relative_to(ROOT)}: undocumented {sorted(registered - documented)}, "
                                      f"not registered {sorted(documented - registered)}")


def test_every_scenario_is_listed():
    page = (DOCS / "how-to" / "netem.md").read_text()
    missing = [p.stem for p in (ROOT / "fedlab" / "scenarios").glob("*.toml") if f"| `{p.stem}` |" not in page]
    assert not missing, f"docs/how-to/netem.md does not list the scenarios {missing}"


def _toml_blocks():
    for page in PAGES:
        for block in re.findall(r"^```toml\n(.*?)^```", page.read_text(), re.M | re.S):
            yield page, block


def test_toml_examples_use_real_settings():
    from fedclient.config import ClientConfig
    from fedcore.config import from_mapping
    from fedlab.simulate import SimulateConfig
    from fedserver.config import ServerConfig

    blocks = list(_toml_blocks())
    assert blocks, "no TOML examples found"
    for page, block in blocks:
        where, first = page.relative_to(ROOT), block.splitlines()[0]
        data = tomllib.loads(block)
        if "fedserver simulate" in first:  # a whole simulation file: it must load
            from_mapping(SimulateConfig, data, source=str(where))
            continue
        cls = ServerConfig if "server.toml" in first else ClientConfig if "device.toml" in first else None
        assert cls is not None, f"{where}: a TOML example should say which file it is on its first line: {first!r}"
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        assert not unknown, f"{where}: {first!r} names settings {cls.__name__} does not have: {sorted(unknown)}"
