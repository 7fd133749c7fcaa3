"""Joules into kWh, grams CO2e and money: offline intensity tables, PUE, price, time series."""

from __future__ import annotations

import bisect
import csv
import datetime as dt
import difflib
import functools
import itertools
import logging
import math
import re
import unicodedata
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from green_callbacks.units import brief, is_finite_number

log = logging.getLogger("green_callbacks")

J_PER_KWH = 3.6e6
WORLD_G_PER_KWH = 481.0
OWID = "Our World in Data energy dataset (Ember, Energy Institute), CC BY 4.0"


@dataclass(frozen=True)
class CarbonIntensity:
    """Grams CO2e per kWh and where the figure came from."""

    g_per_kwh: float
    label: str
    source: str
    year: str

    def as_params(self) -> dict[str, str]:
        return {"carbon_intensity_g_per_kwh": f"{self.g_per_kwh:g}", "carbon_intensity_label": self.label,
                "carbon_intensity_source": self.source, "carbon_intensity_year": self.year}


def _read_table(name: str) -> list[dict[str, str]]:
    with resources.files("green_callbacks.data").joinpath(name).open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


@functools.cache
def country_table() -> dict[str, dict[str, str]]:
    """Rows of the country table keyed by alpha-3, alpha-2 and lower-case name."""
    table: dict[str, dict[str, str]] = {}
    for row in _read_table("grid_carbon_intensity_by_country.csv"):
        for key in (row["iso3"], row["iso2"], row["country"].lower()):
            table[key] = row
    return table


@functools.cache
def region_table() -> dict[str, dict[str, str]]:
    """Rows of the cloud-region table keyed by ``provider:region``."""
    return {f"{r['provider']}:{r['region']}": r for r in _read_table("cloud_region_carbon_intensity.csv")}


def _unknown(kind: str, value: str, choices: list[str], hint: str = "") -> ValueError:
    close = difflib.get_close_matches(value, choices, n=5, cutoff=0.5)
    near = f" Did you mean: {', '.join(close)}?" if close else ""
    return ValueError(f"unknown {kind} {brief(value)}.{near}{hint}")


# codes people write that ISO 3166 reserves for another use: UK for GB (reserved at the UK's request), EL for GR
# (the EU's code for Greece)
_COUNTRY_ALIASES = {"UK": "GB", "EL": "GR"}
# the names ISO 3166 and the UN use where the table (Our World in Data's) uses the short one, and common others
_COUNTRY_NAMES = {
    "czech republic": "CZ", "russian federation": "RU", "korea": "KR", "republic of korea": "KR",
    "korea, republic of": "KR", "democratic people's republic of korea": "KP", "united states of america": "US",
    "great britain": "GB", "united kingdom of great britain and northern ireland": "GB", "viet nam": "VN",
    "iran, islamic republic of": "IR", "islamic republic of iran": "IR", "turkiye": "TR", "türkiye": "TR",
    "the netherlands": "NL", "holland": "NL", "syrian arab republic": "SY", "lao people's democratic republic": "LA",
    "republic of moldova": "MD", "united republic of tanzania": "TZ", "côte d'ivoire": "CI", "ivory coast": "CI",
    "bolivia (plurinational state of)": "BO", "venezuela (bolivarian republic of)": "VE",
    "brunei darussalam": "BN", "macedonia": "MK", "taiwan, province of china": "TW",
    # the table's "Congo" is the Republic of the Congo (Brazzaville); the DRC (Kinshasa) is its own row
    "republic of the congo": "CG", "republic of congo": "CG", "congo-brazzaville": "CG", "congo brazzaville": "CG",
    "congo, republic of the": "CG", "congo, the democratic republic of the": "CD", "dr congo": "CD", "drc": "CD",
    "democratic republic of the congo": "CD", "congo-kinshasa": "CD", "congo kinshasa": "CD", "zaire": "CD",
    "timor-leste": "TL", "timor leste": "TL", "swaziland": "SZ", "kingdom of eswatini": "SZ",
    "cabo verde": "CV", "burma": "MM", "state of palestine": "PS", "palestine, state of": "PS",
    "congo (the)": "CG", "congo, rep.": "CG", "congo (the democratic republic of the)": "CD",
    "congo, democratic republic of the": "CD", "congo, dem. rep.": "CD", "korea, dem. people's rep.": "KP",
    "korea (the democratic people's republic of)": "KP", "korea, democratic people's republic of": "KP",
    "korea, rep.": "KR", "korea (the republic of)": "KR", "lao pdr": "LA", "republic of north macedonia": "MK",
    "the gambia": "GM", "gambia, the": "GM", "the bahamas": "BS", "bahamas, the": "BS", "macau": "MO",
}
# "Tanzania, United Republic of", "Moldova (the Republic of)": ISO 3166's "<name>, <qualifier> of" forms, found by
# the name before the qualifier; not where the qualifier says "Democratic" (Korea, Congo: another country than the
# bare name, each in _COUNTRY_NAMES) nor after a comma that qualifies a place ("Georgia, USA")
_ISO_QUALIFIED = re.compile(r"^(?P<name>[^,(]+?)\s*(?:,\s*(?P<comma>[^,()]+)|\((?P<paren>[^()]+)\))\s*$")


