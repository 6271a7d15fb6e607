"""Currency conversion to USD from a versioned, static rate table.

Amounts are compared across markets (fraud velocity, RFM monetary value), so every amount is
also expressed in USD. Rates are fixed per version (not fetched at run time), which keeps
replays reproducible; a new version is a new table, named in ``FX_RATES_VERSION``.

>>> to_usd(100.0, "EUR")
108.0
>>> to_usd(5.0, "XXX") is None
True
"""

from __future__ import annotations

FX_RATES_VERSION = "2026-01-01"

#: USD per one unit of each currency (ISO 4217), as of FX_RATES_VERSION.
USD_PER_UNIT: dict[str, float] = {
    "USD": 1.0,
    "EUR": 1.08,
    "GBP": 1.27,
    "CNY": 0.14,
    "JPY": 0.0068,
    "KRW": 0.00075,
    "INR": 0.012,
    "BRL": 0.20,
    "MXN": 0.058,
    "RUB": 0.011,
    "SAR": 0.2667,
    "AED": 0.2723,
    "AUD": 0.66,
    "CAD": 0.74,
    "CHF": 1.13,
    "SEK": 0.095,
    "PLN": 0.25,
    "TRY": 0.031,
    "IDR": 0.000064,
    "SGD": 0.74,
    "HKD": 0.128,
    "ZAR": 0.054,
}


def to_usd(amount: float, currency: str) -> float | None:
    """``amount`` in USD, or None for a currency the table does not know."""
    rate = USD_PER_UNIT.get(currency)
    return None if rate is None else round(amount * rate, 6)
