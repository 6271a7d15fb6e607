"""`borderflow report` on the real ClickHouse, rendered by headless Chromium: the charts are drawn.

Known rows go straight into an isolated database (no worker). The report is rendered twice by
Debian's ``chromium``: once with ``--dump-dom`` on a copy that carries a tiny script recording
where each ``svg.chart`` landed on the page, once with ``--screenshot`` (same window, same
layout). The PNG is decoded here (zlib + numpy) and each chart's rectangle is checked for the
colours the chart says it drew (``data-colours``); the chart left without data must show the
grey "no data yet" placeholder and none of the chart colours.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import time
import uuid
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from infra.cli import cli
from infra.migrate import clickhouse_client, migrate
from infra.processes import isolated
from infra.report import EMPTY_FILL, PALETTE
from schemas.config import Settings
from sinks.clickhouse import TABLE_COLUMNS

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 1, tzinfo=UTC)
WINDOW = (1400, 3400)
LEGEND_BOTTOM = 48  # pixels from a chart's top edge: title and legend are above
CHARTS = 12


@pytest.fixture
def report_db(stack: Settings) -> Iterator[Settings]:
    settings = isolated(stack, "report", clickhouse_database=f"bf_report_{uuid.uuid4().hex[:8]}")
    migrate(settings)
    try:
        yield settings
    finally:
        client = clickhouse_client(settings)
        client.execute(f"DROP DATABASE IF EXISTS {settings.clickhouse_database}")
        client.disconnect()


def insert(settings: Settings, table: str, rows: list[dict[str, Any]]) -> None:
    """Rows as dicts, in the writer's column order; columns left out get their defaults
    (e.g. the exactly-once source positions)."""
    assert set(rows[0]) <= set(TABLE_COLUMNS[table]), set(rows[0]) - set(TABLE_COLUMNS[table])
    columns = [column for column in TABLE_COLUMNS[table] if column in rows[0]]
    client = clickhouse_client(settings, settings.clickhouse_database)
    try:
        client.execute(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES",
            [tuple(row[c] for c in columns) for row in rows],
        )
    finally:
        client.disconnect()


def ms(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)


def seed(settings: Settings) -> None:
    """Two days of known facts: every chart but model_metrics gets data."""
    now = T0 + timedelta(days=3)
    insert(
        settings,
        "events_per_minute",
        [
            {"minute": T0 + timedelta(minutes=m), "topic": topic, "event_type": kind,
             "country": "DE", "events": events + m % 7, "amount_usd": 0.0}
            for m in range(0, 36 * 60, 5)
            for topic, kind, events in (("clicks", "view", 40), ("payments", "payment", 8))
        ],
    )  # fmt: skip
    payments = []
    for day in range(2):
        for i in range(20):
            ts = T0 + timedelta(days=day, hours=i)
            payments.append(
                {"txn_id": f"t{day}-{i}", "user_id": f"u{i}", "card_id": "c", "merchant_id": "m",
                 "ts": ts, "ts_ms": ms(ts), "amount": 10.0, "currency": "EUR",
                 "amount_usd": 11.0, "score": 0.9 if i < 4 else 0.1, "is_alert": int(i < 4),
                 "threshold": 0.5, "reasons": ["velocity"], "model_version": "lr@1",
                 "billing_country": "DE", "shipping_country": "DE", "ip_country": "DE",
                 "scored_at": now}
            )  # fmt: skip
    insert(settings, "fraud_scores", payments)
    insert(
        settings,
        "fraud_label_events",
        [
            {"event_id": f"l-{p['txn_id']}", "txn_id": p["txn_id"], "user_id": p["user_id"],
             "label": "fraud" if p["txn_id"].endswith(("-0", "-1", "-2")) else "legit",
             "ts": p["ts"], "ts_ms": p["ts_ms"], "source": "chargeback", "ingested_at": now}
            for p in payments[:8] + payments[20:28]
        ],
    )  # fmt: skip
    shipments = []
    for i in range(12):
        carrier = "dhl" if i % 2 else "ups"
        created = T0 + timedelta(hours=i)
        completed = created + timedelta(days=2 + i % 3)
        shipments.append(
            {"order_id": f"o{i}", "user_id": f"u{i}", "carrier": carrier,
             "origin_country": "CN", "dest_country": "DE" if i < 8 else "US",
             "created_ts": created, "completed_ts": completed,
             "outcome": "delivered" if i != 11 else "returned",
             "transit_days": float(2 + i % 3), "has_promise": 1, "on_time": int(i % 4 != 0),
             "customs_hours": 12.0 if i % 3 == 0 else 0.0, "failed_attempts": 0,
             "returned": int(i == 11), "invalid_transitions": 0, "version": ms(completed),
             "ingested_at": now}
        )  # fmt: skip
    insert(settings, "shipments", shipments)
    insert(
        settings,
        "shipment_predictions",
        [
            {"event_id": f"e{i}-{status}", "order_id": s["order_id"], "ts": s["created_ts"],
             "ts_ms": ms(s["created_ts"]), "status": status, "carrier": s["carrier"],
             "origin_country": "CN", "dest_country": s["dest_country"],
             "predicted_delivery_ts_ms": ms(s["completed_ts"]) + offset * 3_600_000,
             "promised_ts_ms": ms(s["completed_ts"]), "delay_risk": 0.2, "ingested_at": now}
            for i, s in enumerate(shipments[:10])
            for status, offset in (("created", 10), ("arrived_hub", 3))
        ],
    )  # fmt: skip
    insert(
        settings,
        "rec_predictions",
        [
            {"event_id": f"c{i}", "ts": T0 + timedelta(minutes=7 * i), "ts_ms": 0,
             "user_id": f"u{i % 9}", "country": "DE", "click_type": "view",
             "hit_rank": (0, 1, 3, 7, 12)[i % 5], "recs_size": 20, "personalised": 1,
             "recs_age_ms": 1000, "ingested_at": now}
            for i in range(300)
        ],
    )  # fmt: skip
    insert(
        settings,
        "segment_mix_per_hour",
        [
            {"hour": T0 + timedelta(hours=h), "country": "DE", "segment": segment,
             "purchases": 2, "revenue_usd": revenue}
            for h in range(24)
            for segment, revenue in (("high-value", 90.0), ("growth", 40.0), ("new", 15.0))
        ],
    )  # fmt: skip


def run_report(settings: Settings, out: Path, *args: str) -> str:
    result = CliRunner().invoke(cli, ["report", "--out", str(out), *args], obj=settings)
    assert result.exit_code == 0, result.output
    return out.read_text(encoding="utf-8")


def chart_points(page: str) -> dict[str, int]:
    found = re.findall(r'data-chart="([^"]+)" data-points="(\d+)"', page)
    return {chart: int(points) for chart, points in found}


# -- Chromium and PNG ----------------------------------------------------------------------------


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(
        "headless Chromium not found: install Debian's chromium package (`make setup` as root "
        "does, or `sudo apt-get install -y chromium`)"
    )


def chromium(args: list[str], profile: Path) -> str:
    command = [
        chromium_binary(), "--headless=new", "--no-sandbox", "--disable-gpu",
        "--hide-scrollbars", "--force-device-scale-factor=1", "--no-first-run",
        "--disable-extensions", "--disable-background-networking", "--mute-audio",
        f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}", *args,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, f"chromium failed ({done.returncode}): {done.stderr[-2000:]}"
    return done.stdout


def decode_png(data: bytes) -> np.ndarray:
    """8-bit RGB/RGBA, non-interlaced PNG (what Chromium writes) -> (height, width, 3) uint8."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, [], b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat.append(body)
    width, height, depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour_type in (2, 6) and interlace == 0, header
    bpp = 3 if colour_type == 2 else 4
    stride = width * bpp
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(height, stride + 1)
    image = np.zeros((height, stride), np.uint8)
    prior = np.zeros(stride, np.int64)
    for y in range(height):
        kind, line = int(raw[y, 0]), raw[y, 1:].astype(np.int64)
        if kind == 0:
            row = line
        elif kind == 1:  # Sub: a running sum per channel
            row = line.reshape(width, bpp).cumsum(axis=0).reshape(-1) % 256
        elif kind == 2:  # Up
            row = (line + prior) % 256
        else:  # Average (3) and Paeth (4) depend on the decoded left byte: one at a time
            row = np.array(_sequential(line.tolist(), prior.tolist(), bpp, kind), np.int64)
        image[y] = row
        prior = row
    return image.reshape(height, width, bpp)[:, :, :3]


