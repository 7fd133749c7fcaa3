"""Strict parsing of quantities with units from config: "2.5 kWh", "300 g", "1.2 kg", "0.5 EUR"."""

from __future__ import annotations

import math
import numbers
import re
import reprlib
from collections.abc import Mapping, Sequence
from typing import Any

ENERGY_J = {"J": 1.0, "kJ": 1e3, "MJ": 1e6, "Wh": 3600.0, "kWh": 3.6e6, "MWh": 3.6e9}
# "mj" could be milli or mega: case only forgives where it cannot change the meaning
_ENERGY_ANY_CASE = {u.lower(): f for u, f in ENERGY_J.items() if u.lower() not in ("mj", "mwh")}
MASS_G = {"g": 1.0, "kg": 1e3, "t": 1e6}
# ISO 4217's active codes (2025 list: funds, metals and SDR included; XTS, testing, and XXX, no currency, left out),
# and four withdrawn since 2021 that older price tables still use (CUC, HRK, SLL, ZWL)
_ISO_4217_CODES = """
AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BOV BRL BSD BTN BWP BYN BZD CAD CDF
CHE CHF CHW CLF CLP CNY COP COU CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GNF
GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD
LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP
PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP
TRY TTD TWD TZS UAH UGX USD USN UYI UYU UYW UZS VED VES VND VUV WST XAF XAG XAU XBA XBB XBC XBD XCD XCG XDR XOF
XPD XPF XPT XSU XUA YER ZAR ZMW ZWG
CUC HRK SLL ZWL
"""
ISO_4217 = frozenset(_ISO_4217_CODES.split())


def currency_code(name: str, value: object, code: str) -> str:
    """``code`` in capitals where ISO 4217 has it; else an error naming the value, close codes and some choices."""
    upper = code.upper()
    if re.fullmatch(r"[A-Z]{2}[a-z]", code):  # 'GBp', 'ZAc', 'ILa': pence, cents, agorot (a 100x difference)
        raise ValueError(f"{name}={brief(value)}: {brief(code)} is how a currency's minor unit is written ('GBp': "
                         f"pence); give the amount in the currency's main unit with its ISO 4217 code"
                         f"{f', {upper}' if upper in ISO_4217 else ''} (EUR, USD, GBP, JPY...)")
    if upper not in ISO_4217:
        import difflib

        close = difflib.get_close_matches(upper, sorted(ISO_4217), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise ValueError(f"{name}={brief(value)}: {brief(code)} is not an ISO 4217 currency code; {hint}write one like "
                         "EUR, USD, GBP, JPY, CHF, CNY, INR, CAD or AUD")
    return upper


# "CO2-equivalent" as people write it after a mass: CO2, CO2e, CO2eq, CO2-eq, CO2 equivalent, CO₂e
_CO2 = r"(?:co2|co₂)(?:\s*[-_]?\s*(?:e|eq|equiv|equivalents?))?\.?"
_QUANTITY = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([A-Za-z]*)\s*(?:" + _CO2 + r")?\s*$", re.I)


def is_number(value: object) -> bool:
    """A real number, NumPy's included (``np.float32(1.2)`` from a config or an array), never a bool (NumPy's bool
    is no ``numbers.Real``)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value: object) -> bool:
    """An integer, NumPy's included (``np.int64``), never a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite_number(value: object) -> bool:
    """A real number (:func:`is_number`) that is a finite float: ``10**400`` is none (``math.isfinite`` raises
    OverflowError for it), nor is ``inf``."""
    if not is_number(value):
        return False
    try:
        return math.isfinite(value)  # type: ignore[arg-type]
    except (OverflowError, TypeError, ValueError):
        return False


_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxtuple, _BRIEF.maxdict = 3, 8, 8, 8
_BRIEF.maxset = _BRIEF.maxfrozenset = _BRIEF.maxdeque = _BRIEF.maxarray = 8
_BRIEF.maxstring = _BRIEF.maxother = 200


def brief(value: object, limit: int = 200) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for an error message: a YAML "billion laughs" value (lists
    of lists sharing their items, 25 million characters as a repr) or a 10**5000 is never written out whole, nor
    built whole first (``f"{value!r:.60}"`` builds it all)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and abs(int(value)) >= 10 ** 40:
        digits = len(str(abs(int(value)))) if int(value).bit_length() < 14_000 else int(
            int(value).bit_length() * math.log10(2)) + 1  # (str() of over 4300 digits raises ValueError)
        return f"{'-' if value < 0 else ''}<an integer of {digits} digits>"
    try:
        text = _BRIEF.repr(value)
    except Exception:  # a repr that fails: its type says enough
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:max(limit - 3, 1)] + "..."


