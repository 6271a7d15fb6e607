"""Offline evaluation of session recommenders: metrics, protocol, baselines, loaders, CLI."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from infra.cli import cli, main
from infra.eval_recs import evaluate_file
from models.recommender import SessionRecommender
from models.session_eval import (
    BorderflowAdapter,
    ItemKNN,
    Popularity,
    Session,
    SessionDataError,
    detect_format,
    evaluate,
    load_clicks,
    load_diginetica,
    target_kind,
)
from schemas.config import Settings
from schemas.errors import BorderflowError

SAMPLE = (
    Path(__file__).resolve().parents[2].parent
    / "shared"
    / "data"
    / "diginetica_sample_train-item-views.csv"
)
DAY_MS = 86_400_000
#: 2016-05-09T00:00:00Z in epoch ms.
MAY_9 = 1_462_752_000_000


def session(session_id: str, *items: str, start: int = 0) -> Session:
    return Session(session_id, tuple(items), tuple(range(start, start + len(items))))


class Scripted:
    """Answers from a fixed table prefix -> list (the test knows the answers, the protocol not)."""

    def __init__(self, answers: dict[tuple[str, ...], list[str]]) -> None:
        self.answers = answers

    def observe(self, session_prefix: Sequence[str], item: str, ts: int) -> None:
        pass

    def recommend(self, session_prefix: Sequence[str], n: int) -> list[str]:
        return self.answers.get(tuple(session_prefix), [])


class Spy:
    """Records every call, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[str, ...], str | None]] = []
        self.prefix_types: set[type] = set()

    def observe(self, session_prefix: Sequence[str], item: str, ts: int) -> None:
        self.calls.append(("observe", tuple(session_prefix), item))

    def recommend(self, session_prefix: Sequence[str], n: int) -> list[str]:
        self.prefix_types.add(type(session_prefix))
        self.calls.append(("recommend", tuple(session_prefix), None))
        return []


# -- metrics ----------------------------------------------------------------------------------


def test_a_perfect_recommender_scores_one_everywhere() -> None:
    sessions = [session("1", "a", "b", "c"), session("2", "d", "e")]
    answers = {
        s.items[:t]: [s.items[t], "x", "y"] for s in sessions for t in range(1, len(s.items))
    }
    m = evaluate(sessions, {"oracle": Scripted(answers)})["oracle"]
    assert m.n == 3
    for k in (5, 10, 15, 20):
        assert m.hr[k] == 1.0
        assert m.mrr[k] == 1.0
        assert m.precision[k] == pytest.approx(1 / k)


def test_a_target_ranked_third_counts_from_k_three_on() -> None:
    sessions = [session("1", "a", "t")]
    m = evaluate(sessions, {"r": Scripted({("a",): ["x", "y", "t", "z"]})}, ks=(2, 3, 5))["r"]
    assert m.n == 1
    assert m.hr[2] == 0.0
    assert m.mrr[2] == 0.0
    assert m.hr[3] == 1.0
    assert m.hr[5] == 1.0
    assert m.mrr[5] == pytest.approx(1 / 3)
    assert m.precision[5] == pytest.approx(1 / 5)


def test_metrics_average_over_predictions() -> None:
    sessions = [session("1", "a", "b", "c")]
    # After a: b at rank 1 (hit). After a, b: c is missing (miss).
    answers = {("a",): ["b"], ("a", "b"): ["x", "y"]}
    m = evaluate(sessions, {"r": Scripted(answers)}, ks=(1, 5))["r"]
    assert m.n == 2
    assert m.hr[1] == m.hr[5] == 0.5
    assert m.mrr[5] == 0.5
    # coverage: items recommended in any top-k over the distinct items of the sessions.
    assert m.coverage[1] == pytest.approx(2 / 3)  # b, x of a, b, c
    assert m.coverage[5] == pytest.approx(3 / 3)  # b, x, y


def test_lists_are_cut_at_the_largest_k() -> None:
    sessions = [session("1", "a", "t")]
    long = [f"x{i}" for i in range(30)] + ["t"]
    m = evaluate(sessions, {"r": Scripted({("a",): long})}, ks=(5, 20))["r"]
    assert m.hr[20] == 0.0  # rank 31 is not a hit at 20


