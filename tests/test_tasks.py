"""Tests of wowlib.tasks against the real data files (WOW_DATA_DIR; CI points it at its copy).

Item counts, gold answers (NLGraph recomputed with networkx), proxies per task, splits, malformed
input, answer parsing and option orders. Expensive parts are kept small: chess analyses use depth
6 on at most 8 puzzles; the embedding proxies (MMLU-Pro, HellaSwag) use 20 questions.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import networkx as nx
import pytest
from conftest import require_stockfish
from hypothesis import given, settings
from hypothesis import strategies as st

from wowlib.tasks import (
    LETTERS,
    DataError,
    ProxyUnavailable,
    generate_problems,
    get_task,
    parse_letter,
    parse_number,
    write_problems,
)
from wowlib.tasks.chess import ChessPuzzles, win_chance
from wowlib.tasks.kc import KnowledgeCrosswords
from wowlib.tasks.medmcqa import MedMCQA
from wowlib.tasks.nlgraph import Matching, MaximumFlow, ShortestPath
from wowlib.tasks.open_ended import COM2, BioGeneration
from wowlib.tasks.scibench import SciBench

NLGRAPH = {"nlgraph_shortest_path": ShortestPath, "nlgraph_flow": MaximumFlow, "nlgraph_matching": Matching}
CHESS_DEPTH = 6
N_CHESS = 8
N_EMBED = 20


def fresh(name: str, data_dir: Path, **options):
    """A new task instance, isolated from get_task's instance cache."""
    return type(get_task(name, data_dir=data_dir, **options))(data_dir=data_dir, **options)


def ids(questions) -> list[str]:
    return [q.qid for q in questions]


# ---------------------------------------------------------------------------- item counts

COUNTS = [
    ("kc", {}, 441),
    ("kc", {"variant": "MC_easy"}, 439),
    ("nlgraph_shortest_path", {}, 380),
    ("nlgraph_flow", {}, 350),
    ("nlgraph_matching", {}, 510),
    ("mmlu_pro", {}, 3098),
    ("hellaswag", {}, 2000),
    ("chess", {"depth": CHESS_DEPTH}, 339),
    ("medmcqa", {}, 4183),
    ("scibench", {}, 580),
    ("biogeneration", {}, 500),
]


@pytest.mark.parametrize("name, options, expected", COUNTS,
                         ids=[f"{n}-{o.get('variant', '')}" for n, o, _ in COUNTS])
def test_item_counts_match_the_data_readme(data_dir, name, options, expected):
    items = get_task(name, data_dir=data_dir, **options).load()
    assert len(items) == expected
    assert len({q.qid for q in items}) == expected
    assert all(q.task == name for q in items)


def test_mmlu_pro_keeps_only_the_papers_23_subjects(data_dir):
    subjects = {q.meta["subject"] for q in get_task("mmlu_pro", data_dir=data_dir).load()}
    assert len(subjects) == 23
    assert not any(s.startswith(("college_mathematics", "high_school_physics", "computer")) for s in subjects)


# ---------------------------------------------------------------------------- NLGraph gold

def _independent_gold(name: str, graph) -> int:
    """The answer with networkx, by a different route than the loader's solver."""
    if name == "nlgraph_shortest_path":
        g = nx.MultiGraph()                        # parallel edges: the lightest counts
        g.add_weighted_edges_from(graph.edges)
        return int(nx.dijkstra_path_length(g, graph.source, graph.target))
    if name == "nlgraph_flow":
        capacity: dict[tuple[int, int], int] = {}
        for a, b, c in graph.edges:
            capacity[a, b] = capacity.get((a, b), 0) + c
        g = nx.DiGraph()
        g.add_edges_from((a, b, {"capacity": c}) for (a, b), c in capacity.items())
        return int(nx.algorithms.flow.edmonds_karp(g, graph.source, graph.target).graph["flow_value"])
    g = nx.Graph()
    g.add_edges_from((("a", a), ("j", j)) for a, j, _ in graph.edges)
    return len(nx.max_weight_matching(g, maxcardinality=True))


@pytest.mark.parametrize("name", sorted(NLGRAPH))
def test_nlgraph_gold_is_recomputed_with_networkx_for_every_item(data_dir, name):
    task = get_task(name, data_dir=data_dir)
    items = task.load()
    raw = json.loads((data_dir / task.file).read_text(encoding="utf-8"))
    assert len(items) == len(raw)
    for q, (key, rec) in zip(items, raw.items()):
        assert q.qid == f"{name}-{key}"
        file_gold = int(task.gold_pattern.search(rec["answer"]).group(1))
        graph = q.meta["graph"]
        if name != "nlgraph_matching":
            assert len(graph.edges) == rec["question"].count("an edge ")
        assert q.gold == file_gold == task.solve(graph) == _independent_gold(name, graph), key


def test_nlgraph_tampered_answer_raises_data_error_naming_the_item(data_dir, tmp_path):
    source = data_dir / "nlgraph/shortest_path/main.json"
    raw = json.loads(source.read_text(encoding="utf-8"))
    key = list(raw)[7]
    gold = int(re.search(r"total weight of (\d+)", raw[key]["answer"]).group(1))
    raw[key]["answer"] = raw[key]["answer"].replace(f"total weight of {gold}", f"total weight of {gold + 1}")
    target = tmp_path / "nlgraph/shortest_path/main.json"
    target.parent.mkdir(parents=True)
    target.write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(DataError) as err:
        ShortestPath(data_dir=tmp_path).load()
    message = str(err.value)
    assert f"item {key!r}" in message and str(target) in message
    assert f"{gold + 1}" in message and f"networkx computes {gold}" in message