def _unaccented(name: str) -> str:
    """``"São Tomé and Príncipe"`` as ``"sao tome and principe"``, ``Côte d’Ivoire`` as ``"cote d'ivoire"``: a name
    typed with or without its accents, or with a typographic apostrophe, finds its row."""
    plain = "".join(c for c in unicodedata.normalize("NFKD", name) if not unicodedata.combining(c))
    return " ".join(plain.replace("\u2019", "'").replace("\u2018", "'").lower().split())


@functools.cache
def _unaccented_table() -> dict[str, dict[str, str]]:
    rows = {_unaccented(r["country"]): r for r in country_table().values()}
    rows.update({_unaccented(name): country_table()[code] for name, code in _COUNTRY_NAMES.items()
                 if code in country_table()})
    return rows


def _country_row(name: str) -> dict[str, str] | None:
    """The table's row for an ISO code, the table's name or another name of ``_COUNTRY_NAMES``, else None."""
    table = country_table()
    key = _COUNTRY_ALIASES.get(name.upper(), _COUNTRY_NAMES.get(" ".join(name.lower().split()), name))
    return table.get(key.upper()) or table.get(key.lower()) or _unaccented_table().get(_unaccented(key))


def _without_qualifier(name: str) -> str | None:
    """``"Bolivia"`` of ``"Bolivia, Plurinational State of"`` or ``"Moldova (the Republic of)"``; None for a name
    of another form."""
    match = _ISO_QUALIFIED.match(name)
    if match is None:
        return None
    qualifier = " ".join((match.group("comma") or match.group("paren")).lower().split())
    if "democratic" in qualifier or not (qualifier == "the" or qualifier.endswith((" of", " of the"))):
        return None
    return match.group("name")


def country_intensity(country: str) -> CarbonIntensity:
    """Intensity of a country by ISO alpha-2, alpha-3 or English name (case-insensitive)."""
    if not isinstance(country, str):  # (3 or a list: an AttributeError of .strip())
        raise ValueError(f"country={brief(country)} must be a string: an ISO 3166 alpha-2 or alpha-3 code or an "
                         "English name, like 'FR', 'FRA' or 'France'")
    table = country_table()
    key = country.strip()
    row = _country_row(key)
    if row is None and (name := _without_qualifier(key)) is not None:
        row = _country_row(name)
    if row is None:
        names = sorted({r["country"] for r in table.values()})
        codes = sorted({r["iso3"] for r in table.values()} | {r["iso2"] for r in table.values()})
        close = difflib.get_close_matches(key.lower(), [n.lower() for n in names], n=5, cutoff=0.6)
        close = [n for n in names if n.lower() in close]
        close += difflib.get_close_matches(key.upper(), codes, n=3, cutoff=0.6)
        near = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown country {brief(country)}.{near} Use an ISO 3166 alpha-2 or alpha-3 "
                         f"code or an English name; `green-callbacks intensity --list` lists all {len(names)}.")
    return CarbonIntensity(float(row["g_co2e_per_kwh"]), f"{row['country']} ({row['iso3']})", OWID, row["year"])


def region_intensity(region: str) -> CarbonIntensity:
    """Intensity of a cloud region written ``provider:region`` (Google Cloud publishes these)."""
    if not isinstance(region, str):
        raise ValueError(f"cloud_region={brief(region)} must be a string written provider:region, like "
                         "'gcp:europe-west1'")
    table = region_table()
    key = region.strip().lower()
    row = table.get(key)
    if row is None:
        provider = key.split(":", 1)[0] if ":" in key else ""
        hint = ""
        if provider and provider not in {k.split(":")[0] for k in table}:
            # another provider's region of a like name is another grid (aws:us-east-1, Virginia; gcp:us-east1,
            # South Carolina): not suggested
            raise ValueError(f"unknown cloud region {key!r}. Provider {provider!r} publishes no per-region figure; "
                              "pass the region's country instead (country='DE' for Frankfurt, say); the table has "
                              f"regions of {', '.join(sorted({k.split(':')[0] for k in table}))} only ({len(table)}, "
                              "`green-callbacks intensity --list`).")
        elif not provider:
            hint = " Write it as provider:region, for example 'gcp:europe-west1'."
        raise _unknown("cloud region", key, sorted(table), hint)
    return CarbonIntensity(float(row["g_co2e_per_kwh"]), f"{key} ({row['location']})",
                           f"Google Cloud region carbon data ({row['source_url']})",
                           "year unstated in the shipped table; the source page has it")