def plain(value: Any) -> Any:
    """NumPy's numbers as Python's, and OmegaConf's ListConfig and DictConfig as lists and dicts, nested too:
    arguments kept as given (HF writes a callback's into ``trainer_state.json``, whose ``json.dumps`` refuses
    ``np.float32`` and ``ListConfig``) and accepted as numbers."""
    if isinstance(value, bool | str) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    if isinstance(value, Mapping):  # OmegaConf's DictConfig too (Hydra's instantiate passes them)
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):  # and its ListConfig
        return [plain(v) for v in value]
    return value


def _number(name: str, value: object, units: str, co2: bool = False) -> tuple[float, str]:
    """The number and the unit (one of ``units``, said in the error); ``co2``: a "CO2e" after the unit is allowed
    (emissions only)."""
    if isinstance(value, bool):
        raise ValueError(f"{name}={brief(value)} is not a quantity")
    if is_number(value):
        try:
            return float(value), ""  # type: ignore[arg-type]
        except OverflowError:
            raise ValueError(f"{name}={brief(value)} is too large to be an amount") from None
    if not isinstance(value, str):
        raise ValueError(f"{name}={brief(value)} must be a number or a string with a unit")
    match = _QUANTITY.match(value)
    if not match:
        hint = "; the decimal point is '.'" if re.search(r"\d,\d", value) else ""
        raise ValueError(f"{name}={brief(value)} is not '<number> <unit>'; the units: {units}{hint}")
    if not co2 and re.search(r"co[2₂]", value, re.I):
        raise ValueError(f"{name}={brief(value)}: CO2 is a mass of emissions; give it as the emissions budget "
                         "(like emissions='300 g')")
    return float(match.group(1)), match.group(2)


def _positive(name: str, value: float, original: object) -> float:
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={brief(original)} must be a positive, finite amount")
    return value


def _unit_written(name: str, value: object, unit: str, example: str, plain_unit: str, units: str) -> None:
    """A string names its unit: ``'2.5'`` (from an environment variable, a quoted YAML value) was read as 2.5 J, a
    budget the run's first check exceeds, where the person meant kWh; a number stays in the base unit."""
    if isinstance(value, str) and not unit:
        raise ValueError(f"{name}={brief(value)} is a string without a unit; write the unit, like {example} "
                         f"(the units: {units}), or give a number, which is in {plain_unit}")


def parse_energy_j(name: str, value: float | str) -> float:
    """Joules from a number (joules) or a string with J, kJ, MJ, Wh, kWh or MWh."""
    number, unit = _number(name, value, ", ".join(ENERGY_J))
    _unit_written(name, value, unit, f"'{number:g} kWh'", "joules", ", ".join(ENERGY_J))
    factor = ENERGY_J.get(unit, _ENERGY_ANY_CASE.get(unit.lower())) if unit else 1.0
    if factor is None:
        raise ValueError(f"{name}={brief(value)}: unknown energy unit {unit!r}; choose one of {', '.join(ENERGY_J)}")
    return _positive(name, number * factor, value)


def parse_mass_g(name: str, value: float | str) -> float:
    """Grams CO2e from a number (grams) or a string with g, kg or t (optionally followed by CO2e)."""
    number, unit = _number(name, value, "g, kg, t (of CO2e), like '300 g' or '1.5 kg'", co2=True)
    _unit_written(name, value, unit, f"'{number:g} kg'", "grams", "g, kg, t")
    factor = MASS_G.get(unit.lower()) if unit else 1.0
    if factor is None:
        raise ValueError(f"{name}={brief(value)}: unknown mass unit {unit!r}; choose one of g, kg, t (of CO2e)")
    return _positive(name, number * factor, value)


def parse_money(name: str, value: float | str, currency: str | None = None) -> tuple[float, str | None]:
    """An amount and its currency code from a number or a string like "0.5 EUR".

    When ``currency`` is given (the monitor's price currency) a different code is an error.
    """
    number, unit = _number(name, value,
                           "an ISO 4217 currency code after the amount, like '0.5 EUR' or '3 USD' (no symbols)")
    code = unit.upper() or None
    if code is not None and unit.lower() in {u.lower() for u in (*ENERGY_J, *MASS_G)}:
        raise ValueError(f"{name}={brief(value)}: {unit!r} is a unit of energy or mass, not a currency; write the "
                         "amount of money like '0.5 EUR' (energy and emissions budgets have their own arguments)")
    if code is not None and not re.fullmatch(r"[A-Z]{3}", code):
        raise ValueError(f"{name}={brief(value)}: {unit!r} is not a currency code; write it like '0.5 EUR' or '2 USD'")
    if code is not None:
        code = currency_code(name, value, unit)
    if code and currency and code != currency.upper():
        raise ValueError(f"{name}={brief(value)} is in {code} but the electricity price is in {currency.upper()}; "
                         "use the same currency")
    return _positive(name, number, value), code
