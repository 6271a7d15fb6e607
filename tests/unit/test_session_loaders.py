"""Click-file loaders (RetailRocket, YOOCHOOSE, generic delimited, gzip), preprocessing and
the split protocol of ``borderflow eval recs``."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import pytest

from infra.cli import main
from infra.eval_recs import evaluate_file
from models.session_eval import (
    ItemKNN,
    Session,
    SessionDataError,
    detect_format,
    evaluate,
    filter_sessions,
    load_and_preprocess,
    load_sessions,
    split_by_days,
)
from schemas.errors import BorderflowError

T0 = 1_433_221_332_117  # RetailRocket's first event, epoch ms
MIN = 60_000
DAY = 86_400_000


def write(path: Path, text: str, *, compress: bool = False) -> Path:
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def retailrocket(rows: list[tuple[int, str, str, str]]) -> str:
    lines = ["timestamp,visitorid,event,itemid,transactionid"]
    lines += [f"{ts},{visitor},{event},{item}," for ts, visitor, event, item in rows]
    return "\n".join(lines) + "\n"


RR_ROWS = [
    # visitor 1: a session of three views, then 31 minutes idle, then a new session
    (T0 + 2 * MIN, "1", "view", "b"),
    (T0, "1", "view", "a"),  # out of order in the file, as in the real events.csv
    (T0 + 3 * MIN, "1", "addtocart", "b"),
    (T0 + 4 * MIN, "1", "view", "c"),
    (T0 + 35 * MIN, "1", "view", "d"),
    (T0 + 36 * MIN, "1", "view", "e"),
    # visitor 2: one view only (dropped: nothing to predict)
    (T0 + MIN, "2", "view", "a"),
]


@pytest.mark.parametrize("compress", [False, True])
def test_retailrocket_is_detected_and_sessionized_per_visitor(
    tmp_path: Path, compress: bool
) -> None:
    path = write(tmp_path / "events.csv", retailrocket(RR_ROWS), compress=compress)
    assert detect_format(path) == "retailrocket"
    sessions = load_sessions(path)
    assert [s.items for s in sessions] == [("a", "b", "c"), ("d", "e")]
    assert sessions[0].timestamps == (T0, T0 + 2 * MIN, T0 + 4 * MIN)
    assert [s.session_id for s in sessions] == ["1:0", "1:1"]


def test_retailrocket_all_events_and_a_longer_gap(tmp_path: Path) -> None:
    path = write(tmp_path / "events.csv", retailrocket(RR_ROWS))
    sessions = load_sessions(path, events="all", session_gap_min=60)
    assert [s.items for s in sessions] == [("a", "b", "b", "c", "d", "e")]


def test_yoochoose_clicks_without_header(tmp_path: Path) -> None:
    text = (
        "1,2014-04-07T10:51:09.277Z,214536502,0\n"
        "1,2014-04-07T10:54:09.868Z,214536500,0\n"
        "2,2014-04-07T13:56:37.614Z,214662742,S\n"
        "1,2014-04-07T10:52:00.000Z,214536506,0\n"
    )
    path = write(tmp_path / "yoochoose-clicks.dat", text, compress=True)
    assert detect_format(path) == "yoochoose"
    (session,) = load_sessions(path)
    assert session.items == ("214536502", "214536506", "214536500")
    assert session.timestamps[0] == 1_396_867_869_277


def test_yoochoose_buys_are_rejected_with_a_clear_message(tmp_path: Path) -> None:
    path = write(
        tmp_path / "yoochoose-buys.dat", "420374,2014-04-06T18:44:58.314Z,214537888,12462,1\n"
    )
    with pytest.raises(SessionDataError, match=r"yoochoose-buys.dat:1: looks like YOOCHOOSE buys"):
        detect_format(path)


@pytest.mark.parametrize(
    ("header", "sep", "scale"),
    [("SessionId\tItemId\tTime", "\t", 1), ("session_id;item;timestamp", ";", 1000)],
)
def test_generic_header_with_session_column_and_epoch_seconds_or_ms(
    tmp_path: Path, header: str, sep: str, scale: int
) -> None:
    rows = [("s1", "x", 1_400_000_000), ("s1", "y", 1_400_000_060), ("s2", "y", 1_400_000_030)]
    rows += [("s2", "z", 1_400_000_090)]
    text = header + "\n" + "".join(f"{s}{sep}{i}{sep}{t * scale}\n" for s, i, t in rows)
    path = write(tmp_path / "clicks.txt", text)
    assert detect_format(path) == "delimited"
    sessions = load_sessions(path)
    assert [s.items for s in sessions] == [("x", "y"), ("y", "z")]
    assert sessions[0].timestamps == (1_400_000_000_000, 1_400_000_060_000)


def test_generic_header_with_user_column_is_sessionized_by_gap(tmp_path: Path) -> None:
    text = "UserId,ItemId,Time\nu,a,1000\nu,b,1100\nu,c,9000\nu,d,9100\n"
    path = write(tmp_path / "u.csv", text)
    assert [s.items for s in load_sessions(path)] == [("a", "b"), ("c", "d")]


def test_bad_lines_name_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "events.csv", retailrocket(RR_ROWS[:2]) + "oops,1,view,a,\n")
    with pytest.raises(SessionDataError, match=r"events.csv:4: time 'oops'"):
        load_sessions(path)
    short = write(tmp_path / "short.tsv", "SessionId\tItemId\tTime\ns\tx\n")
    with pytest.raises(SessionDataError, match=r"short.tsv:2: expected at least 3"):
        load_sessions(short)
    unknown = write(tmp_path / "what.csv", "foo,bar\n1,2\n")
    with pytest.raises(SessionDataError, match=r"what.csv:1: unknown format"):
        detect_format(unknown)


def test_cli_reports_a_broken_file_on_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "events.csv", retailrocket(RR_ROWS[:2]) + "oops,1,view,a,\n")
    monkeypatch.setattr(sys, "argv", ["borderflow", "eval", "recs", str(path)])
    monkeypatch.delenv("BORDERFLOW_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"borderflow: error: {path}:4: time 'oops'")
    assert err.count("\n") == 1


def test_filter_sessions_follows_session_rec() -> None:
    sessions = [
        Session("1", ("a", "b", "a"), (0, 1, 2)),
        Session("2", ("a", "rare"), (3, 4)),
        Session("3", ("a",), (5,)),
        Session("4", ("b", "a"), (6, 7)),
    ]
    kept = filter_sessions(sessions, min_item_support=2)
    # one-click sessions go first (so a's support is 4), then rare items, then short sessions
    assert [s.items for s in kept] == [("a", "b", "a"), ("b", "a")]


def test_auto_item_support_keeps_small_samples_whole(tmp_path: Path) -> None:
    path = write(tmp_path / "events.csv", retailrocket(RR_ROWS))
    _, prep = load_and_preprocess(path)
    assert prep.min_item_support == 1 and prep.events == "view"
    _, prep = load_and_preprocess(path, min_item_support=2)
    assert prep.min_item_support == 2


def test_split_by_days_trains_on_the_past_and_drops_unseen_test_items() -> None:
    sessions = [
        Session("old", ("a", "b"), (0, 1)),
        Session("new", ("a", "unseen", "b"), (3 * DAY, 3 * DAY + 1, 3 * DAY + 2)),
        Session("gone", ("unseen", "a"), (3 * DAY + 5, 3 * DAY + 6)),
    ]
    train, test = split_by_days(sessions, 1)
    assert [s.session_id for s in train] == ["old"]
    assert [s.items for s in test] == [("a", "b")]


def test_split_evaluation_learns_training_sessions_first() -> None:
    train = [Session("t", ("a", "b"), (0, 1))]
    test = [Session("x", ("a", "b"), (5, 6))]
    frozen = evaluate(test, {"knn": ItemKNN()}, ks=(1,), train=train, learn=False)["knn"]
    assert frozen.n == 1 and frozen.hr[1] == 1.0
    cold = evaluate(test, {"knn": ItemKNN()}, ks=(1,))["knn"]
    assert cold.hr[1] == 0.0


def test_evaluate_file_split_protocol_reports_protocol_and_preprocessing(tmp_path: Path) -> None:
    rows = []
    for day in range(4):
        for v in range(3):
            base = T0 + day * DAY + v * 3_600_000
            rows += [(base, f"v{v}", "view", "a"), (base + MIN, f"v{v}", "view", "b")]
    path = write(tmp_path / "events.csv", retailrocket(rows))
    result = evaluate_file(path, protocol="split", test_days=1, test_learning=False)
    assert result["protocol"] == "split"
    assert "frozen" in result["protocol_description"]
    # the last day starts 2h after day 2's first session: day 2's third session is a test one
    assert result["train_sessions"] == 8 and result["sessions"] == 4
    assert "events: view" in result["preprocessing"]
    assert result["models"]["borderflow"]["hr"]["20"] == 1.0
    with pytest.raises(BorderflowError, match="test-days"):
        evaluate_file(path, protocol="split", test_days=100)