def _sequential(line: list[int], prior: list[int], bpp: int, kind: int) -> list[int]:
    out = [0] * len(line)
    for i, value in enumerate(line):
        a = out[i - bpp] if i >= bpp else 0
        b = prior[i]
        if kind == 3:
            predictor = (a + b) >> 1
        else:
            c = prior[i - bpp] if i >= bpp else 0
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            predictor = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
        out[i] = (value + predictor) & 255
    return out


def rgb(colour: str) -> np.ndarray:
    return np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)], np.int64)


def count_colour(area: np.ndarray, colour: str, tolerance: int = 24) -> int:
    """Pixels within ``tolerance`` (sum of channel differences) of ``colour``."""
    return int((np.abs(area.astype(np.int64) - rgb(colour)).sum(axis=2) <= tolerance).sum())


LOCATE = """<script>
for (const svg of document.querySelectorAll('svg.chart')) {
  const r = svg.getBoundingClientRect();
  svg.setAttribute('data-rect',
    [r.left + scrollX, r.top + scrollY, r.width, r.height].map(Math.round).join(','));
}
</script></body>"""


def render(page: Path, workdir: Path) -> tuple[np.ndarray, dict[str, tuple[int, ...]], str]:
    """The screenshot, each chart's (x, y, w, h) on it, and the DOM Chromium built."""
    located = workdir / f"{page.stem}-located.html"
    located.write_text(page.read_text(encoding="utf-8").replace("</body>", LOCATE, 1), "utf-8")
    dom = chromium(["--dump-dom", located.as_uri()], workdir / "profile-dom")
    rects = {
        chart: tuple(int(v) for v in rect.split(","))
        for chart, rect in re.findall(r'data-chart="([^"]+)"[^>]*?data-rect="([^"]+)"', dom)
    }
    shot = workdir / f"{page.stem}.png"
    chromium([f"--screenshot={shot}", located.as_uri()], workdir / "profile-shot")
    return decode_png(shot.read_bytes()), rects, dom