def test_predictions_are_split_by_kind_of_target() -> None:
    sessions = [session("1", "a", "b", "a", "a", "c")]
    assert [target_kind(sessions[0].items[:t], sessions[0].items[t]) for t in range(1, 5)] == [
        "new",
        "repeat",
        "last",
        "new",
    ]
    m = evaluate(sessions, {"r": Scripted({("a", "b"): ["a"]})})["r"]
    assert {kind: v["n"] for kind, v in m.by_target.items()} == {"new": 2, "repeat": 1, "last": 1}
    assert m.by_target["repeat"]["hr"] == 1.0
    assert m.by_target["new"]["hr"] == 0.0
    assert m.hr[20] == 0.25


def test_no_predictions_gives_zeros_not_errors() -> None:
    m = evaluate([], {"pop": Popularity()})["pop"]
    assert m.n == 0
    assert m.hr[20] == m.mrr[20] == m.coverage[20] == 0.0


@pytest.mark.parametrize("ks", [(), (0, 5), (-1,)])
def test_cut_offs_must_be_positive(ks: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        evaluate([], {"pop": Popularity()}, ks=ks)


# -- protocol ---------------------------------------------------------------------------------


def test_the_protocol_never_shows_a_recommender_the_item_it_must_predict() -> None:
    sessions = [session("1", "a", "b", "c"), session("2", "c", "a")]
    spy = Spy()
    evaluate(sessions, {"spy": spy})
    assert spy.calls == [
        ("observe", (), "a"),
        ("recommend", ("a",), None),
        ("observe", ("a",), "b"),
        ("recommend", ("a", "b"), None),
        ("observe", ("a", "b"), "c"),
        ("observe", (), "c"),
        ("recommend", ("c",), None),
        ("observe", ("c",), "a"),
    ]
    assert spy.prefix_types == {tuple}  # immutable: a recommender cannot grow the prefix


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.lists(st.sampled_from("abcdef"), min_size=2, max_size=6), min_size=1, max_size=6)
)
def test_every_recommend_comes_before_its_click_is_observed(raw: list[list[str]]) -> None:
    sessions = [session(str(i), *items) for i, items in enumerate(raw)]
    spy = Spy()
    evaluate(sessions, {"spy": spy})
    clicks = [(s.items[:t], s.items[t]) for s in sessions for t in range(len(s.items))]
    observed = [(prefix, item) for kind, prefix, item in spy.calls if kind == "observe"]
    assert observed == clicks  # every click learned once, in time order
    done = 0
    for kind, prefix, _ in spy.calls:
        if kind == "observe":
            done += 1
        else:
            # Exactly the clicks before the target have been learned, and the last of
            # them is the end of the prefix shown.
            target_prefix, _target = clicks[done]
            assert prefix == target_prefix
            assert observed[done - 1][1] == prefix[-1]


def test_all_models_see_the_same_clicks() -> None:
    sessions = [session("1", "a", "b", "c"), session("2", "b", "c")]
    one, two = Spy(), Spy()
    evaluate(sessions, {"one": one, "two": two})
    assert one.calls == two.calls


# -- baselines --------------------------------------------------------------------------------


def test_popularity_counts_every_click_so_far_and_ignores_the_session() -> None:
    pop = Popularity()
    for item in ["b", "a", "b", "c", "b", "a"]:
        pop.observe((), item, 0)
    assert pop.recommend(("z",), 2) == ["b", "a"]
    assert pop.recommend((), 5) == ["b", "a", "c"]
    pop.observe((), "c", 0)  # tie a = c = 2: smaller id first
    assert pop.recommend((), 3) == ["b", "a", "c"]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([f"i{i}" for i in range(12)]), max_size=80))
def test_popularity_top_list_matches_a_full_sort(clicks: list[str]) -> None:
    pop = Popularity(top=4)
    counts: dict[str, int] = {}
    for item in clicks:
        pop.observe((), item, 0)
        counts[item] = counts.get(item, 0) + 1
        expected = sorted(counts, key=lambda i: (-counts[i], i))
        assert pop.recommend((), 4) == expected[:4]
        assert pop.recommend((), 10) == expected[:10]  # beyond the maintained top


def play(model: ItemKNN | Popularity | BorderflowAdapter, *items: str, ts: int = 0) -> None:
    for t, item in enumerate(items):
        model.observe(items[:t], item, ts)


