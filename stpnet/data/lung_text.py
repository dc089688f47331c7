"""STPNet's four lung categories from QaTa-COV19 annotation columns or from LViT-style sentences.

The categories (``configuration/text/qata-cov19.json``) are laterality, count, left location and right location.
A location sentence names the set of lung zones (upper / middle / lower) with lesions in that lung, e.g. upper +
lower -> "upper lower left lung", none -> "no lesion in left lung".
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from stpnet.data.io import DataError

ZONES = ("upper", "middle", "lower")
SIDES = ("left", "right")
LATERALITY = ("Unilateral pulmonary infection", "Bilateral pulmonary infection")
COUNT = ("one infected area", "multiple infected areas")
LUNG_CATEGORIES = ("laterality", "count", "left_location", "right_location")

_NUMBER_WORDS = {
    "one": 1,
    "single": 1,
    "a": 1,
    "an": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "multiple": 2,
    "several": 2,
    "many": 2,
}
# misspellings seen in the original LViT QaTa text ("upper midlle left lung")
_ZONE_ALIASES = {"upper": "upper", "middle": "middle", "midlle": "middle", "midle": "middle", "lower": "lower"}


def location_sentence(side: str, zones: set[str] | Sequence[str]) -> str:
    """Location sentence for one lung: zones in canonical order, or the explicit "no lesion" entry."""
    zones = set(zones)
    if not zones:
        return f"no lesion in {side} lung"
    return " ".join(z for z in ZONES if z in zones) + f" {side} lung"


def _shown(value: object) -> str:
    """A cell value for an error message; pandas gives a missing cell as NaN (or NA), which means "empty"."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or str(value) in ("nan", "<NA>", "NaT"):
        return "empty"
    return repr(value.item() if hasattr(value, "item") else value)  # numpy scalars print as np.int64(3)