# -- the test ------------------------------------------------------------------------------------


def test_report_is_self_contained_and_chromium_draws_its_charts(
    report_db: Settings, tmp_path: Path
) -> None:
    started = time.monotonic()
    chromium_binary()  # fail early with the install hint

    empty_page = run_report(report_db, tmp_path / "empty.html")
    assert set(chart_points(empty_page).values()) == {0}
    assert len(chart_points(empty_page)) == CHARTS

    seed(report_db)
    out = tmp_path / "tmp" / "report.html"
    page = run_report(report_db, out)
    points = chart_points(page)
    assert len(points) == CHARTS
    assert points.pop("model_metrics") == 0  # no eval run: the placeholder
    assert all(n > 0 for n in points.values()), points
    # known answers reach the charts
    assert points["segments_revenue"] == 3 and points["logistics_prediction_error"] == 2
    assert points["logistics_on_time"] == 4  # CN->DE and CN->US, each with dhl and ups
    assert ">high-value (48)<" in page and ">2,160<" in page  # 24 h x 90 USD
    assert ">created (10)<" in page and ">10<" in page  # predictions 10 h late
    assert "no eval run yet" in page
    assert not re.search(r"<script|<link|<img|(src|href)=\"?https?:", page)

    image, rects, dom = render(out, tmp_path)
    assert len(re.findall(r'<svg class="chart', dom)) == CHARTS
    assert set(rects) == set(points) | {"model_metrics"}, rects
    height, width = image.shape[:2]
    assert (width, height) == WINDOW
    colours = dict(
        re.findall(r'data-chart="([^"]+)" data-points="\d+" data-colours="([^"]*)"', page)
    )
    for chart, (x, y, w, h) in rects.items():
        assert x + w <= width and y + h <= height, f"{chart} is outside the screenshot"
        area = image[y : y + h, x : x + w]
        # below the title and the legend (whose swatches have the series colours too)
        plot = area[LEGEND_BOTTOM:]
        drawn = {colour: count_colour(plot, colour) for colour in PALETTE}
        if chart == "model_metrics":
            assert count_colour(area, EMPTY_FILL, 0) > 0.4 * w * h, "placeholder not drawn"
            assert not any(drawn.values()), drawn
            continue
        # every series / bar colour the chart claims is visible inside its rectangle
        for colour in colours[chart].split():
            assert drawn[colour] >= 100, (chart, colour, drawn)
        assert count_colour(area, EMPTY_FILL, 0) < 0.05 * w * h, chart

    # the charts are not blank: a chart with data differs from the placeholder, pixel by pixel
    x, y, w, h = rects["throughput"]
    ex, ey, ew, eh = rects["model_metrics"]
    assert w == ew
    assert not np.array_equal(image[y : y + eh, x : x + w], image[ey : ey + eh, ex : ex + ew])
    assert time.monotonic() - started < 60