def test_item_knn_is_cosine_over_sessions() -> None:
    knn = ItemKNN()
    play(knn, "a", "b")
    play(knn, "a", "c")
    play(knn, "a", "b", "d", "b")  # b twice: one session, counted once
    assert knn.counts == {"a": 3, "b": 2, "c": 1, "d": 1}
    assert knn.similarity("a", "b") == pytest.approx(2 / math.sqrt(3 * 2))
    assert knn.similarity("a", "c") == pytest.approx(1 / math.sqrt(3))
    assert knn.similarity("b", "d") == pytest.approx(1 / math.sqrt(2))
    assert knn.similarity("c", "d") == 0.0
    # Neighbours of the last item only, best first, ties by id, never the item itself.
    assert knn.recommend(("d", "a"), 10) == ["b", "c", "d"]
    assert knn.recommend(("a", "c"), 10) == ["a"]
    assert knn.recommend((), 10) == []
    assert knn.recommend(("unknown",), 10) == []


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.sampled_from("abcde"), min_size=1, max_size=5), min_size=1, max_size=8))
def test_item_knn_matches_a_brute_force_cosine(raw: list[list[str]]) -> None:
    knn = ItemKNN()
    for items in raw:
        play(knn, *items)
    sets = [set(items) for items in raw]
    for i in "abcde":
        for j in "abcde":
            if i == j or not any(i in s for s in sets) or not any(j in s for s in sets):
                continue
            co = sum(1 for s in sets if i in s and j in s)
            n_i = sum(1 for s in sets if i in s)
            n_j = sum(1 for s in sets if j in s)
            assert knn.similarity(i, j) == pytest.approx(co / math.sqrt(n_i * n_j))


def test_borderflow_adapter_learns_global_views_at_the_data_time() -> None:
    recommender = SessionRecommender()
    adapter = BorderflowAdapter(recommender)
    for _ in range(3):
        play(adapter, "phone", "case", ts=MAY_9)
    assert set(recommender.popularity) == {"*"}  # no country: global only
    assert recommender._weight.origin_ms == MAY_9  # event time from the data
    assert adapter.recommend(("phone",), 1) == ["case"]
    assert sorted(adapter.recommend((), 2)) == ["case", "phone"]  # cold: popular items


# -- borderflow's recommender: behaviour the evaluation motivated ------------------------------


def test_recommender_learns_that_shoppers_go_back_to_the_previous_item() -> None:
    r = BorderflowAdapter()
    for i in range(20):  # a, b, back to a: the item before the current one is re-visited
        play(r, f"a{i}", f"b{i}", f"a{i}")
    got = r.recommend(("x", "y"), 3)
    assert got[0] == "x"  # the previous item, although x -> y -> ? was never seen


def test_recommender_does_not_recommend_session_items_without_evidence() -> None:
    r = SessionRecommender()
    adapter = BorderflowAdapter(r)
    for i in range(20):
        play(adapter, f"a{i}", f"b{i}", f"c{i}")  # never a re-visit
    assert sum(r.revisit_hits) == 0
    assert "x" not in adapter.recommend(("x", "y"), 20)


def test_cart_and_purchase_of_the_item_on_screen_are_not_revisits() -> None:
    r = SessionRecommender()
    r.observe(["a"], "a", country=None, category=None, ts_ms=MAY_9, kind="add_to_cart")
    r.observe(["a"], "a", country=None, category=None, ts_ms=MAY_9, kind="purchase")
    assert sum(r.revisit_hits) == sum(r.revisit_chances) == 0
    r.observe(["a"], "a", country=None, category=None, ts_ms=MAY_9, kind="view")
    assert r.revisit_hits[1] > 0


def test_popular_fillers_score_below_every_session_candidate() -> None:
    r = SessionRecommender()
    adapter = BorderflowAdapter(r)
    for _ in range(50):
        play(adapter, "hit")
    play(adapter, "a", "b")
    recs = r.recommend(["a"], country=None, n=3)
    assert [item for item, _ in recs] == ["b", "hit", "a"]
    assert recs[1][1] < recs[0][1]
    assert recs[1][1] == pytest.approx(r.popularity_weight * recs[0][1], rel=1e-5)


def test_tiny_decayed_scores_keep_their_order() -> None:
    r = SessionRecommender()
    r.observe(["a"], "old1", country=None, category=None, ts_ms=MAY_9, kind="view")
    r.observe(["a"], "old2", country=None, category=None, ts_ms=MAY_9, kind="view")
    r.observe(["a"], "old2", country=None, category=None, ts_ms=MAY_9, kind="view")
    r.observe([], "z", country=None, category=None, ts_ms=MAY_9 + 90 * DAY_MS, kind="view")
    recs = r.recommend(["a"], country=None, n=2)
    assert [item for item, _ in recs] == ["old2", "old1"]
    assert recs[0][1] > recs[1][1] > 0.0  # 30 half-lives later, still distinct


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([f"i{i}" for i in range(15)]), st.sampled_from(["DE", None])),
        max_size=120,
    )
)
def test_recommender_popular_items_match_a_full_sort(clicks: list[tuple[str, str | None]]) -> None:
    r = SessionRecommender(items_per_country=6)
    for step, (item, country) in enumerate(clicks):
        r.observe([], item, country=country, category=None, ts_ms=MAY_9 + step, kind="view")
        for key in ("DE", None):
            got = r.top_popular(key, 5)
            table = r.popularity.get(key or "*") or r.popularity.get("*", {})
            values = sorted(table.values(), reverse=True)[:5]
            assert [v for _, v in got] == values