def world_intensity() -> CarbonIntensity:
    return CarbonIntensity(WORLD_G_PER_KWH, "world average",
                           f"generation-weighted mean of the {OWID} country table", "2022-2023")


def resolve_intensity(
    g_per_kwh: float | None = None, country: str | None = None, region: str | None = None
) -> CarbonIntensity:
    """The carbon intensity from exactly one of: an explicit value, a country, a cloud region.

    With none given, the world average. Giving more than one is an error: which would win is
    a guess we do not make for the user.
    """
    given = {k: v for k, v in (("carbon_intensity_g_per_kwh", g_per_kwh), ("country", country),
                               ("cloud_region", region)) if v is not None}
    if len(given) > 1:
        settings = ", ".join(f"{k}={brief(v)}" for k, v in given.items())
        raise ValueError(f"carbon intensity is set more than once ({settings}); "
                         "choose one of carbon_intensity_g_per_kwh, country, cloud_region")
    if g_per_kwh is not None:
        if not is_finite_number(g_per_kwh) or g_per_kwh < 0:  # (a str, a bool, 10**400: no float or not finite)
            raise ValueError(f"carbon_intensity_g_per_kwh={brief(g_per_kwh)} must be a finite number >= 0")
        return CarbonIntensity(float(g_per_kwh), "explicit", "set by the user", "n/a")
    if country is not None:
        return country_intensity(country)
    if region is not None:
        return region_intensity(region)
    return world_intensity()


MAX_G_PER_KWH = 5000.0  # the most carbon_intensity_g_per_kwh (and a series' value) may be