# ---------------------------------------------------------------------------- NLGraph proxy

def _smallest(task, k: int = 3):
    return sorted(task.load(), key=lambda q: len(q.meta["graph"].edges))[:k]


@pytest.mark.parametrize("name", sorted(NLGRAPH))
def test_nlgraph_proxy_gold_one_normaliser_zero_clipped(data_dir, name):
    task = NLGRAPH[name](data_dir=data_dir)
    for q in _smallest(task):
        norm = task.normaliser(q)
        assert norm >= q.gold
        assert task.proxy(q, None) is None
        assert task.proxy(q, q.gold) == 1.0 and task.is_correct(q, q.gold)
        assert task.proxy(q, float(q.gold)) == 1.0
        if norm > q.gold:
            assert task.proxy(q, norm) == pytest.approx(0.0)
            assert task.proxy(q, (q.gold + norm) / 2) == pytest.approx(0.5)
            assert 0.0 < task.proxy(q, q.gold + 0.25 * (norm - q.gold)) < 1.0
            assert not task.is_correct(q, q.gold + 1)
        for answer in (-1000, -1, norm + 1, 10 * norm + 7, 1e9):
            value = task.proxy(q, answer)
            assert 0.0 <= value <= 1.0
        assert task.proxy(q, 1e9) == 0.0 and task.proxy(q, -1e9) == 0.0


def test_shortest_path_normaliser_is_the_longest_simple_path(data_dir):
    task = ShortestPath(data_dir=data_dir)
    for q in _smallest(task):
        graph = q.meta["graph"]
        g = nx.Graph()
        g.add_weighted_edges_from(graph.edges)
        longest = max(nx.path_weight(g, p, "weight") for p in nx.all_simple_paths(g, graph.source, graph.target))
        assert task.normaliser(q) == longest


@pytest.mark.parametrize("name, normaliser", [("nlgraph_flow", 2), ("nlgraph_matching", 2)])
def test_flow_and_matching_normaliser_is_twice_gold(data_dir, name, normaliser):
    task = NLGRAPH[name](data_dir=data_dir)
    q = next(q for q in task.load() if q.gold > 0)
    assert task.normaliser(q) == normaliser * q.gold
    assert task.proxy(q, 3 * q.gold) == 0.0


# ---------------------------------------------------------------------------- NLGraph generator

@pytest.mark.parametrize("difficulty", ["easy", "hard"])
@pytest.mark.parametrize("name", sorted(NLGRAPH))
def test_generated_problems_round_trip_through_the_loader(tmp_path, name, difficulty):
    path = write_problems(tmp_path / "gen" / f"{name}.json", name, n=6, difficulty=difficulty, seed=3)
    generated = json.loads(path.read_text(encoding="utf-8"))
    assert generated == generate_problems(name, 6, difficulty, seed=3)        # seeded
    assert generated != generate_problems(name, 6, difficulty, seed=4)
    task = NLGRAPH[name](data_dir=tmp_path / "unused", file=str(path))
    items = task.load()                        # the loader recomputes every gold answer
    assert [q.qid for q in items] == [f"{name}-{i}" for i in range(6)]
    low, high = {"easy": (5, 10), "hard": (11, 20)}[difficulty]
    for q, rec in zip(items, generated.values()):
        assert q.meta["difficulty"] == difficulty
        assert q.gold == int(task.gold_pattern.search(rec["answer"]).group(1))
        if name != "nlgraph_matching":
            n_nodes = int(re.search(r"numbered from 0 to (\d+)", rec["question"]).group(1)) + 1
            assert low <= n_nodes <= high
        if name == "nlgraph_shortest_path" and difficulty == "hard":
            # as sparse as NLGraph's hard graphs (at most 2.5n edges there), checked before the
            # proxy: its longest-simple-path normaliser explodes on dense 11-20 node graphs
            assert len(q.meta["graph"].edges) <= 2.5 * n_nodes
        assert task.proxy(q, q.gold) == 1.0
    # the registry path: get_task(name, file=...) reads the same problems
    via_registry = get_task(name, file=str(path))
    assert [q.gold for q in via_registry.load()] == [q.gold for q in items]


def test_generator_rejects_unknown_task_and_difficulty():
    with pytest.raises(KeyError):
        generate_problems("nlgraph_cycle", 2)
    with pytest.raises(ValueError):
        generate_problems("nlgraph_flow", 2, difficulty="medium")


# ---------------------------------------------------------------------------- Knowledge Crosswords

_BLANK = re.compile(r"blank (\d): (.*?)(?=, blank \d: |$)")