# -- loaders ----------------------------------------------------------------------------------

DIGINETICA = """session_id;user_id;item_id;timeframe;eventdate
3;NA;30;200;2016-05-09
3;NA;31;100;2016-05-09
1;7;10;5;2016-05-10
1;7;11;9;2016-05-10
2;NA;20;1;2016-05-09
12;NA;40;1;2016-05-09
12;NA;41;2;2016-05-09
12;NA;41;3;2016-05-09
"""


def write(tmp_path: Path, text: str, name: str = "views.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_diginetica_sessions_by_day_then_id_items_by_timeframe(tmp_path: Path) -> None:
    sessions = load_diginetica(write(tmp_path, DIGINETICA))
    # Session 2 has one click: dropped. Day 05-09 first; 3 before 12 (numeric order).
    assert [s.session_id for s in sessions] == ["3", "12", "1"]
    assert sessions[0].items == ("31", "30")  # by timeframe, not file order
    assert sessions[0].timestamps == (MAY_9 + 100, MAY_9 + 200)
    assert sessions[1].items == ("40", "41", "41")  # repeats kept
    assert sessions[2].timestamps == (MAY_9 + DAY_MS + 5, MAY_9 + DAY_MS + 9)
    assert [s.session_id for s in load_diginetica(write(tmp_path, DIGINETICA), min_length=1)] == [
        "2",
        "3",
        "12",
        "1",
    ]


def test_diginetica_file_with_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + DIGINETICA.encode())
    assert detect_format(path) == "diginetica"
    assert len(load_diginetica(path)) == 3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty file"),
        ("a;b;c\n1;2;3\n", "missing column"),
        ("session_id;user_id;item_id;timeframe;eventdate\n1;NA;5;x;2016-01-01\n", ":2:"),
        ("session_id;user_id;item_id;timeframe;eventdate\n1;NA;5;1;09.05.2016\n", "eventdate"),
        ("session_id;user_id;item_id;timeframe;eventdate\n1;NA;5\n", "fields"),
    ],
)
def test_bad_diginetica_files_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SessionDataError, match=message):
        load_diginetica(write(tmp_path, text))


def test_clicks_jsonl_envelopes_and_bare_clicks(tmp_path: Path) -> None:
    def click(event: str, ts: int, item: str | None, kind: str = "view", sid: str = "s1") -> dict:
        return {
            "event_id": event,
            "ts": ts,
            "user_id": "u1",
            "session_id": sid,
            "type": kind,
            "item_id": item,
        }

    lines = [
        {"topic": "clicks", "key": "u1", "value": click("e1", MAY_9 + 2, "b")},
        click("e2", MAY_9 + 1, "a"),
        click("e3", MAY_9 + 3, "b", "add_to_cart"),  # same item again: one step
        click("e4", MAY_9 + 4, None, "search"),
        {"topic": "payments", "key": "u1", "value": {"nonsense": True}},
        click("e5", MAY_9 + 5, "c", "purchase"),
        click("e6", MAY_9, "z", sid="s0"),  # a one-item session: dropped
    ]
    path = write(tmp_path, "\n".join(json.dumps(line) for line in lines) + "\n", "c.jsonl")
    assert detect_format(path) == "clicks"
    [only] = load_clicks(path)
    assert only.items == ("a", "b", "c")
    assert only.timestamps == (MAY_9 + 1, MAY_9 + 2, MAY_9 + 5)


def test_a_bad_click_line_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, '{"event_id": "e1", "ts": "yesterday"}\n', "c.jsonl")
    with pytest.raises(SessionDataError, match=r"c.jsonl:1: not a borderflow click"):
        load_clicks(path)


# -- command line -----------------------------------------------------------------------------


