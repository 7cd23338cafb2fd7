"""Write the dashboards' Grafana JSON, or check that the committed JSON is current.

    python -m dashboards.build           # writes dashboards/json/<folder>/<uid>.json
    python -m dashboards.build --check   # exit 1, listing the files that differ

The JSON is generated from `dashboards.definitions` and committed, so Grafana's
file provisioning (one folder per directory) and reviewers read the same files;
keys are sorted and indented so a change to a definition diffs line by line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from dashboards.definitions import DASHBOARDS
from dashboards.model import Dashboard

JSON_DIR = Path(__file__).resolve().parent / "json"


def render(dashboard: Dashboard) -> str:
    """A dashboard's file content: sorted keys, two-space indent, a final newline."""
    return json.dumps(dashboard.to_grafana(), sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def expected_files(out_dir: Path, dashboards: Sequence[Dashboard] = DASHBOARDS) -> dict[Path, str]:
    """Each dashboard's path under `out_dir` and its content."""
    uids = [d.uid for d in dashboards]
    if len(uids) != len(set(uids)):
        raise ValueError(f"dashboard uids are not unique: {sorted(uids)}")
    return {out_dir / d.folder / f"{d.uid}.json": render(d) for d in dashboards}


def build_all(out_dir: Path = JSON_DIR) -> list[Path]:
    """Write every dashboard's JSON; remove stale JSON files; return the paths written."""
    files = expected_files(out_dir)
    for path in _existing(out_dir):
        if path not in files:
            path.unlink()
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
    for folder in sorted(out_dir.glob("*/"), reverse=True):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return sorted(files)


def check(out_dir: Path = JSON_DIR) -> list[str]:
    """Files (relative to `out_dir`) that differ from what would be generated,
    are missing, or are stale extras; empty when the JSON is current."""
    files = expected_files(out_dir)
    differing = {
        path
        for path, text in files.items()
        if not path.is_file() or path.read_text(encoding="utf-8") != text
    }
    differing |= {path for path in _existing(out_dir) if path not in files}
    return sorted(path.relative_to(out_dir).as_posix() for path in differing)


def _existing(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob("**/*.json")) if out_dir.is_dir() else []


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dashboards.build", description="Generate the Grafana dashboard JSON."
    )
    parser.add_argument("--out", type=Path, default=JSON_DIR, help=f"default {JSON_DIR}")
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if any file differs"
    )
    args = parser.parse_args(argv)
    if args.check:
        differing = check(args.out)
        for name in differing:
            print(f"differs: {name}", file=sys.stderr)
        if differing:
            print("run `python -m dashboards.build` to regenerate", file=sys.stderr)
            return 1
        print(f"{len(DASHBOARDS)} dashboard(s) up to date in {args.out}")
        return 0
    for path in build_all(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
