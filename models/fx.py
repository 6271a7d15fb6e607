"""Currency conversion to USD from a versioned rates file.

Amounts are compared across markets (fraud velocity, RFM monetary value), so every amount is
also expressed in USD. Rates come from ``models/fx_rates/<version>.json`` (not fetched at run
time), which keeps replays reproducible; a new version is a new file, selected by
``FX_RATES_VERSION``. The generator converts with the same table, so round trips are exact.

>>> to_usd(100.0, "EUR")
108.0
>>> to_usd(5.0, "XXX") is None
True
"""

from __future__ import annotations

import json
from pathlib import Path

FX_RATES_VERSION = "2026-01-01"
RATES_DIR = Path(__file__).resolve().parent / "fx_rates"


def load_rates(version: str = FX_RATES_VERSION) -> dict[str, float]:
    """USD per one unit of each currency (ISO 4217) in rates file ``version``."""
    document = json.loads((RATES_DIR / f"{version}.json").read_text())
    if document.get("version") != version or document.get("base") != "USD":
        raise ValueError(f"rates file {version}.json does not describe version {version} in USD")
    return {currency: float(rate) for currency, rate in document["usd_per_unit"].items()}


#: The rates in force.
USD_PER_UNIT: dict[str, float] = load_rates()


def to_usd(amount: float, currency: str) -> float | None:
    """``amount`` in USD, or None for a currency the table does not know."""
    rate = USD_PER_UNIT.get(currency)
    return None if rate is None else round(amount * rate, 6)