def synthetic_diginetica(tmp_path: Path) -> Path:
    rows = ["session_id;user_id;item_id;timeframe;eventdate"]
    for sid in range(1, 41):
        items = ["phone", "case", "charger"] if sid % 2 else ["tv", "cable", "tv"]
        day = f"2016-05-{10 + sid // 10:02d}"
        for t, item in enumerate(items):
            rows.append(f"{sid};NA;{item};{1000 * t};{day}")
    return write(tmp_path, "\n".join(rows) + "\n")


def invoke(*args: str) -> tuple[int, str, BaseException | None]:
    result = CliRunner().invoke(cli, ["eval", "recs", *args], obj=Settings())
    return result.exit_code, result.output, result.exception


def table_rows(output: str) -> dict[str, list[float]]:
    rows = {}
    for line in output.splitlines():
        name, *cells = line.split() or [""]
        if name in ("borderflow", "item-kNN", "popularity") and name not in rows:
            rows[name] = [float(cell) for cell in cells]
    return rows


def test_cli_prints_a_table_with_the_three_models(tmp_path: Path) -> None:
    code, output, _ = invoke(str(synthetic_diginetica(tmp_path)))
    assert code == 0, output
    header = next(line for line in output.splitlines() if "HR@5" in line)
    assert header.split() == [f"{m}@{k}" for k in (5, 10, 15, 20) for m in ("HR", "MRR", "P")]
    rows = table_rows(output)
    assert list(rows) == ["borderflow", "item-kNN", "popularity"]
    for cells in rows.values():
        assert len(cells) == 12
        assert all(0.0 <= cell <= 1.0 for cell in cells)
    assert "40 sessions, 120 clicks" in output


def test_cli_json_and_custom_cut_offs(tmp_path: Path) -> None:
    code, output, _ = invoke(str(synthetic_diginetica(tmp_path)), "--json", "--k", "3,1")
    assert code == 0, output
    result = json.loads(output)
    assert result["ks"] == [1, 3]
    assert result["format"] == "diginetica"
    assert list(result["models"]) == ["borderflow", "item-kNN", "popularity"]
    for metrics in result["models"].values():
        assert metrics["n"] == 80
        assert set(metrics["hr"]) == {"1", "3"}
        assert metrics["precision"]["3"] == pytest.approx(metrics["hr"]["3"] / 3)
    # Same file, same answer: the run is deterministic.
    again = json.loads(invoke(str(synthetic_diginetica(tmp_path)), "--json", "--k", "1,3")[1])
    for name in result["models"]:
        assert again["models"][name]["hr"] == result["models"][name]["hr"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        ("hello;world\n", "unknown format"),
        (b"\xff\xfe\x00binary", "unknown format"),
        ("session_id;user_id;item_id;timeframe;eventdate\n1;NA;5;1;2016-05-09\n", "no session"),
    ],
)
def test_cli_bad_file_is_a_borderflow_error(
    tmp_path: Path, content: str | bytes | None, message: str
) -> None:
    path = tmp_path / "clicks.csv"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(BorderflowError, match=message):
        evaluate_file(path)
    code, _, exc = invoke(str(path))
    assert code == 1
    assert isinstance(exc, BorderflowError)


def test_cli_forced_format_that_does_not_fit_is_a_borderflow_error(tmp_path: Path) -> None:
    path = write(tmp_path, '{"a": 1}\n', "x.jsonl")
    with pytest.raises(BorderflowError, match="DIGINETICA"):
        evaluate_file(path, fmt="diginetica")


def test_missing_file_is_one_line_through_main(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.csv"
    monkeypatch.setattr(sys, "argv", ["borderflow", "eval", "recs", str(missing)])
    monkeypatch.delenv("BORDERFLOW_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err == f"borderflow: error: cannot read {missing}: No such file or directory\n"


def test_bad_cut_offs_are_a_usage_error(tmp_path: Path) -> None:
    code, output, _ = invoke(str(synthetic_diginetica(tmp_path)), "--k", "0,5")
    assert code == 2
    assert "--k" in output


def test_cli_on_the_real_diginetica_sample() -> None:
    assert SAMPLE.is_file(), f"the DIGINETICA sample is missing: {SAMPLE}"
    code, output, _ = invoke(str(SAMPLE))
    assert code == 0, output
    rows = table_rows(output)
    assert list(rows) == ["borderflow", "item-kNN", "popularity"]
    assert all(len(cells) == 12 for cells in rows.values())
    # The data, not the models: 2,053 sessions of 2+ clicks give 9,405 predictions.
    assert "2,053 sessions, 11,458 clicks" in output
    assert "9,405 predictions" in output
