"""The dealer registry file: round trip, Excel habits, and errors that name file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.registry import (
    UNKNOWN,
    Dealer,
    DealerRegistry,
    RegistryError,
    load_registry,
    write_registry,
)

HEADER = "dealer_id,name,region,brand,group"

DEALERS = [
    Dealer("D001", "杭州华信极光4S店", "East", "Aurora", "Huaxin Auto Group"),
    Dealer("D002", 'Meridian "Lakeside", Motors', "North", "Meridian", "Independent"),
    Dealer("SH-02.b", "上海金路子午汽车服务中心", "East", "Meridian", "金路汽车集团"),
    Dealer("7", "Kestrel Xi'an Cars", "West", "Aurora", "Huaxin Auto Group"),
]


def write(tmp_path: Path, text: str, encoding: str = "utf-8") -> Path:
    path = tmp_path / "dealers.csv"
    path.write_bytes(text.encode(encoding))
    return path


def test_round_trip_with_chinese_names_quotes_and_commas(tmp_path: Path) -> None:
    path = tmp_path / "registry.csv"
    assert write_registry(DEALERS, path) == len(DEALERS)
    raw = path.read_bytes()
    # Excel's "CSV UTF-8": a byte-order mark and CRLF line ends.
    assert raw.startswith(b"\xef\xbb\xbf" + HEADER.encode() + b"\r\n")
    registry = load_registry(path)
    assert list(registry.values()) == DEALERS
    assert list(registry) == [d.dealer_id for d in DEALERS]
    # Written again, byte for byte the same file.
    again = tmp_path / "again.csv"
    write_registry(registry.values(), again)
    assert again.read_bytes() == raw


def test_registry_lookups(tmp_path: Path) -> None:
    path = tmp_path / "registry.csv"
    write_registry(DEALERS, path)
    registry = load_registry(path)
    assert len(registry) == 4
    assert "D001" in registry and "D999" not in registry
    assert registry["D001"].name == "杭州华信极光4S店"
    assert registry.get("SH-02.b") == DEALERS[2]
    assert registry.get("D999") is None
    with pytest.raises(KeyError):
        registry["D999"]
    assert registry.regions() == ["East", "North", "West"]
    assert registry.brands() == ["Aurora", "Meridian"]
    assert registry.groups() == ["Huaxin Auto Group", "Independent", "金路汽车集团"]
    assert registry.region_of("D002") == "North" and registry.brand_of("D002") == "Meridian"
    assert registry.region_of("D999") == UNKNOWN == registry.brand_of("D999") == "unknown"
    assert registry == DealerRegistry(DEALERS)
    assert DealerRegistry() == {} and len(DealerRegistry()) == 0
    with pytest.raises(ValueError, match="duplicate dealer_id 'D001'"):
        DealerRegistry([DEALERS[0], DEALERS[0]])


def test_dealer_is_frozen() -> None:
    with pytest.raises(AttributeError):
        DEALERS[0].region = "West"  # type: ignore[misc]


def test_excel_habits_are_tolerated(tmp_path: Path) -> None:
    # BOM, CRLF, columns in another order and case, padded values, blank lines,
    # empty trailing columns and rows of empty cells.
    text = (
        "\ufeffRegion, Dealer_ID ,name,BRAND,group,\r\n"
        " East , D001 , 杭州华信极光4S店 ,Aurora,Huaxin Auto Group,\r\n"
        "\r\n"
        ",,,,,\r\n"
        'North,D002,"Meridian ""Lakeside"", Motors",Meridian,Independent,\r\n'
    )
    registry = load_registry(write(tmp_path, text))
    assert list(registry.values()) == DEALERS[:2]


def test_plain_utf8_without_bom_and_header_only(tmp_path: Path) -> None:
    registry = load_registry(write(tmp_path, f"{HEADER}\nD001,名,East,Aurora,G\n"))
    assert registry["D001"] == Dealer("D001", "名", "East", "Aurora", "G")
    assert len(load_registry(write(tmp_path, HEADER + "\n"))) == 0


OK_ROW = "D001,杭州店,East,Aurora,Huaxin"


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("", 1, "empty file: expected the header dealer_id,name,region,brand,group"),
        ("dealer_id,name,region,brand\nD001,a,b,c\n", 1, "missing column(s) group"),
        (f"{HEADER},city\n{OK_ROW},Hangzhou\n", 1, "unknown column(s) 'city'"),
        ("dealer_id,name,brand,group\n", 1, "missing column(s) region"),
        (f"{HEADER},region\n", 1, "column 'region' appears twice"),
        (f"{HEADER}\n{OK_ROW}\nD002,,East,Aurora,Huaxin\n", 3, "empty name"),
        (f"{HEADER}\n{OK_ROW}\nD002,名, ,Aurora,Huaxin\n", 3, "empty region"),
        (f"{HEADER}\n\n{OK_ROW}\nD002,b,East,Aurora,\n", 4, "empty group"),
        (
            f"{HEADER}\n{OK_ROW}\nD002,b,East,Aurora,G\n{OK_ROW}\n",
            4,
            "duplicate dealer_id 'D001' (first on line 2)",
        ),
        (f"{HEADER}\nD 001,a,East,Aurora,G\n", 2, "dealer_id 'D 001' is not a valid dealer code"),
        (f"{HEADER}\n-D001,a,East,Aurora,G\n", 2, "dealer_id '-D001' is not a valid"),
        (f"{HEADER}\n{'D' * 33},a,East,Aurora,G\n", 2, "is not a valid dealer code"),
        (f"{HEADER}\n店001,a,East,Aurora,G\n", 2, "dealer_id '店001' is not a valid"),
        (f"{HEADER}\n{OK_ROW}\nD002,a,East,Aurora\n", 3, "only 4 fields, expected 5"),
        (f"{HEADER}\n{OK_ROW}\nD002,a,East,Aurora,G,extra\n", 3, "6 fields, expected 5"),
        # A quoted value over two lines: the record starts on line 2, the next on line 4.
        (f'{HEADER}\nD001,"two\nlines",East,Aurora,G\n', 2, "name 'two\\nlines' spans"),
        (f'{HEADER}\nD001,"a ""b""",East,Aurora,G\n"D002,x\n', 3, "malformed CSV"),
    ],
)
def test_each_problem_names_file_and_line(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(RegistryError) as caught:
        load_registry(path)
    error = caught.value
    assert isinstance(error, ValueError)
    assert error.path == str(path) and error.line == line
    assert str(error).startswith(f"{path}:{line}: ")
    assert message in str(error)


def test_line_numbers_count_blank_lines_and_multi_line_records(tmp_path: Path) -> None:
    text = f"{HEADER}\r\n{OK_ROW}\r\n\r\nD002,b,East,Aurora,G\r\n{OK_ROW}\r\n"
    with pytest.raises(RegistryError, match=r":5: duplicate dealer_id 'D001' \(first on line 2\)"):
        load_registry(write(tmp_path, text))
    # A record whose quoted name runs over lines 4-5 is reported at its first line.
    text = f'{HEADER}\n{OK_ROW}\n\nD002,"two\nlines",East,Aurora,G\nD003,c,East,Aurora,G\n'
    with pytest.raises(RegistryError, match=r":4: name 'two\\nlines' spans several lines"):
        load_registry(write(tmp_path, text))


def test_file_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    # What Excel's plain "CSV" gives on a Chinese Windows: GBK.
    path = write(tmp_path, f"{HEADER}\nD001,a,East,Aurora,G\nD002,杭州店,East,Aurora,G\n", "gbk")
    with pytest.raises(
        RegistryError, match=r":3: not UTF-8 text \(in Excel, save it as 'CSV UTF-8"
    ):
        load_registry(path)


@pytest.mark.parametrize(
    ("dealers", "line", "message"),
    [
        ([DEALERS[0], Dealer("D 2", "n", "r", "b", "g")], 3, "not a valid dealer code"),
        ([DEALERS[0], DEALERS[1], DEALERS[0]], 4, "duplicate dealer_id 'D001' (first on line 2)"),
        ([Dealer("D1", "", "r", "b", "g")], 2, "empty name"),
        ([Dealer("D1", " n", "r", "b", "g")], 2, "leading or trailing spaces"),
        ([Dealer("D1", "n", "r\nx", "b", "g")], 2, "spans several lines"),
    ],
)
def test_write_refuses_what_could_not_be_read_back(
    tmp_path: Path, dealers: list[Dealer], line: int, message: str
) -> None:
    path = tmp_path / "out.csv"
    with pytest.raises(RegistryError) as caught:
        write_registry(dealers, path)
    assert caught.value.line == line and message in str(caught.value)
    assert not path.exists()
