"""The options tables in README.md and docs/gear_hf.md say what the codec registry says.

Both are written by hand for readers; these tests keep them true: every method in
gear_kernels.codecs.CODECS, in order, with its options and their defaults as its codec's dataclass
defines them. A default that another option decides (key_bits follows bits) is written as that
option's name; README writes a codec's inherited options as its parent's ("kivi's").
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from gear_kernels import GearConfig
from gear_kernels.codecs import CODECS, METHODS
from gear_kernels.config import SHARED, option_types
from lm_eval_gear.model_args import RUN_OPTIONS

REPO = Path(__file__).resolve().parents[1]
README_HEADER = "| method | options (defaults) |"
DOCS_HEADER = "| option | default | allowed | methods |"


def table(path: Path, header: str) -> list[list[str]]:
    """The rows (lists of stripped cells) of the markdown table that starts with `header`."""
    lines = path.read_text().splitlines()
    assert lines.count(header) == 1, f"{path.name}: expected one table headed {header!r}"
    rows = []
    for line in lines[lines.index(header) + 2:]:  # past the header and its |---| line
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def top_level_items(cell: str) -> list[str]:
    """A cell's comma-separated items, commas inside parentheses left alone."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(cell):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(cell[start:i].strip())
            start = i + 1
    return [*items, cell[start:].strip()]


def ticked(text: str) -> list[str]:
    return re.findall(r"`([^`]*)`", text)


def registered_parent(method: str) -> str | None:
    """The nearest registered codec that `method`'s codec derives from (its options are inherited)."""
    for base in CODECS[method].__mro__[1:]:
        if base in CODECS.values():
            return base.name
    return None


def check_default(method: str, option: str, written: str) -> None:
    """`written` is the default of `option` under `method`: its value once the codec is built
    with no options, or (for a field whose dataclass default None means "decided by another
    option") the name of the option it then equals."""
    built = CODECS[method]()
    value = getattr(built, option)
    field = {f.name: f for f in dataclasses.fields(built)}[option]
    if written in CODECS[method].options():
        assert field.default is None and value == getattr(built, written), \
            f"{method}: {option} is written to default to {written}, but it is {value!r}"
    else:
        assert written == ("none" if value is None else str(value)), \
            f"{method}: {option} is written to default to {written!r}, but it is {value!r}"


# ------------------------------------------------------------------------- README.md


def readme_rows() -> dict[str, str]:
    rows = table(REPO / "README.md", README_HEADER)
    assert all(len(row) == 2 for row in rows), rows
    methods = [ticked(method) for method, _ in rows]
    assert all(len(m) == 1 for m in methods), methods
    return {m[0]: options for m, (_, options) in zip(methods, rows)}


def test_readme_lists_every_method_in_order():
    assert tuple(readme_rows()) == METHODS


@pytest.mark.parametrize("method", METHODS)
def test_readme_gives_each_methods_options_and_defaults(method):
    cell = readme_rows()[method]
    own = list(CODECS[method].options())
    items = [] if cell == "(none)" else top_level_items(cell)
    parent = registered_parent(method)
    if parent is not None:  # written as the parent's, then the method's own options
        assert items[0] == f"{parent}'s", f"{method}: the first item should be {parent}'s, not {items[0]!r}"
        items = items[1:]
        inherited = CODECS[parent].options()
        own = [o for o in own if o not in inherited]
        for option in inherited:  # the same defaults as the parent's, or "kivi's" would mislead
            assert getattr(CODECS[method](), option) == getattr(CODECS[parent](), option), (method, option)
    written = []
    for item in items:
        match = re.fullmatch(r"((?:`\w+`(?: / )?)+) \(([^)]*)\)", item)
        assert match, f"{method}: cannot read {item!r}: write `option` (default) or `a` / `b` (default)"
        default = match[2].split(";")[0].strip().strip("`")
        for option in ticked(match[1]):
            check_default(method, option, default)
            written.append(option)
    assert sorted(written) == sorted(own), f"{method}: the table lists {written}, the codec has {own}"


# ------------------------------------------------------------------------- docs/gear_hf.md


def docs_rows() -> dict[str, tuple[str, str, str]]:
    """option -> (default, allowed, methods), one entry for each option a row names."""
    rows = table(REPO / "docs" / "gear_hf.md", DOCS_HEADER)
    assert all(len(row) == 4 for row in rows), rows
    named: dict[str, tuple[str, str, str]] = {}
    for options, default, allowed, methods in rows:
        for option in ticked(options):
            assert option not in named, f"docs/gear_hf.md: {option} has two rows"
            named[option] = (default, allowed, methods)
    return named


def test_docs_list_every_option_once():
    assert set(docs_rows()) == {"method", *option_types(), *SHARED, *RUN_OPTIONS}


def test_docs_method_row_lists_every_method_in_order():
    default, allowed, methods = docs_rows()["method"]
    assert (default, methods) == (f"`{GearConfig().method}`", "")
    assert tuple(ticked(item)[0] for item in top_level_items(allowed)) == METHODS


@pytest.mark.parametrize("option", list(option_types()))
def test_docs_give_each_codec_options_methods_and_default(option):
    default, _, methods = docs_rows()[option]
    takers = [m for m in METHODS if option in CODECS[m].options()]
    assert methods == ", ".join(takers)
    (written,) = ticked(default)
    for method in takers:
        check_default(method, option, written)


@pytest.mark.parametrize("option", [*SHARED, *RUN_OPTIONS])
def test_docs_give_options_of_every_method_as_all(option):
    default, _, methods = docs_rows()[option]
    assert methods == "all"
    if option in SHARED:
        assert default == f"`{getattr(GearConfig(), option)}`"