class IntensitySeries:
    """Carbon intensity over time from a CSV of ``timestamp,g_per_kwh`` rows.

    Each value holds from its timestamp until the next (a step function); a window's intensity
    is the time-weighted mean over it. Timestamps are ISO 8601 (naive ones are UTC) or Unix
    seconds. Before the first row the first value holds, after the last the last.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        rows: list[tuple[float, float, int]] = []
        if "\x00" in str(self.path):  # read_bytes() would say only "embedded null byte"
            raise ValueError(f"carbon_intensity_csv={brief(str(self.path))} holds a NUL character ('\\x00'), which "
                             "no file path can hold; give the path of a CSV file of 'timestamp,g_per_kwh' rows")
        try:
            text = self.path.read_bytes().decode("utf-8-sig")  # (Excel's "CSV UTF-8" starts with a BOM)
        except OSError as exc:
            raise ValueError(f"carbon_intensity_csv={str(self.path)!r} cannot be read ({exc.strerror or exc}); give "
                             "the path of a CSV file of 'timestamp,g_per_kwh' rows") from exc
        except UnicodeDecodeError as exc:
            raise ValueError(f"carbon_intensity_csv={str(self.path)!r}: not a UTF-8 text file (byte {exc.start}); "
                             "save it as UTF-8 CSV of 'timestamp,g_per_kwh' rows") from exc
        for n, row in enumerate(csv.reader(text.splitlines()), start=1):
            if not row or row[0].strip().lower() in ("timestamp", "time", "datetime"):
                continue
            try:
                t, value = self._parse_time(row[0]), float(row[1])
            except (ValueError, IndexError, OverflowError) as exc:
                raise ValueError(f"{self.path}:{n}: expected 'timestamp,g_per_kwh', got {row!r} ({exc})") from exc
            if not (math.isfinite(t) and math.isfinite(value) and 0 <= value <= MAX_G_PER_KWH):
                raise ValueError(f"{self.path}:{n}: {row!r}: the timestamp must be finite and the carbon intensity a "
                                 f"finite number of g/kWh in [0, {MAX_G_PER_KWH:g}], as carbon_intensity_g_per_kwh")
            rows.append((t, value, n))
        if not rows:
            raise ValueError(f"{self.path}: no 'timestamp,g_per_kwh' rows")
        rows.sort()
        for (t0, _, n0), (t1, _, n1) in itertools.pairwise(rows):
            if t0 == t1:
                raise ValueError(f"{self.path}: lines {min(n0, n1)} and {max(n0, n1)} give the same timestamp; "
                                 "give each time one value")
        self.times = [t for t, _, _ in rows]
        self.values = [v for _, v, _ in rows]

    @staticmethod
    def _parse_time(text: str) -> float:
        text = text.strip()
        try:
            return float(text)
        except ValueError:
            stamp = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
            if stamp.tzinfo is None:
                stamp = stamp.replace(tzinfo=dt.timezone.utc)
            return stamp.timestamp()

    def mean_between(self, start_unix: float, end_unix: float) -> float:
        """Time-weighted mean intensity over ``[start_unix, end_unix]`` (g/kWh)."""
        if end_unix <= start_unix:
            i = max(0, bisect.bisect_right(self.times, start_unix) - 1)
            return self.values[i]
        total, t = 0.0, start_unix
        i = max(0, bisect.bisect_right(self.times, start_unix) - 1)
        while t < end_unix:
            nxt = self.times[i + 1] if i + 1 < len(self.times) else math.inf
            seg_end = min(nxt, end_unix)
            if seg_end > t:
                total += self.values[i] * (seg_end - t)
                t = seg_end
            i += 1
        return total / (end_unix - start_unix)


@dataclass(frozen=True)
class Footprint:
    """What some joules mean: kWh at the device, kWh at the meter (x PUE), gCO2e, cost."""

    joules: float
    kwh: float
    facility_kwh: float
    g_co2e: float
    cost: float | None


STALE_SERIES_S = 86400.0  # a window this long after the series' last row is past what the series says
_warned_stale: set[str] = set()  # series already warned about, by path (the Accountant is frozen)


def _iso(unix: float) -> str:
    return dt.datetime.fromtimestamp(unix, dt.timezone.utc).isoformat(timespec="minutes")


@dataclass(frozen=True)
class Accountant:
    """Turns joules spent over a time span into a :class:`Footprint`.

    Args:
        intensity: the carbon intensity (see :func:`resolve_intensity`).
        pue: power usage effectiveness of the facility, >= 1.0 (1.0 means "not counted"; about
            1.1 for hyperscalers, 1.58 as an industry average).
        price_per_kwh: electricity price per facility kWh, for a cost figure.
        currency: the price's currency code, for labels.
        series: a time series of intensity that overrides ``intensity``; outside its span its first or
            last value holds (see :class:`IntensitySeries`), with one warning when a window lies more
            than a day past its last row (a stale file: the country's figure is not what is used).
    """

    intensity: CarbonIntensity
    pue: float = 1.0
    price_per_kwh: float | None = None
    currency: str = "EUR"
    series: IntensitySeries | None = None

    def __post_init__(self) -> None:
        # a bool is no number (pue=True was taken as 1.0); a str ("0.3") was a bare TypeError, 10**400 an OverflowError
        if not (is_finite_number(self.pue) and self.pue >= 1.0):
            raise ValueError(f"pue={brief(self.pue)} must be a number >= 1.0 (1.0 = no facility overhead; "
                             "about 1.1 hyperscale, 1.58 industry average)")
        if self.price_per_kwh is not None and not (is_finite_number(self.price_per_kwh) and self.price_per_kwh >= 0):
            raise ValueError(f"price_per_kwh={brief(self.price_per_kwh)} must be a finite number >= 0 (money per "
                             "kWh) or None")

    def g_per_kwh(self, start_unix: float, end_unix: float) -> float:
        if self.series is not None:
            last = self.series.times[-1]
            if end_unix > last + STALE_SERIES_S and str(self.series.path) not in _warned_stale:
                _warned_stale.add(str(self.series.path))
                log.warning("green-callbacks: carbon_intensity_csv %s ends at %s; its last value, %g g/kWh, is used "
                            "for a window %.0f days later (not %s's %g g/kWh). Give a series that covers the run.",
                            self.series.path, _iso(last), self.series.values[-1], (end_unix - last) / 86400,
                            self.intensity.label, self.intensity.g_per_kwh)
            return self.series.mean_between(start_unix, end_unix)
        return self.intensity.g_per_kwh

    def footprint(self, joules: float, start_unix: float, end_unix: float) -> Footprint:
        kwh = joules / J_PER_KWH
        facility = kwh * self.pue
        g = facility * self.g_per_kwh(start_unix, end_unix)
        cost = facility * self.price_per_kwh if self.price_per_kwh is not None else None
        return Footprint(joules, kwh, facility, g, cost)

    def as_params(self) -> dict[str, str]:
        params = {**self.intensity.as_params(), "pue": f"{self.pue:g}"}
        if self.price_per_kwh is not None:
            params["price_per_kwh"] = f"{self.price_per_kwh:g} {self.currency}"
        if self.series is not None:  # the series decides every window: no single figure stands for it
            times, values = self.series.times, self.series.values
            params.update(
                carbon_intensity_g_per_kwh="time series",
                carbon_intensity_label=(f"time series {self.series.path.name}: {min(values):g}-{max(values):g} g/kWh "
                                        f"from {_iso(times[0])} to {_iso(times[-1])} ({len(values)} rows)"),
                carbon_intensity_source=f"carbon_intensity_csv={str(self.series.path.resolve())!r}",
                carbon_intensity_year=f"{_iso(times[0])[:4]}" if _iso(times[0])[:4] == _iso(times[-1])[:4]
                else f"{_iso(times[0])[:4]}-{_iso(times[-1])[:4]}",
                carbon_intensity_series=str(self.series.path.resolve()))
        return params
