"""Carbon intensity lookups, PUE, cost, time series, and the errors for bad input."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys

import pytest

from green_callbacks.accounting import (
    J_PER_KWH,
    Accountant,
    IntensitySeries,
    resolve_intensity,
)


@pytest.mark.parametrize("name", ["FR", "fra", "France", " france "])
def test_country_by_alpha2_alpha3_or_name(name):
    ci = resolve_intensity(country=name)
    assert ci.label == "France (FRA)"
    assert 0 < ci.g_per_kwh < 120  # nuclear-heavy grid
    assert ci.year in ("2022", "2023") and "Our World in Data" in ci.source


@pytest.mark.parametrize("name,label", [("UK", "United Kingdom (GBR)"), ("uk", "United Kingdom (GBR)"),
                                        ("EL", "Greece (GRC)")])
def test_country_codes_people_write_outside_iso(name, label):
    # ISO 3166 reserves UK (for GB) and EL (the EU's code for GR): both are what people write
    assert resolve_intensity(country=name).label == label


def test_cloud_region_and_world_default():
    region = resolve_intensity(region="gcp:europe-west1")
    assert region.label.startswith("gcp:europe-west1") and "cloud.google.com" in region.source
    assert resolve_intensity().g_per_kwh == 481.0
    assert resolve_intensity(g_per_kwh=12.5).label == "explicit"
    # every region the table ships is found by its name (the source table had gcp me-central1 misspelt)
    assert resolve_intensity(region="gcp:me-central1").g_per_kwh == 575.0


def test_unknown_country_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown country 'Germny'.*Did you mean: Germany"):
        resolve_intensity(country="Germny")


@pytest.mark.parametrize(("name", "iso3"), [("Czech Republic", "CZE"), ("Russian Federation", "RUS"),
                                           ("Korea", "KOR"), ("United States of America", "USA"),
                                           ("Türkiye", "TUR"), ("Viet Nam", "VNM"), ("Réunion", "REU"),
                                           ("São Tomé and Príncipe", "STP"), ("Côte d\u2019Ivoire", "CIV"),
                                           ("VIET  NAM", "VNM")])
def test_a_countrys_official_or_common_long_name_is_known(name, iso3):
    """ISO 3166's and the UN's names where the table has the short one: "Czech Republic" was an unknown country;
    a name written with its accents ("Réunion") or a typographic apostrophe was unknown too."""
    assert f"({iso3})" in resolve_intensity(country=name).label


def test_unknown_region_suggests_and_explains_providers():
    with pytest.raises(ValueError, match=r"Did you mean: gcp:europe-west1"):
        resolve_intensity(region="gcp:europe-wst1")
    with pytest.raises(ValueError, match=r"Provider 'aws' publishes no per-region figure; pass the region's country"):
        resolve_intensity(region="aws:eu-central-1")
    with pytest.raises(ValueError) as refused:  # Virginia's grid: not gcp:us-east1's (South Carolina), 560 g
        resolve_intensity(region="aws:us-east-1")
    assert "gcp:us-east1" not in str(refused.value) and "regions of gcp only (40" in str(refused.value)
    with pytest.raises(ValueError, match="provider:region"):
        resolve_intensity(region="europe-west1")


def test_contradictory_or_negative_intensity_is_rejected():
    with pytest.raises(ValueError, match=r"set more than once \(carbon_intensity_g_per_kwh=100, country='FR'\)"):
        resolve_intensity(g_per_kwh=100, country="FR")
    with pytest.raises(ValueError, match=r"carbon_intensity_g_per_kwh=-1 must be"):
        resolve_intensity(g_per_kwh=-1)


def test_pue_and_price_scale_the_facility_energy():
    acc = Accountant(resolve_intensity(g_per_kwh=400.0), pue=1.5, price_per_kwh=0.2)
    fp = acc.footprint(J_PER_KWH * 2, 0.0, 10.0)  # 2 kWh at the devices
    assert fp.kwh == pytest.approx(2.0)
    assert fp.facility_kwh == pytest.approx(3.0)
    assert fp.g_co2e == pytest.approx(1200.0)
    assert fp.cost == pytest.approx(0.6)
    assert acc.as_params()["pue"] == "1.5"
    assert Accountant(resolve_intensity()).footprint(1.0, 0, 1).cost is None


@pytest.mark.parametrize("pue", [0.9, -1, float("nan")])
def test_bad_pue_is_rejected(pue):
    with pytest.raises(ValueError, match=r"pue=.* must be a number >= 1.0"):
        Accountant(resolve_intensity(), pue=pue)


def test_time_series_is_integrated_over_the_window(tmp_path):
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    path = tmp_path / "ci.csv"
    path.write_text("timestamp,g_per_kwh\n"
                    f"{t0.isoformat()},100\n"
                    f"{(t0 + dt.timedelta(hours=1)).isoformat()},300\n"
                    f"{(t0 + dt.timedelta(hours=2)).strftime('%Y-%m-%dT%H:%M:%S')},50\n")
    series = IntensitySeries(path)
    s = t0.timestamp()
    assert series.mean_between(s, s + 3600) == pytest.approx(100)
    assert series.mean_between(s + 1800, s + 5400) == pytest.approx(200)  # half 100, half 300
    assert series.mean_between(s + 3600, s + 3 * 3600) == pytest.approx(175)  # past the end: last value holds
    assert series.mean_between(s - 3600, s) == pytest.approx(100)  # before the start: first value holds
    acc = Accountant(resolve_intensity(), series=series)
    assert acc.footprint(J_PER_KWH, s + 1800, s + 5400).g_co2e == pytest.approx(200)


def test_bad_time_series_rows_name_the_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("timestamp,g_per_kwh\n2026-01-01T00:00:00,100\nyesterday,abc\n")
    with pytest.raises(ValueError, match=r"bad.csv:3: expected 'timestamp,g_per_kwh'"):
        IntensitySeries(path)


def test_import_is_light_and_fast():
    code = ("import sys, time; t = time.perf_counter(); import green_callbacks; "
            "dt = time.perf_counter() - t; heavy = [m for m in ('torch', 'lightning', 'transformers', 'mlflow', "
            "'pandas') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_series_that_ended_long_before_the_run_is_used_with_one_warning(tmp_path, caplog):
    """A series whose last row is years before the run: its last value holds (as documented), and one warning says
    so with the figure the country would have given, instead of a silent override."""
    import logging
    import time

    path = tmp_path / "old.csv"
    path.write_text("2020-01-01T00:00Z,1000\n2020-01-01T01:00Z,900\n")
    acc = Accountant(resolve_intensity(country="FR"), series=IntensitySeries(path))
    caplog.set_level(logging.WARNING, logger="green_callbacks")
    now = time.time()
    assert acc.g_per_kwh(now, now + 60) == pytest.approx(900)
    acc.g_per_kwh(now + 60, now + 120)
    assert caplog.text.count("ends at 2020-01-01T01:00+00:00; its last value, 900 g/kWh") == 1
    assert "France" in caplog.text or "FRA" in caplog.text


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"price_per_kwh": "0.3"}, r"^price_per_kwh='0.3' must be a finite number >= 0"),  # a bare TypeError
    ({"price_per_kwh": 10**400}, r"^price_per_kwh=<an integer of 401 digits> must be a finite number"),
    ({"pue": True}, r"^pue=True must be a number >= 1.0"),  # was taken as 1.0
    ({"pue": 10**400}, r"^pue=<an integer of 401 digits> must be a number >= 1.0"),  # an OverflowError
])
def test_an_accountants_bad_price_or_pue_is_a_value_error_naming_it(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Accountant(resolve_intensity(), **kwargs)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"country": 3}, r"^country=3 must be a string: an ISO 3166 alpha-2 or alpha-3 code"),  # an AttributeError
    ({"region": ["gcp:europe-west1"]}, r"^cloud_region=\['gcp:europe-west1'\] must be a string"),
    ({"g_per_kwh": "300"}, r"^carbon_intensity_g_per_kwh='300' must be a finite number >= 0"),
    ({"g_per_kwh": True}, r"^carbon_intensity_g_per_kwh=True must be a finite number >= 0"),
    ({"g_per_kwh": 10**400}, r"^carbon_intensity_g_per_kwh=<an integer of 401 digits> must be a finite number"),
])
def test_an_intensity_setting_of_the_wrong_type_is_a_value_error_naming_it(kwargs, message):
    with pytest.raises(ValueError, match=message):
        resolve_intensity(**kwargs)


@pytest.mark.parametrize(("name", "iso3"), [
    ("Republic of the Congo", "COG"), ("Congo", "COG"), ("Congo-Brazzaville", "COG"),
    ("Democratic Republic of the Congo", "COD"), ("Congo, The Democratic Republic of the", "COD"),
    ("Congo (the Democratic Republic of the)", "COD"), ("DR Congo", "COD"),
    ("Tanzania, United Republic of", "TZA"), ("Bolivia, Plurinational State of", "BOL"),
    ("Moldova, Republic of", "MDA"), ("Moldova (the Republic of)", "MDA"), ("Venezuela, Bolivarian Republic of", "VEN"),
    ("Palestine, State of", "PSE"), ("Korea, Democratic People's Republic of", "PRK"), ("Korea, Republic of", "KOR"),
    ("Timor-Leste", "TLS"), ("Swaziland", "SWZ"), ("Cabo Verde", "CPV"), ("Burma", "MMR"), ("Gambia (the)", "GMB"),
])
def test_official_iso_and_former_country_names_are_known(name, iso3):
    """"Republic of the Congo" suggested only "Democratic Republic of Congo", another country; ISO 3166's
    "<name>, <qualifier> of" forms, "Timor-Leste" and "Swaziland" were unknown."""
    assert resolve_intensity(country=name).label.endswith(f"({iso3})")


def test_every_alternative_country_name_is_a_row_of_the_shipped_table():
    from green_callbacks.accounting import _COUNTRY_NAMES, country_table

    assert {code for code in _COUNTRY_NAMES.values() if code not in country_table()} == set()
    # a qualifier that names a place is no ISO qualifier: Georgia the country is not Georgia, USA
    with pytest.raises(ValueError, match=r"unknown country 'Georgia, USA'"):
        resolve_intensity(country="Georgia, USA")
