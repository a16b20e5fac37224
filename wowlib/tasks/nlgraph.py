"""NLGraph (Wang et al., 2023): shortest path, maximum flow, bipartite matching.

The gold answer is parsed from the file's answer text AND recomputed with networkx from the
graph in the question; a disagreement is a DataError naming the item. Proxy (as in the paper's
evaluation code): ``1 - |pred - gold| / (normaliser - gold)``, clipped to [0, 1], where the
normaliser is the farthest plausible answer: the weight of the longest simple path between the
two nodes for shortest path, and ``2 * gold`` for flow and matching. So the gold scores 1 and the
normaliser (or anything beyond it) scores 0.

``generate_problems`` writes new problems in the same text format (the project's own seeded
networkx generator, easy/hard as in NLGraph).
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import networkx as nx

from .base import DataError, Question, Task, field_of, read_json, require_items
from .registry import register

SOURCE = "NLGraph, github.com/Arthur-Heng/NLGraph, NLGraph/<task>/main.json (MIT)"

_SP_EDGE = re.compile(r"an edge between node (\d+) and node (\d+) with weight (\d+)")
_SP_Q = re.compile(r"Q: Give the shortest path from node (\d+) to node (\d+)")
_FLOW_EDGE = re.compile(r"an edge from node (\d+) to node (\d+) with capacity (\d+)")
_FLOW_Q = re.compile(r"Q: What is the maximum flow from node (\d+) to node (\d+)")
_MATCH_HEAD = re.compile(r"There are (\d+) job applicants numbered from 0 to \d+, and (\d+) jobs")
_MATCH_EDGE = re.compile(r"Applicant (\d+) is interested in job (\d+)")


@dataclass(frozen=True)
class Graph:
    """The parsed problem: weighted edges, and the source/target (or bipartite sizes)."""

    edges: tuple[tuple[int, int, int], ...]
    source: int
    target: int


def longest_simple_path(edges: tuple[tuple[int, int, int], ...], source: int, target: int) -> int:
    """Weight of the heaviest simple path from source to target (exhaustive DFS with a bitmask:
    NLGraph graphs have at most ~20 nodes; ~1 s for the worst item of the file)."""
    n = max(max(a, b) for a, b, _ in edges) + 1
    adjacency: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    for a, b, w in edges:
        adjacency[a].append((b, w))
        adjacency[b].append((a, w))
    best = 0

    def dfs(node: int, visited: int, length: int) -> None:
        nonlocal best
        if node == target:
            best = max(best, length)
            return
        for nxt, w in adjacency[node]:
            if not visited >> nxt & 1:
                dfs(nxt, visited | 1 << nxt, length + w)

    dfs(source, 1 << source, 0)
    return best


class NLGraphTask(Task):
    kind = "numeric"
    source = SOURCE
    domain = "graph"
    subdir: ClassVar[str]
    gold_pattern: ClassVar[re.Pattern]
    query_suffix: ClassVar[str]

    def __init__(self, data_dir=None, file: str | None = None) -> None:
        super().__init__(data_dir)
        self.file = file or f"nlgraph/{self.subdir}/main.json"
        self._normalisers: dict[str, float] = {}

    def _load(self) -> list[Question]:
        path = Path(self.file) if Path(self.file).is_absolute() else self.path(self.file)
        if not path.exists():
            raise FileNotFoundError(f"task {self.name}: file not found: {path}")
        raw = read_json(path, "a JSON object of NLGraph items keyed by id")
        if not isinstance(raw, dict):
            raise DataError(f"{path}: expected a JSON object of items keyed by id, got {type(raw).__name__}")
        items = []
        for key, rec in raw.items():
            where = f"{path}: item {key!r}"
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected an object, got {type(rec).__name__}")
            question = field_of(rec, "question", str, where)
            answer = field_of(rec, "answer", str, where)
            if not question.endswith("\nA:"):
                raise DataError(f"{where}: question should end with '\\nA:'")
            match = self.gold_pattern.search(answer)
            if not match:
                raise DataError(f"{where}: no gold answer in {answer!r:.120} (pattern {self.gold_pattern.pattern!r})")
            gold = int(match.group(1))
            graph = self.parse_graph(question, where)
            try:
                recomputed = self.solve(graph)
            except nx.NetworkXException as err:     # a node of the question missing from the graph, ...
                raise DataError(f"{where}: networkx cannot solve the item's graph ({type(err).__name__}: "
                                f"{err!s:.120})") from None
            if recomputed != gold:
                raise DataError(f"{where}: gold answer {gold} in the file, but networkx computes {recomputed}")
            items.append(Question(
                task=self.name, qid=f"{self.name}-{key}",
                query="Question: " + question[:-3] + self.query_suffix, gold=gold,
                meta={"difficulty": rec.get("difficulty"), "graph": graph}))
        return require_items(items, path, "a JSON object of NLGraph items keyed by id, got an empty object")

    # -- per task
    def parse_graph(self, question: str, where: str) -> Graph:
        raise NotImplementedError

    def solve(self, graph: Graph) -> int:
        raise NotImplementedError

    def normaliser(self, q: Question) -> float:
        return 2.0 * q.gold

    integer_answer = True            # path weights, flows and matchings are whole numbers >= 0

    # -- grading
    def is_correct(self, q: Question, answer: float | None) -> bool:
        return answer is not None and answer == q.gold

    def proxy(self, q: Question, answer: float | None) -> float | None:
        if answer is None:
            return None
        if q.qid not in self._normalisers:
            self._normalisers[q.qid] = self.normaliser(q)
        span = self._normalisers[q.qid] - q.gold
        if span <= 0:
            return 1.0 if answer == q.gold else 0.0
        return float(min(1.0, max(0.0, 1.0 - abs(answer - q.gold) / span)))


def _edges(pattern: re.Pattern, question: str, where: str) -> tuple[tuple[int, int, int], ...]:
    declared = question.count("an edge ")
    edges = tuple((int(a), int(b), int(w)) for a, b, w in pattern.findall(question))
    if not edges or len(edges) != declared:
        raise DataError(f"{where}: parsed {len(edges)} of {declared} edges")
    return edges


def _endpoints(pattern: re.Pattern, question: str, where: str) -> tuple[int, int]:
    match = pattern.search(question)
    if not match:
        raise DataError(f"{where}: no question line matching {pattern.pattern!r}")
    return int(match.group(1)), int(match.group(2))


@register
class ShortestPath(NLGraphTask):
    name = "nlgraph_shortest_path"
    description = "NLGraph shortest path (weight); proxy normalised by the longest simple path"
    subdir = "shortest_path"
    extract_prompt = "extract_shortest_path"
    answer_phrase = "The total weight is"
    gold_pattern = re.compile(r"total weight of (\d+)")
    query_suffix = " Please also give the total weight of the shortest path.\n"

    def parse_graph(self, question: str, where: str) -> Graph:
        return Graph(_edges(_SP_EDGE, question, where), *_endpoints(_SP_Q, question, where))

    def solve(self, graph: Graph) -> int:
        g = nx.Graph()
        g.add_weighted_edges_from(graph.edges)
        return int(nx.shortest_path_length(g, graph.source, graph.target, weight="weight"))

    def normaliser(self, q: Question) -> float:
        g: Graph = q.meta["graph"]
        return float(longest_simple_path(g.edges, g.source, g.target))


@register
class MaximumFlow(NLGraphTask):
    name = "nlgraph_flow"
    description = "NLGraph maximum flow; proxy normalised by 2 x gold"
    subdir = "flow"
    extract_prompt = "extract_maximum_flow"
    answer_phrase = "The maximum flow is"
    gold_pattern = re.compile(r"maximum flow.*?is (\d+)")
    query_suffix = "\n"

    def parse_graph(self, question: str, where: str) -> Graph:
        return Graph(_edges(_FLOW_EDGE, question, where), *_endpoints(_FLOW_Q, question, where))

    def solve(self, graph: Graph) -> int:
        g = nx.DiGraph()
        for a, b, c in graph.edges:            # parallel edges add up
            g.add_edge(a, b, capacity=g.get_edge_data(a, b, {"capacity": 0})["capacity"] + c)
        return int(nx.maximum_flow_value(g, graph.source, graph.target))


@register
class Matching(NLGraphTask):
    name = "nlgraph_matching"
    description = "NLGraph bipartite matching; proxy normalised by 2 x gold"
    subdir = "matching"
    extract_prompt = "extract_matching"
    answer_phrase = "The maximum number of matches is"
    gold_pattern = re.compile(r"(\d+) applicants can find")
    query_suffix = " Please also give the maximum number of matching.\n"

    def parse_graph(self, question: str, where: str) -> Graph:
        head = _MATCH_HEAD.search(question)
        pairs = _MATCH_EDGE.findall(question)
        if not head or not pairs:
            raise DataError(f"{where}: expected 'There are N job applicants ... and M jobs' and "
                            "'Applicant i is interested in job j.' lines")
        if len(pairs) != question.count(" is interested in job"):
            raise DataError(f"{where}: parsed {len(pairs)} of {question.count(' is interested in job')} "
                            "'Applicant i is interested in job j' lines")
        n_applicants, n_jobs = int(head.group(1)), int(head.group(2))
        edges = tuple((int(a), int(j), 1) for a, j in pairs)
        if any(a >= n_applicants or j >= n_jobs for a, j, _ in edges):
            raise DataError(f"{where}: an applicant or job number is out of range")
        return Graph(edges, n_applicants, n_jobs)

    def solve(self, graph: Graph) -> int:
        g = nx.Graph()
        applicants = [("a", i) for i in range(graph.source)]
        g.add_nodes_from(applicants)
        g.add_nodes_from(("j", j) for j in range(graph.target))
        g.add_edges_from((("a", a), ("j", j)) for a, j, _ in graph.edges)
        return len(nx.bipartite.hopcroft_karp_matching(g, top_nodes=applicants)) // 2


# ---------------------------------------------------------------------------- generator

DIFFICULTY = {"easy": (5, 10), "hard": (11, 20)}  # number of nodes, as in NLGraph


def _edge_lines(lines: list[str]) -> str:
    return ",\n".join(lines) + "."


def _shortest_path_item(rng: random.Random, n: int) -> dict:
    while True:
        if n <= DIFFICULTY["easy"][1]:
            g = nx.gnp_random_graph(n, rng.uniform(0.3, 0.6), seed=rng.randrange(2**31))
        else:
            # Hard graphs are sparse, as in NLGraph (n..2n edges; its hard items have ~2n): dense
            # 11-20 node graphs make the longest-simple-path normaliser of the proxy intractable.
            g = nx.gnm_random_graph(n, rng.randint(n, 2 * n), seed=rng.randrange(2**31))
        if nx.is_connected(g):
            break
    for a, b in g.edges:
        g[a][b]["weight"] = rng.randint(1, 4)
    s, t = rng.sample(range(n), 2)
    path = nx.shortest_path(g, s, t, weight="weight")
    weight = nx.path_weight(g, path, "weight")
    edges = _edge_lines([f"an edge between node {a} and node {b} with weight {g[a][b]['weight']}"
                         for a, b in g.edges])
    return {"question": f"In an undirected graph, the nodes are numbered from 0 to {n - 1}, and the edges are:\n"
                        f"{edges}\nQ: Give the shortest path from node {s} to node {t}.\nA:",
            "answer": f"The shortest path from node {s} to node {t} is {','.join(map(str, path))} "
                      f"with a total weight of {weight}"}


def _flow_item(rng: random.Random, n: int) -> dict:
    while True:
        g = nx.gnp_random_graph(n, rng.uniform(0.25, 0.5), seed=rng.randrange(2**31), directed=True)
        s, t = rng.sample(range(n), 2)
        if nx.has_path(g, s, t):
            break
    for a, b in g.edges:
        g[a][b]["capacity"] = rng.randint(1, 10)
    flow = int(nx.maximum_flow_value(g, s, t))
    edges = _edge_lines([f"an edge from node {a} to node {b} with capacity {g[a][b]['capacity']}"
                         for a, b in g.edges])
    return {"question": f"In a directed graph, the nodes are numbered from 0 to {n - 1}, and the edges are:\n"
                        f"{edges}\nQ: What is the maximum flow from node {s} to node {t}?\nA:",
            "answer": f"The maximum flow from node {s} to node {t} is {flow}."}


def _matching_item(rng: random.Random, n: int) -> dict:
    n_app, n_jobs = max(2, n // 2 + rng.randint(-1, 1)), max(2, n - n // 2)
    pairs = [(a, j) for a in range(n_app) for j in range(n_jobs) if rng.random() < 0.4] or [(0, 0)]
    g = nx.Graph()
    applicants = [("a", i) for i in range(n_app)]
    g.add_nodes_from(applicants)
    g.add_nodes_from(("j", j) for j in range(n_jobs))
    g.add_edges_from((("a", a), ("j", j)) for a, j in pairs)
    matching = nx.bipartite.hopcroft_karp_matching(g, top_nodes=applicants)
    assigned = "".join(f"applicant {a}: job {matching[('a', a)][1]}\n"
                       for a in range(n_app) if ("a", a) in matching)
    lines = "".join(f"Applicant {a} is interested in job {j}.\n" for a, j in pairs)
    return {"question": f"There are {n_app} job applicants numbered from 0 to {n_app - 1}, and {n_jobs} jobs "
                        f"numbered from 0 to {n_jobs - 1}. Each applicant is interested in some of the jobs. "
                        "Each job can only accept one applicant and a job applicant can be appointed for only "
                        f"one job.\n{lines}Q: Find an assignment of jobs to applicants in such that the maximum "
                        "number of applicants find the job they are interested in.\nA:",
            "answer": f"{assigned}{len(matching) // 2} applicants can find the job they are interested in."}


_GENERATORS = {"nlgraph_shortest_path": _shortest_path_item, "nlgraph_flow": _flow_item,
               "nlgraph_matching": _matching_item}


def generate_problems(task: str, n: int, difficulty: str = "easy", seed: int = 0) -> dict[str, dict]:
    """``n`` new problems for ``task`` in NLGraph's main.json format (seeded, deterministic)."""
    if task not in _GENERATORS:
        raise KeyError(f"no generator for {task!r}; choose from {sorted(_GENERATORS)}")
    if difficulty not in DIFFICULTY:
        raise ValueError(f"difficulty must be one of {sorted(DIFFICULTY)}, got {difficulty!r}")
    rng = random.Random(seed)
    low, high = DIFFICULTY[difficulty]
    items = {}
    for i in range(n):
        item = _GENERATORS[task](rng, rng.randint(low, high))
        items[str(i)] = {**item, "difficulty": difficulty}
    return items


def write_problems(path: Path | str, task: str, n: int, difficulty: str = "easy", seed: int = 0) -> Path:
    """Write generated problems to ``path``; load them with ``get_task(task, file=path)``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(generate_problems(task, n, difficulty, seed), indent=1), encoding="utf-8")
    return path
