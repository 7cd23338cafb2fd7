"""The questionnaire catalogue: which attribute feeds which CSI factor, the
factor weights and the RATER dimension of each attribute.

Loaded from a versioned TOML file (default `schemas/questionnaire.toml`, the
DOMAIN.md defaults); every figure records `Catalogue.version`.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

DEFAULT_QUESTIONNAIRE = Path(__file__).resolve().parent.parent / "schemas" / "questionnaire.toml"
DEFAULT_ACSI_WEIGHTS = {"overall": 1 / 3, "disconfirmation": 1 / 3, "ideal": 1 / 3}
RATER_DIMENSIONS = ("reliability", "assurance", "tangibles", "empathy", "responsiveness")


@dataclass(frozen=True)
class Catalogue:
    version: str
    factor_weights: dict[str, float]
    attribute_factor: dict[str, str]
    attribute_dimension: dict[str, str]
    acsi_weights: dict[str, float]
    """Weights of the ACSI-style index's items: overall, disconfirmation, ideal."""

    @property
    def factors(self) -> tuple[str, ...]:
        return tuple(self.factor_weights)


class CatalogueError(ValueError):
    pass


def catalogue_from_dict(data: dict[str, Any], origin: str = "<dict>") -> Catalogue:
    """Build and check a catalogue; every problem names the file and the entry."""
    try:
        version = str(data["version"])
        factors = {str(k): float(v) for k, v in data["factors"].items()}
        attributes = data["attributes"]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CatalogueError(
            f"{origin}: needs `version`, `[factors]` and `[attributes]` ({exc})"
        ) from exc
    bad_weights = [f for f, w in factors.items() if not w > 0]
    if bad_weights:
        raise CatalogueError(f"{origin}: factor weights must be > 0: {bad_weights}")
    attribute_factor: dict[str, str] = {}
    attribute_dimension: dict[str, str] = {}
    for code, spec in attributes.items():
        factor, dimension = spec.get("factor"), spec.get("dimension")
        if factor not in factors:
            raise CatalogueError(f"{origin}: attribute {code!r} names unknown factor {factor!r}")
        if dimension not in RATER_DIMENSIONS:
            raise CatalogueError(
                f"{origin}: attribute {code!r} has dimension {dimension!r}, "
                f"expected one of {RATER_DIMENSIONS}"
            )
        attribute_factor[code] = factor
        attribute_dimension[code] = dimension
    empty = [f for f in factors if f not in attribute_factor.values()]
    if empty:
        raise CatalogueError(f"{origin}: factors without attributes: {empty}")
    acsi = {str(k): float(v) for k, v in data.get("acsi", DEFAULT_ACSI_WEIGHTS).items()}
    if set(acsi) != set(DEFAULT_ACSI_WEIGHTS) or abs(sum(acsi.values()) - 1.0) > 1e-9:
        raise CatalogueError(
            f"{origin}: [acsi] needs weights for {sorted(DEFAULT_ACSI_WEIGHTS)} summing to 1"
        )
    return Catalogue(version, factors, attribute_factor, attribute_dimension, acsi)


@cache
def load_catalogue(path: Path | None = None) -> Catalogue:
    """The catalogue at `path`, else `$CSI_QUESTIONNAIRE`, else the default."""
    path = path or Path(os.environ.get("CSI_QUESTIONNAIRE") or DEFAULT_QUESTIONNAIRE)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CatalogueError(f"cannot read questionnaire {path}: {exc}") from exc
    return catalogue_from_dict(data, str(path))