@pytest.mark.parametrize("variant", ["MC_medi", "MC_easy"])
def test_kc_options_have_0_to_3_right_blanks_exactly_once(data_dir, variant):
    answers = {}
    with open(data_dir / f"knowledge_crosswords/{variant}.jsonl", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            answers[f"{variant}-{rec['id']}"] = rec["answer_all"]
    items = get_task("kc", data_dir=data_dir, variant=variant).load()
    for q in items:
        assert len(q.options) == 4 and len(set(q.options)) == 4
        assert sorted(q.option_proxies) == [0.0, 1 / 3, 2 / 3, 1.0], q.qid
        assert q.option_proxies[q.gold] == 1.0
        for option, proxy in zip(q.options, q.option_proxies):
            filled = _BLANK.findall(option)
            assert [k for k, _ in filled] == ["1", "2", "3"], option
            n_right = sum(value == gold for (_, value), gold in zip(filled, answers[q.qid]))
            assert proxy == n_right / 3, (q.qid, option)


def test_kc_options_are_deterministic_across_fresh_instances(data_dir):
    first = KnowledgeCrosswords(data_dir=data_dir).load()
    second = KnowledgeCrosswords(data_dir=data_dir).load()
    assert [(q.qid, q.options, q.option_proxies, q.gold) for q in first] == \
           [(q.qid, q.options, q.option_proxies, q.gold) for q in second]
    # the gold is not always at the same position (options are shuffled)
    assert len({q.gold for q in first}) == 4


def test_kc_rejects_unknown_variant(data_dir):
    with pytest.raises(ValueError, match="MC_easy"):
        KnowledgeCrosswords(data_dir=data_dir, variant="MC_extreme")


# ---------------------------------------------------------------------------- chess

@pytest.fixture(scope="module")
def chess_questions(data_dir, stockfish):
    return get_task("chess", data_dir=data_dir, depth=CHESS_DEPTH).questions("test", N_CHESS)


def test_chess_options_are_legal_san_moves_with_win_chances(chess_questions):
    import chess
    assert len(chess_questions) == N_CHESS
    for q in chess_questions:
        board = chess.Board(q.meta["fen"])
        assert 2 <= len(q.options) <= 4 and len(set(q.options)) == len(q.options)
        for move in q.options:
            parsed = board.parse_san(move)          # raises on an illegal or malformed move
            assert parsed in board.legal_moves and board.san(parsed) == move
        assert all(0.0 <= p <= 1.0 for p in q.option_proxies)
        assert q.option_proxies[q.gold] == max(q.option_proxies)
        assert list(q.option_proxies) == sorted(q.option_proxies, reverse=True)   # best first


def test_chess_puzzle_solution_is_the_highest_scored_option(chess_questions):
    for q in chess_questions:
        solution = q.meta["solution"]
        assert solution in q.options, (q.qid, solution, q.options)
        assert q.option_proxies[q.options.index(solution)] == max(q.option_proxies), q.qid
        assert get_task("chess", depth=CHESS_DEPTH).is_correct(q, q.options.index(solution))


def test_chess_filter_and_first_move(data_dir):
    import chess
    items = get_task("chess", data_dir=data_dir, depth=CHESS_DEPTH).load()
    assert all(600 < q.meta["rating"] < 1000 for q in items)
    q = items[0]
    board = chess.Board(q.meta["fen"])
    board.parse_san(q.meta["solution"])          # the solution is legal after the opponent's move
    assert q.meta["fen"] in q.query


def test_win_chance_from_engine_scores():
    import chess
    from chess.engine import Cp, Mate, PovScore
    assert win_chance(PovScore(Cp(0), chess.WHITE)) == 0.5
    assert win_chance(PovScore(Mate(2), chess.BLACK)) == 1.0
    assert win_chance(PovScore(Mate(-1), chess.WHITE)) == 0.0
    assert win_chance(PovScore(Cp(400), chess.WHITE)) == pytest.approx(1 / 1.1)
    assert win_chance(PovScore(Cp(400), chess.BLACK)) == pytest.approx(1 / 1.1)   # relative to the mover
    assert win_chance(PovScore(Cp(-200), chess.WHITE)) < 0.5


def test_chess_needs_exactly_one_engine_limit(data_dir):
    with pytest.raises(ValueError):
        ChessPuzzles(data_dir=data_dir, depth=None, time=None)
    with pytest.raises(ValueError):
        ChessPuzzles(data_dir=data_dir, depth=6, time=1.0)


# ---------------------------------------------------------------------------- embedding proxies

@pytest.mark.parametrize("name", ["mmlu_pro", "hellaswag"])
def test_similarity_proxy_gold_is_one_and_others_below(data_dir, name):
    task = get_task(name, data_dir=data_dir)
    questions = task.questions("test", N_EMBED)
    assert len(questions) == N_EMBED
    assert ids(questions) == ids(task.splits()["test"][:N_EMBED])
    for q in questions:
        assert len(q.option_proxies) == len(q.options)
        assert q.option_proxies[q.gold] == 1.0, q.qid
        others = [p for i, p in enumerate(q.option_proxies) if i != q.gold]
        assert all(0.0 <= p < 1.0 for p in others), (q.qid, q.option_proxies)
        assert task.is_correct(q, q.gold) and task.proxy(q, q.gold) == 1.0
        wrong = next(i for i in range(len(q.options)) if i != q.gold)
        assert not task.is_correct(q, wrong) and task.proxy(q, wrong) < 1.0
    # the proxies differ between options (not a constant)
    assert len({round(p, 4) for q in questions for p in q.option_proxies}) > N_EMBED


def test_hellaswag_answer_letter_maps_to_the_gold_choice(data_dir):
    raw = json.loads((data_dir / "hellaswag/hellaswag.json").read_text(encoding="utf-8"))
    items = get_task("hellaswag", data_dir=data_dir).load()
    first = raw["dev"][0]
    q = items[0]
    assert q.qid == "dev-0" and q.options[q.gold] == first["choices"][first["answer"]]
    last = raw["test"][-1]
    q = items[-1]
    assert q.options[q.gold] == last["choices"][last["answer"]]


def test_mmlu_pro_gold_matches_the_answer_letter(data_dir):
    items = get_task("mmlu_pro", data_dir=data_dir).load()
    import pandas as pd
    frame = pd.read_parquet(data_dir / "mmlu_pro/test-00000-of-00001.parquet").set_index("question_id")
    for q in items[::97]:
        row = frame.loc[int(q.qid)]
        assert LETTERS[q.gold] == row["answer"]
        assert list(q.options) == [str(o) for o in row["options"]]


# ---------------------------------------------------------------------------- medmcqa, scibench

def test_medmcqa_cop_is_one_based_and_proxies_binary(data_dir):
    raw = [json.loads(line) for line in (data_dir / "medmcqa/dev.json").read_text(encoding="utf-8").splitlines()
           if line.strip()]
    task = get_task("medmcqa", data_dir=data_dir)
    items = task.load()
    assert len(items) == len(raw)
    for q, rec in zip(items, raw):
        assert q.qid == rec["id"]
        assert q.options[q.gold] == rec["op" + "abcd"[rec["cop"] - 1]]
        assert q.gold == rec["cop"] - 1
        assert sorted(q.option_proxies) == [0.0, 0.0, 0.0, 1.0]
    q = items[0]
    assert task.proxy(q, q.gold) == 1.0 and task.is_correct(q, q.gold)
    assert {task.proxy(q, i) for i in range(4) if i != q.gold} == {0.0}
    assert task.graded is False


def test_scibench_correct_within_five_percent_and_binary_proxy(data_dir):
    task = get_task("scibench", data_dir=data_dir)
    items = task.load()
    assert {q.meta["book"] for q in items} == {"atkins", "calculus", "chemmc", "class", "diff", "fund",
                                               "matter", "quan", "stat", "thermo"}
    checked = 0
    for q in items:
        if q.gold == 0:
            continue
        g = q.gold
        assert task.is_correct(q, g) and task.proxy(q, g) == 1.0
        assert task.is_correct(q, g * 1.049) and task.is_correct(q, g * 0.951)
        assert not task.is_correct(q, g * 1.051) and not task.is_correct(q, g * 0.949)
        assert task.proxy(q, g * 1.2) == 0.0 and task.proxy(q, -g) == 0.0
        checked += 1
    assert checked > 500
    q = items[0]
    assert q.gold == 50.7
    assert task.proxy(q, None) is None and not task.is_correct(q, None)
    assert task.parse("The final answer is 50.9", q).value == 50.9
    assert task.parse("First 3 then 7. The final answer is: 5.07e1", q).value == 50.7
    assert task.parse("The final answer is 5.07 x 10^1", q).value == pytest.approx(50.7)
    assert task.parse("None", q).value is None
    assert task.parse("First 3 then 7.", q).reason == "no_answer"       # never the last number of the text


# ---------------------------------------------------------------------------- open-ended: bio, com2

def test_biogeneration_without_scorer_raises_proxy_unavailable(data_dir):
    task = BioGeneration(data_dir=data_dir)
    q = task.load()[0]
    assert q.query.startswith("Question: Tell me a bio of") and q.meta["topic"] in q.query
    assert not task.has_proxy
    with pytest.raises(ProxyUnavailable, match=r"FActScore.*scorer="):
        task.proxy(q, "He was born in 1900.")


def test_biogeneration_with_scorer_returns_its_score(data_dir):
    calls = []

    def scorer(topic, response):
        calls.append((topic, response))
        return 0.25 if "1900" in response else 0.95

    task = BioGeneration(data_dir=data_dir, scorer=scorer)
    q = task.load()[3]
    assert task.has_proxy
    assert task.proxy(q, "Born in 1900.") == 0.25
    assert calls == [(q.meta["topic"], "Born in 1900.")]
    assert task.proxy(q, None) is None
    assert not task.is_correct(q, "Born in 1900.") and task.is_correct(q, "Born in 1901.")
    bad = BioGeneration(data_dir=data_dir, scorer=lambda topic, response: 1.5)
    with pytest.raises(ValueError, match="1.5"):
        bad.proxy(q, "text")


def test_com2_missing_file_names_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        COM2(data_dir=tmp_path).load()
    message = str(err.value)
    assert str(tmp_path / "com2" / "com2.csv") in message
    assert "WOW_DATA_DIR" in message


def _write_com2(path: Path) -> Path:
    import csv
    rows = [
        # kept: multi-hop (2i/3i) and the answer is not "none of the above" (label 4)
        {"question": "What will PersonX do next?", "context": "PersonX goes to the market.",
         "options": repr(["buy food", "sleep", "fly away", "sing", "none of the above"]), "label": "0",
         "type": "2i"},
        {"question": "Why did PersonX leave?", "context": "PersonX left the party early.",
         "options": repr(["was tired", "was hungry", "it's late", "won a prize", "none of the above"]),
         "label": "2", "type": "3i"},
        # dropped: answer "none of the above"
        {"question": "Q3", "context": "C3", "options": repr(["a", "b", "c", "d", "none of the above"]),
         "label": "4", "type": "2i"},
        # dropped: single-hop
        {"question": "Q4", "context": "C4", "options": repr(["a", "b", "c", "d", "none of the above"]),
         "label": "1", "type": "1i"},
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["question", "context", "options", "label", "type"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_com2_tiny_csv_loads_and_proxy_is_unavailable(tmp_path):
    _write_com2(tmp_path / "com2" / "com2.csv")
    task = COM2(data_dir=tmp_path)
    items = task.load()
    assert [q.gold for q in items] == [0, 2]
    assert items[0].options == ("buy food", "sleep", "fly away", "sing")
    assert items[1].options[items[1].gold] == "it's late"
    assert "PersonX left the party early." in items[1].query and "Why did PersonX leave?" in items[1].query
    assert task.is_correct(items[1], 2) and not task.is_correct(items[1], 0)
    assert not task.has_proxy
    with pytest.raises(ProxyUnavailable, match="Vera"):
        task.proxy(items[0], 1)


def test_com2_options_are_never_evaluated(tmp_path):
    path = _write_com2(tmp_path / "com2" / "com2.csv")
    text = path.read_text(encoding="utf-8").replace("[", "__import__('os').getcwd() or [", 1)
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match="line 2"):
        COM2(data_dir=tmp_path).load()


# ---------------------------------------------------------------------------- splits

SPLIT_SIZES = {
    "kc": (353, 44, 44), "nlgraph_shortest_path": (304, 38, 38), "nlgraph_flow": (280, 35, 35),
    "nlgraph_matching": (408, 51, 51), "mmlu_pro": (500, 62, 63), "hellaswag": (500, 62, 63),
    "chess": (271, 34, 34), "medmcqa": (500, 62, 63), "scibench": (464, 58, 58),
    "biogeneration": (400, 50, 50),
}


def _task_options(name: str) -> dict:
    return {"depth": CHESS_DEPTH} if name == "chess" else {}


@pytest.mark.parametrize("name", sorted(SPLIT_SIZES))
def test_split_sizes_disjoint_and_deterministic(data_dir, name):
    task = get_task(name, data_dir=data_dir, **_task_options(name))
    splits = task.splits()
    assert tuple(len(splits[s]) for s in ("train", "val", "test")) == SPLIT_SIZES[name]
    all_ids = [q.qid for s in splits.values() for q in s]
    assert len(all_ids) == len(set(all_ids)) == min(625, len(task.load()))
    again = fresh(name, data_dir, **_task_options(name)).splits()
    assert {s: ids(v) for s, v in again.items()} == {s: ids(v) for s, v in splits.items()}
    # a sample, not a prefix of the file
    assert ids(splits["train"][:20]) != ids(task.load()[:20])


@pytest.mark.parametrize("name", ["kc", "medmcqa", "scibench", "nlgraph_flow", "biogeneration"])
def test_questions_n_is_a_prefix_of_the_split(data_dir, name):
    task = fresh(name, data_dir)
    for split in ("train", "val", "test"):
        full = task.questions(split)
        for n in (0, 1, 7, 30):
            assert task.questions(split, n) == full[:n]
    with pytest.raises(ValueError, match="split"):
        task.questions("dev")


def test_questions_prefix_for_materialised_tasks(data_dir, chess_questions):
    chess_task = get_task("chess", data_dir=data_dir, depth=CHESS_DEPTH)
    short = chess_task.questions("test", 3)
    assert short == chess_questions[:3]
    assert [q.option_proxies for q in short] == [q.option_proxies for q in chess_questions[:3]]
    mmlu = get_task("mmlu_pro", data_dir=data_dir)
    assert mmlu.questions("test", 5) == mmlu.questions("test", N_EMBED)[:5]


# ---------------------------------------------------------------------------- malformed input

def _copy(data_dir: Path, tmp_path: Path, relative: str) -> Path:
    target = tmp_path / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(data_dir / relative, target)
    return target


def _edit_line(path: Path, lineno: int, edit) -> None:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[lineno - 1] = edit(lines[lineno - 1])
    path.write_text("".join(lines), encoding="utf-8")


KC_FIRST_THREE_BLANK_LINE = 38          # lines 1-37 of MC_medi.jsonl have fewer blanks


def test_kc_truncated_json_line_names_file_and_line(data_dir, tmp_path):
    path = _copy(data_dir, tmp_path, "knowledge_crosswords/MC_medi.jsonl")
    _edit_line(path, 5, lambda line: line[: len(line) // 2] + "\n")
    with pytest.raises(DataError) as err:
        KnowledgeCrosswords(data_dir=tmp_path).load()
    assert f"{path}: line 5" in str(err.value) and "invalid JSON" in str(err.value)


def test_kc_missing_key_names_file_line_and_key(data_dir, tmp_path):
    path = _copy(data_dir, tmp_path, "knowledge_crosswords/MC_medi.jsonl")
    lineno = KC_FIRST_THREE_BLANK_LINE + 2

    def drop_answers(line):
        rec = json.loads(line)
        assert len(rec["blanks"]) == 3
        del rec["answer_all"]
        return json.dumps(rec) + "\n"

    _edit_line(path, lineno, drop_answers)
    with pytest.raises(DataError) as err:
        KnowledgeCrosswords(data_dir=tmp_path).load()
    assert f"{path}: line {lineno}" in str(err.value) and "'answer_all'" in str(err.value)


def test_kc_wrong_type_names_the_key(data_dir, tmp_path):
    path = _copy(data_dir, tmp_path, "knowledge_crosswords/MC_medi.jsonl")

    def options_as_list(line):
        rec = json.loads(line)
        rec["options"] = list(rec["options"].values())
        return json.dumps(rec) + "\n"

    _edit_line(path, KC_FIRST_THREE_BLANK_LINE, options_as_list)
    with pytest.raises(DataError, match=rf"line {KC_FIRST_THREE_BLANK_LINE}: key 'options' should be dict"):
        KnowledgeCrosswords(data_dir=tmp_path).load()


def _medmcqa_copy(data_dir: Path, tmp_path: Path, n_lines: int = 8) -> Path:
    source = (data_dir / "medmcqa/dev.json").read_text(encoding="utf-8").splitlines(keepends=True)
    target = tmp_path / "medmcqa/dev.json"
    target.parent.mkdir(parents=True)
    target.write_text("".join(source[:n_lines]), encoding="utf-8")
    return target


def _set_field(key, value):
    def edit(line):
        rec = json.loads(line)
        rec[key] = value
        return json.dumps(rec) + "\n"
    return edit


def test_medmcqa_copy_loads(data_dir, tmp_path):
    _medmcqa_copy(data_dir, tmp_path)
    assert len(MedMCQA(data_dir=tmp_path).load()) == 8


@pytest.mark.parametrize("value, expected", [
    ("2", r"key 'cop' should be int, got str"),
    (2.0, r"key 'cop' should be int, got float"),
    (True, r"key 'cop' should be int, got bool"),
    (5, r"'cop' must be 1..4 \(1-based in this file\), got 5"),
    (0, r"'cop' must be 1..4 \(1-based in this file\), got 0"),
])
def test_medmcqa_bad_cop_names_file_and_line(data_dir, tmp_path, value, expected):
    path = _medmcqa_copy(data_dir, tmp_path)
    _edit_line(path, 4, _set_field("cop", value))
    with pytest.raises(DataError, match=expected) as err:
        MedMCQA(data_dir=tmp_path).load()
    assert f"{path}: line 4" in str(err.value)


def test_medmcqa_missing_option_names_the_key(data_dir, tmp_path):
    path = _medmcqa_copy(data_dir, tmp_path)

    def drop(line):
        rec = json.loads(line)
        del rec["opc"]
        return json.dumps(rec) + "\n"

    _edit_line(path, 6, drop)
    with pytest.raises(DataError, match=r"line 6: missing key 'opc'"):
        MedMCQA(data_dir=tmp_path).load()


def test_nlgraph_wrong_shape_names_the_item(data_dir, tmp_path):
    raw = json.loads((data_dir / "nlgraph/flow/main.json").read_text(encoding="utf-8"))
    key = list(raw)[2]
    raw[key]["answer"] = 17
    path = tmp_path / "nlgraph/flow/main.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(DataError, match=rf"item {key!r}: key 'answer' should be str"):
        MaximumFlow(data_dir=tmp_path).load()


def test_scibench_non_numeric_answer_names_the_item(data_dir, tmp_path):
    for book in ("atkins", "calculus", "chemmc", "class", "diff", "fund", "matter", "quan", "stat", "thermo"):
        _copy(data_dir, tmp_path, f"scibench/{book}.json")
    path = tmp_path / "scibench/fund.json"
    records = json.loads(path.read_text(encoding="utf-8"))
    records[3]["answer_number"] = "about twelve"
    path.write_text(json.dumps(records), encoding="utf-8")
    with pytest.raises(DataError, match=r"fund.json: item 3: answer_number 'about twelve'"):
        SciBench(data_dir=tmp_path).load()


def test_missing_data_directory_mentions_wow_data_dir(tmp_path, monkeypatch):
    absent = tmp_path / "no-such-data"
    monkeypatch.setenv("WOW_DATA_DIR", str(absent))
    with pytest.raises(FileNotFoundError) as err:
        KnowledgeCrosswords().load()
    message = str(err.value)
    assert "WOW_DATA_DIR" in message
    assert str(absent / "knowledge_crosswords" / "MC_medi.jsonl") in message
    assert "github.com/Wenwen-D/KnowledgeCrosswords" in message
    with pytest.raises(FileNotFoundError, match="WOW_DATA_DIR"):
        MedMCQA(data_dir=absent).load()


# ---------------------------------------------------------------------------- parsers

# The final-answer rules (tasks.base.Parsed): a letter that starts the reply or follows an answer
# phrase; a number after the instruction's own opening, or a reply that is only the number. Anything
# else is unparsed with a reason: never a letter or number picked out of free text.
@pytest.mark.parametrize("text, n_options, expected", [
    ("B", 4, (1, "letter")),
    ("A", 4, (0, "letter")),
    ("D.", 4, (3, "letter")),
    ("E", 4, "out_of_range"),                 # beyond the options
    ("Z", 4, "out_of_range"),
    ("J", 10, (9, "letter")),
    ("K", 10, "out_of_range"),
    ("None", 4, "none"),
    ("none.", 4, "none"),
    ("", 4, "empty"),
    ("   ", 4, "empty"),
    (None, 4, "empty"),
    ("**B**", 4, (1, "letter")),               # markdown bold
    ("*C*", 4, (2, "letter")),
    ("`A`", 4, (0, "letter")),
    ("\uff22", 4, (1, "letter")),               # full-width B
    ("The answer is C.", 4, (2, "phrase")),
    ("The answer is C", 4, (2, "phrase")),
    ("The correct answer is (D).", 4, (3, "phrase")),
    ("Answer: B", 4, (1, "phrase")),
    ("(B)", 4, (1, "letter")),
    ("C. Paris", 4, (2, "letter")),
    ("b", 4, (1, "letter")),                    # a lone lowercase letter
    ("b.", 4, (1, "letter")),
    ("e", 4, "out_of_range"),
    ("a. Paris", 4, "no_answer"),               # a lowercase word, not a letter
    ("the answer", 4, "no_answer"),
    ("the answer is a bit unclear", 4, "no_answer"),   # "a" is a word here, not option A
    ("I am not sure", 4, "no_answer"),
    ("42", 4, "no_answer"),
    ("Answer: A and B", 4, "ambiguous"),        # two answers are none
    ("A or B", 4, "ambiguous"),
    ("A, B", 4, "ambiguous"),
    ("The answer is A. Actually the answer is B.", 4, "ambiguous"),
    ("The answer is B, then C", 4, "ambiguous"),
    ("After comparing A and C, I choose D", 4, "no_answer"),    # free text: no letter picked out
    ("x" * 100_000 + " The answer is B", 4, "no_answer"),       # past the reply's length bound
])
def test_parse_letter(text, n_options, expected):
    parsed = parse_letter(text, n_options)
    if isinstance(expected, tuple):
        assert (parsed.value, parsed.rule, parsed.reason) == (*expected, None)
    else:
        assert (parsed.value, parsed.reason) == (None, expected)


@pytest.mark.parametrize("text, phrase, integer, expected", [
    ("The total weight is 7.", "The total weight is", True, (7, "phrase")),
    ("The total weight is **12**", "The total weight is", True, (12, "phrase")),
    ("the total weight is: 1,234", "The total weight is", True, (1234, "phrase")),
    ("The total weight is 5 (not 6)", "The total weight is", True, (5, "phrase")),
    ("The total weight is 7, via 0,3,7", "The total weight is", True, (7, "phrase")),
    ("7", "The total weight is", True, (7, "bare")),
    ("7.", "The total weight is", True, (7, "bare")),
    ("\uff13\uff12", "The total weight is", True, (32, "bare")),          # full-width digits
    # the failure this rule exists for: a node id is not an answer
    ("There is no shortest path from node 7 to node 3", "The total weight is", True, "no_answer"),
    ("The shortest path is 0 -> 2 -> 3 with weight 5.", "The total weight is", True, "no_answer"),
    ("The total weight is 7 + 3 = 10", "The total weight is", True, "ambiguous"),
    ("The total weight is 7. The total weight is 8.", "The total weight is", True, "ambiguous"),
    ("The total weight is 7. So the total weight is 7.", "The total weight is", True, (7, "phrase")),
    ("The total weight is 7.5", "The total weight is", True, "not_integer"),
    ("The total weight is unknown", "The total weight is", True, "no_answer"),
    ("None", "The total weight is", True, "none"),
    ("", "The total weight is", True, "empty"),
    ("The maximum flow is 12.", "The maximum flow is", True, (12, "phrase")),
    ("The total weight is 12.", "The maximum flow is", True, "no_answer"),     # another task's phrase
    # SciBench: a float, with a sign, powers of ten and fractions read, not cut
    ("The final answer is 2.5e3", "The final answer is", False, (2500.0, "phrase")),
    ("The final answer is 1.5E-2", "The final answer is", False, (0.015, "phrase")),
    ("The final answer is 6.02 x 10^23", "The final answer is", False, (6.02e23, "phrase")),
    ("The final answer is $2.5 \\times 10^{3}$", "The final answer is", False, (2500.0, "phrase")),
    ("The final answer is 1/2", "The final answer is", False, (0.5, "phrase")),
    ("The final answer is \u22123.5", "The final answer is", False, (-3.5, "phrase")),  # unicode minus
    ("The final answer is -.5", "The final answer is", False, (-0.5, "phrase")),
    ("-3", "The final answer is", False, (-3.0, "bare")),
    ("+4", "The final answer is", False, (4.0, "bare")),
    ("12,345,678", "The final answer is", False, (12345678.0, "bare")),
    ("The final answer is 1/0", "The final answer is", False, "ambiguous"),
    ("The final answer is 1e999", "The final answer is", False, "ambiguous"),    # not a finite number
    ("from 3 to 9 the flow is 12", "The final answer is", False, "no_answer"),
])
def test_parse_number(text, phrase, integer, expected):
    parsed = parse_number(text, phrase, integer)
    if isinstance(expected, tuple):
        assert (parsed.value, parsed.rule, parsed.reason) == (*expected, None)
        assert isinstance(parsed.value, int) == integer
    else:
        assert (parsed.value, parsed.reason) == (None, expected)


def test_numeric_tasks_read_their_own_opening(data_dir):
    for name, phrase in (("nlgraph_shortest_path", "The total weight is"), ("nlgraph_flow", "The maximum flow is"),
                         ("nlgraph_matching", "The maximum number of matches is")):
        task = get_task(name, data_dir=data_dir)
        q = task.load()[0]
        assert phrase in task.extraction_instruction()       # the official instruction asks for it
        assert task.parse(f"{phrase} 1,204.", q).value == 1204
        assert task.parse("None", q).value is None
        assert task.constraint(q) == "number"
    assert get_task("scibench", data_dir=data_dir).constraint(None) == "number:signed,decimal"
    kc = get_task("kc", data_dir=data_dir)
    assert kc.constraint(kc.load()[0]) == "letters:ABCD"
    assert get_task("nlgraph_flow", data_dir=data_dir).to_answer(7.0, None) == 7.0


# ---------------------------------------------------------------------------- option orders and prompts

MC_TASKS = ["kc", "medmcqa", "mmlu_pro", "hellaswag"]


@pytest.fixture(scope="module")
def mc_samples(data_dir, request):
    """A few multiple-choice questions per task (loaded items: the prompt needs no proxies); chess
    only where Stockfish is installed (its options come from the engine)."""
    samples = {name: (get_task(name, data_dir=data_dir), get_task(name, data_dir=data_dir).load()[:12])
               for name in MC_TASKS}
    try:
        samples["chess"] = (get_task("chess", data_dir=data_dir, depth=CHESS_DEPTH),
                            request.getfixturevalue("chess_questions"))
    except pytest.skip.Exception:
        pass
    return samples


def _shown_options(task, q, prompt: str) -> list[str]:
    """The option text after each letter in the prompt's options block, in shown order."""
    start = prompt.rfind(task.options_header)
    assert start >= 0, "no options header in the prompt"
    rest = prompt[start + len(task.options_header):]
    shown = []
    for k in range(len(q.options)):
        marker = f"{LETTERS[k]}. "
        assert rest.startswith(marker), (marker, rest[:80])
        rest = rest[len(marker):]
        # the longest option text that follows (options may be prefixes of each other)
        candidates = [o for o in q.options
                      if rest.startswith((o, f'"{o}"'))]
        assert candidates, rest[:80]
        text = max(candidates, key=len)
        rest = rest[len(text) + (2 if rest.startswith(f'"{text}"') else 0):].lstrip("; \n")
        shown.append(text)
    assert rest.strip() == ""
    return shown


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_to_answer_and_prompt_letters_agree_for_any_order(mc_samples, data):
    name = data.draw(st.sampled_from(sorted(mc_samples)))
    task, questions = mc_samples[name]
    q = data.draw(st.sampled_from(questions))
    order = data.draw(st.permutations(range(len(q.options))))
    shown_index = data.draw(st.integers(0, len(q.options) - 1))
    prompt = task.prompt(q, list(order))
    shown = _shown_options(task, q, prompt)
    original = task.to_answer(shown_index, list(order))
    assert original == order[shown_index]
    assert shown[shown_index] == q.options[original]
    # the model replying with the letter shown there gets back the same original option
    letter = LETTERS[shown_index]
    assert task.to_answer(task.parse(letter, q).value, list(order)) == original
    assert task.to_answer(task.parse(f"**{letter}**", q).value, list(order)) == original
    # a constrained answer (the prefilled opening, then one of the question's letters) too
    assert task.constraint(q) == "letters:" + LETTERS[:len(q.options)]
    assert task.to_answer(task.parse(f"{task.answer_phrase} {letter}", q).value, list(order)) == original


def test_prompt_has_cot_instruction_query_and_options(mc_samples):
    from wowlib import paths
    task, questions = mc_samples["medmcqa"]
    q = questions[0]
    prompt = task.prompt(q)
    assert prompt.startswith(paths.prompt_text("cot"))
    assert q.query in prompt
    assert _shown_options(task, q, prompt) == list(q.options)          # identity order
    assert task.judge_query(q) == q.query and "A. " not in task.judge_query(q)


@pytest.mark.parametrize("name", MC_TASKS + ["chess"])
def test_option_order_is_a_deterministic_permutation_varying_by_sample(mc_samples, name):
    if name == "chess" and "chess" not in mc_samples:
        require_stockfish()
    task, questions = mc_samples[name]
    q = max(questions, key=lambda q: len(q.options))
    n = len(q.options)
    orders = [task.option_order(q, i, seed=0) for i in range(12)]
    for order in orders:
        assert sorted(order) == list(range(n))
    assert [task.option_order(q, i, seed=0) for i in range(12)] == orders       # same call, same order
    assert len({tuple(o) for o in orders}) >= 3                                  # varies across samples
    assert [task.option_order(q, i, seed=1) for i in range(12)] != orders       # depends on the seed
    other = next(o for o in questions if o.qid != q.qid and len(o.options) == n)
    assert [task.option_order(other, i, seed=0) for i in range(12)] != orders   # and on the question


def test_option_order_is_stable_across_fresh_instances(data_dir):
    a = KnowledgeCrosswords(data_dir=data_dir)
    b = KnowledgeCrosswords(data_dir=data_dir)
    qa, qb = a.load()[10], b.load()[10]
    assert [a.option_order(qa, i, 42) for i in range(10)] == [b.option_order(qb, i, 42) for i in range(10)]
    # independent of how many samples are drawn: sample 5 alone equals sample 5 in a batch
    assert a.option_order(qa, 5, 42) == [a.option_order(qa, i, 42) for i in range(10)][5]


def test_option_order_is_none_for_numeric_and_open_tasks(data_dir):
    for name in ("scibench", "nlgraph_matching", "biogeneration"):
        task = get_task(name, data_dir=data_dir)
        q = task.load()[0]
        assert not q.is_mc and task.option_order(q, 0, 0) is None
        assert task.prompt(q).endswith(q.query)


def test_extraction_instruction_per_task(data_dir):
    assert "option letter" in get_task("kc", data_dir=data_dir).extraction_instruction()
    assert "The final answer is" in get_task("scibench", data_dir=data_dir).extraction_instruction()
    with pytest.raises(ValueError, match="open-ended"):
        get_task("biogeneration", data_dir=data_dir).extraction_instruction()
