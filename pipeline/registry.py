"""The dealer registry: which region, brand and dealer group each dealer code belongs to.

Events carry only ``dealer_id`` (DOMAIN.md "Events"); region, brand and group
come from here. The registry is a CSV file with the header
``dealer_id,name,region,brand,group``, kept by hand in Excel more often than
not, hence:

* UTF-8, with or without a byte-order mark (Excel's "CSV UTF-8" writes one,
  and needs one to open Chinese names correctly, so :func:`write_registry`
  writes it);
* header names are matched case-insensitively and in any order, surrounding
  spaces are trimmed from every value, blank lines and rows of empty cells
  (Excel leaves them behind) are skipped, and so are empty trailing cells;
* every problem is a :class:`RegistryError` that names the file and the line.

Without a registry, region and brand are :data:`UNKNOWN`.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from _csv import Reader as _Reader

UNKNOWN: Final[str] = "unknown"
"""Region / brand / group of a dealer when no registry is used or the dealer is not in it."""

COLUMNS: Final[tuple[str, ...]] = ("dealer_id", "name", "region", "brand", "group")
"""The registry file's columns, in the order :func:`write_registry` writes them."""

DEALER_ID_PATTERN: Final[re.Pattern[str]] = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
"""A dealer code, as the event schema accepts it in ``dealer_id``."""

_DEALER_ID_RULE = "1-32 characters from A-Z a-z 0-9 _ . -, starting with a letter or digit"
_UTF8_HINT = "in Excel, save it as 'CSV UTF-8 (Comma delimited)'"


class RegistryError(ValueError):
    """A registry file that cannot be used; the message is ``<file>:<line>: <problem>``."""

    def __init__(self, path: str | os.PathLike[str], line: int | None, problem: str) -> None:
        self.path = os.fspath(path)
        self.line = line
        self.problem = problem
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class Dealer:
    """One dealer (one row of the registry)."""

    dealer_id: str
    name: str
    region: str
    brand: str
    group: str


class DealerRegistry(Mapping[str, Dealer]):
    """Dealers by ``dealer_id``, in file order; read-only."""

    def __init__(self, dealers: Iterable[Dealer] = ()) -> None:
        self._dealers: dict[str, Dealer] = {}
        for dealer in dealers:
            if dealer.dealer_id in self._dealers:
                raise ValueError(f"duplicate dealer_id {dealer.dealer_id!r}")
            self._dealers[dealer.dealer_id] = dealer

    def __getitem__(self, dealer_id: str) -> Dealer:
        return self._dealers[dealer_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dealers)

    def __len__(self) -> int:
        return len(self._dealers)

    def __contains__(self, dealer_id: object) -> bool:
        return dealer_id in self._dealers

    def __repr__(self) -> str:
        return f"DealerRegistry({len(self)} dealers)"

    def regions(self) -> list[str]:
        """The distinct regions, sorted."""
        return sorted({d.region for d in self._dealers.values()})

    def brands(self) -> list[str]:
        """The distinct brands, sorted."""
        return sorted({d.brand for d in self._dealers.values()})

    def groups(self) -> list[str]:
        """The distinct dealer groups, sorted."""
        return sorted({d.group for d in self._dealers.values()})

    def region_of(self, dealer_id: str) -> str:
        """The dealer's region, :data:`UNKNOWN` for a dealer not in the registry."""
        dealer = self._dealers.get(dealer_id)
        return UNKNOWN if dealer is None else dealer.region

    def brand_of(self, dealer_id: str) -> str:
        """The dealer's brand, :data:`UNKNOWN` for a dealer not in the registry."""
        dealer = self._dealers.get(dealer_id)
        return UNKNOWN if dealer is None else dealer.brand


def _problem(dealer: Dealer) -> str | None:
    """What is wrong with one dealer's fields (empty, untrimmed, bad code), or None."""
    for f in fields(Dealer):
        value = getattr(dealer, f.name)
        if not value:
            return f"empty {f.name}"
        if value != value.strip():
            return f"{f.name} {value!r} has leading or trailing spaces"
        if "\n" in value or "\r" in value:
            return f"{f.name} {value!r} spans several lines"
    if not DEALER_ID_PATTERN.fullmatch(dealer.dealer_id):
        return f"dealer_id {dealer.dealer_id!r} is not a valid dealer code ({_DEALER_ID_RULE})"
    return None


def load_registry(path: str | os.PathLike[str]) -> DealerRegistry:
    """Read and check a registry CSV file; RegistryError (naming file and line) if it is bad."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RegistryError(path, line, f"not UTF-8 text ({_UTF8_HINT})") from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        return _read(path, reader)
    except csv.Error as exc:
        raise RegistryError(path, reader.line_num, f"malformed CSV: {exc}") from None


def _read(path: str | os.PathLike[str], reader: _Reader) -> DealerRegistry:
    expected = ",".join(COLUMNS)
    header = next(reader, None)
    if header is None:
        raise RegistryError(path, 1, f"empty file: expected the header {expected}")
    names = [h.strip().lower() for h in header]
    while names and not names[-1]:
        names.pop()
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise RegistryError(path, 1, f"column {name!r} appears twice")
        seen.add(name)
    missing = [c for c in COLUMNS if c not in seen]
    extra = [n for n in names if n not in COLUMNS]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing column(s) {', '.join(missing)}")
        if extra:
            parts.append(f"unknown column(s) {', '.join(repr(n) for n in extra)}")
        raise RegistryError(path, 1, f"{'; '.join(parts)} (expected the header {expected})")
    position = {name: names.index(name) for name in COLUMNS}

    dealers: list[Dealer] = []
    first_line: dict[str, int] = {}
    end = reader.line_num
    for row in reader:
        # A record starts on the line after the previous one ended (a quoted
        # value may span lines).
        line, end = end + 1, reader.line_num
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        if len(cells) > len(names) and any(cells[len(names) :]):
            raise RegistryError(
                path, line, f"{len(cells)} fields, expected {len(names)} ({expected})"
            )
        if len(cells) < len(names):
            raise RegistryError(
                path, line, f"only {len(cells)} fields, expected {len(names)} ({expected})"
            )
        dealer = Dealer(**{name: cells[i] for name, i in position.items()})
        _check(dealer, line, first_line, path)
        dealers.append(dealer)
    return DealerRegistry(dealers)


def _check(
    dealer: Dealer, line: int, first_line: dict[str, int], path: str | os.PathLike[str]
) -> None:
    """One row's rules, for reading and writing alike; remembers its line."""
    problem = _problem(dealer)
    if problem is not None:
        raise RegistryError(path, line, problem)
    if dealer.dealer_id in first_line:
        first = first_line[dealer.dealer_id]
        raise RegistryError(
            path, line, f"duplicate dealer_id {dealer.dealer_id!r} (first on line {first})"
        )
    first_line[dealer.dealer_id] = line


def write_registry(dealers: Iterable[Dealer], path: str | os.PathLike[str]) -> int:
    """Write a registry file that :func:`load_registry` reads back equal; return the count.

    UTF-8 with a byte-order mark and CRLF line ends, as Excel writes and reads
    it. Dealers that could not be read back (empty or untrimmed values, a bad
    or duplicate code) raise RegistryError naming the line they would be on,
    and nothing is written.
    """
    rows: list[Dealer] = []
    first_line: dict[str, int] = {}
    for line, dealer in enumerate(dealers, start=2):
        _check(dealer, line, first_line, path)
        rows.append(dealer)
    with open(path, "w", encoding="utf-8-sig", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        writer.writerows([getattr(d, c) for c in COLUMNS] for d in rows)
    return len(rows)