def _whole_number(value: object, column: str, accepted: str, where: str) -> int:
    """An integer cell whatever type pandas read it as: 2, 2.0 (a column with a gap is float) or "2" (text)."""
    try:
        number = float(value.strip() if isinstance(value, str) else value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number != int(number):
        raise DataError(f"{where}: column {column!r} must be {accepted}, got {_shown(value)}")
    return int(number)


def categories_from_zones(
    pulmonary_infection: object, infected_area: object, zones6: Sequence[object] | str, where: str = "<row>"
) -> dict[str, str]:
    """QaTa-COV19 (SGSeg csv) columns -> the four category sentences.

    Args:
        pulmonary_infection: 1 = unilateral, 2 = bilateral.
        infected_area: number of positive zones; 1 -> "one infected area", >= 2 -> "multiple infected areas".
            0 would mean no infected zone, which the STPNet vocabulary cannot express: it raises.
        zones6: six 0/1 flags ordered left upper, left middle, left lower, right upper, right middle, right lower,
            as a sequence or as the csv's space-separated text.
        where: file and row, for error messages.

    Cells may come as pandas read them (int, whole float, numeric text); anything else (a word, an empty cell)
    raises :class:`DataError` naming ``where``, the column, the value and what is accepted.
    """
    zones_accepted = "six 0/1 flags separated by spaces (left upper middle lower, right upper middle lower), e.g. "
    zones_accepted += "'1 0 0 0 0 1'"
    if isinstance(zones6, str):
        cells, shown = zones6.split(), repr(zones6)
    elif isinstance(zones6, Sequence):
        cells, shown = list(zones6), repr(list(zones6))
    else:  # an empty cell arrives as NaN
        cells, shown = [], _shown(zones6)
    if len(cells) != 6 or any(str(c).strip() not in ("0", "1") for c in cells):
        raise DataError(f"{where}: column 'pseudo_label_6zones' must be {zones_accepted}, got {shown}")
    flags = [int(str(c).strip()) for c in cells]
    laterality = _whole_number(pulmonary_infection, "pulmonary_infection", "1 (unilateral) or 2 (bilateral)", where)
    if laterality not in (1, 2):
        raise DataError(
            f"{where}: column 'pulmonary_infection' must be 1 (unilateral) or 2 (bilateral), got {laterality}"
        )
    area = _whole_number(infected_area, "infected_area", "the number of infected zones, 1 to 6", where)
    if area <= 0:
        raise DataError(
            f"{where}: infected_area is {area} (no infected zone); the STPNet vocabulary has no "
            "'no infection' entry for laterality/count"
        )
    if area != sum(flags):
        raise DataError(f"{where}: infected_area={area} but pseudo_label_6zones has {sum(flags)} positive zones")
    left = {z for z, f in zip(ZONES, flags[:3]) if f}
    right = {z for z, f in zip(ZONES, flags[3:]) if f}
    sides = int(bool(left)) + int(bool(right))
    if sides != laterality:
        raise DataError(
            f"{where}: pulmonary_infection={laterality} disagrees with the zones "
            f"(left {sorted(left) or 'none'}, right {sorted(right) or 'none'})"
        )
    return {
        "laterality": LATERALITY[laterality - 1],
        "count": COUNT[0] if area == 1 else COUNT[1],
        "left_location": location_sentence("left", left),
        "right_location": location_sentence("right", right),
    }


def _parse_locations(clause: str) -> dict[str, set[str]] | str:
    """Zones per side from e.g. "all left lung and upper middle right lung"; a reason string on failure."""
    tokens = re.findall(r"[a-z]+", clause)
    found: dict[str, set[str]] = {}
    pending: set[str] = set()
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token in _ZONE_ALIASES:
            pending.add(_ZONE_ALIASES[token])
        elif token == "all":
            pending.update(ZONES)
        elif token in ("no", "lesion", "lesions", "in"):
            pending.add("none")
        elif token in SIDES:
            if not pending:
                return f"no zone given for the {token} lung"
            if token in found:
                return f"the {token} lung is named twice"
            found[token] = set() if pending == {"none"} else pending - {"none"}
            if "none" in pending and pending != {"none"}:
                return f"contradictory zones for the {token} lung"
            pending = set()
            if i + 1 < len(tokens) and tokens[i + 1] in ("lung", "lungs"):
                i += 1
        elif token not in ("and", "the", "of", "lung", "lungs"):
            return f"unexpected word {token!r} in the location part {clause!r}"
        i += 1
    if pending:
        return f"zones {sorted(pending)} are not followed by 'left lung' or 'right lung'"
    if not found:
        return "no lung location found"
    return found


def parse_lung_description(text: str, where: str = "<text>") -> dict[str, str]:
    """An LViT/SGSeg-style sentence -> the four category sentences.

    Accepts e.g. "Bilateral pulmonary infection, two infected areas, middle left lung and upper right lung." and
    the SGSeg rewrites ("six infected areas, upper middle lower left lung ..."). "all X lung" means upper middle
    lower. The count category comes from the count word (one -> one area, two or more -> multiple); note that in
    the original LViT text this word is not the number of zones. The stated laterality must match the lungs named.

    Raises:
        DataError: naming ``where`` and the reason when the sentence cannot be parsed.
    """
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: empty description")
    lowered = text.strip().lower()
    has_uni, has_bi = "unilateral" in lowered, "bilateral" in lowered
    if has_uni == has_bi:
        raise DataError(f"{where}: cannot tell unilateral from bilateral in description {text!r}")
    count_match = re.search(r"\b([a-z]+|\d+)\s+infected\s+areas?\b", lowered)
    if count_match is None:
        raise DataError(f"{where}: no '<number> infected area(s)' part in description {text!r}")
    word = count_match.group(1)
    number = int(word) if word.isdigit() else _NUMBER_WORDS.get(word)
    if number is None or number < 1:
        raise DataError(f"{where}: unknown count {word!r} in description {text!r}")
    locations = _parse_locations(lowered[count_match.end() :])
    if isinstance(locations, str):
        raise DataError(f"{where}: {locations} in description {text!r}")
    sides = sum(bool(locations.get(s)) for s in SIDES)
    if sides != (2 if has_bi else 1):
        raise DataError(
            f"{where}: says {'bilateral' if has_bi else 'unilateral'} but names lesions in {sides} lung(s): {text!r}"
        )
    return {
        "laterality": LATERALITY[1 if has_bi else 0],
        "count": COUNT[0] if number == 1 else COUNT[1],
        "left_location": location_sentence("left", locations.get("left", set())),
        "right_location": location_sentence("right", locations.get("right", set())),
    }
