"""Chess puzzles (lichess puzzle database) graded by Stockfish.

As in the paper: puzzles rated strictly between 600 and 1000 with more than two moves; the
position is the one after the first (opponent's) move; the options are Stockfish's top-4 moves
(multipv=4, SAN), each graded by its win chance ``1 / (1 + 10^(-cp/400))`` for the side to move
(mate for = 1, mate against = 0). The best option is the correct one.

The engine is found through ``STOCKFISH_PATH``, then PATH, then Debian's ``/usr/games/stockfish``.
Analyses are cached on disk by (position, limit). The limit is a parameter: ``depth`` (default 12,
deterministic with one engine thread) or ``time`` seconds (the paper: 2.0).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from .. import paths
from .base import LETTERS, DataError, MultipleChoiceTask, Question, mc_question, read_csv, require_items
from .registry import register

SOURCE = ("Lichess puzzle database (CC0), database.lichess.org/#puzzles; the CSV columns PuzzleId, FEN, "
          "Moves, Rating are used (file chess/lichess_db_puzzle.csv)")
# The paper's instruction said "UCI format" while listing SAN options; we say SAN (a documented fix).
INSTRUCTION = ("You are a master-level chess player. You will be given a chess position in Forsyth-Edwards "
               "Notation (FEN) format. Your task is to analyze the position and choose the best move in "
               "Standard Algebraic Notation (SAN) format for the current player. Note that the move should "
               "improve the current player's position by considering both immediate benefits and long-term "
               "strategies.")


def find_stockfish() -> str:
    for candidate in (os.environ.get("STOCKFISH_PATH"), shutil.which("stockfish"), "/usr/games/stockfish"):
        if candidate and Path(candidate).exists():
            return candidate
    raise FileNotFoundError("Stockfish not found: set STOCKFISH_PATH, or install it "
                            "(Debian/Ubuntu: apt-get install -y stockfish -> /usr/games/stockfish)")


def win_chance(score) -> float:
    """Win chance of the side to move from a python-chess PovScore (relative)."""
    relative = score.relative
    if relative.is_mate():
        return 1.0 if relative.mate() > 0 else 0.0
    return 1.0 / (1.0 + 10.0 ** (-relative.score() / 400.0))


@register
class ChessPuzzles(MultipleChoiceTask):
    name = "chess"
    description = "Lichess puzzles (rating 600-1000); options = Stockfish top-4, proxy = win chance"
    source = SOURCE
    domain = "chess"
    options_header = "\nOptions: \n"

    def __init__(self, data_dir=None, depth: int | None = 12, time: float | None = None) -> None:
        super().__init__(data_dir)
        if (depth is None) == (time is None):
            raise ValueError("chess: give exactly one of depth= or time= for the engine limit")
        self.depth, self.time = depth, time

    def _load(self) -> list[Question]:
        import chess
        path = self.path("chess/lichess_db_puzzle.csv")
        items, n_rows = [], 0
        for line, row in read_csv(path, ("PuzzleId", "FEN", "Moves", "Rating"), "lichess puzzles, one per row"):
            n_rows += 1
            where = f"{path}: line {line}"
            if not row["PuzzleId"].strip():
                raise DataError(f"{where}: empty PuzzleId")
            try:
                rating = int(row["Rating"])
                board = chess.Board(row["FEN"])
            except ValueError as err:
                raise DataError(f"{where}: bad Rating or FEN ({err}); expected an integer Rating and "
                                "a FEN position") from None
            moves = row["Moves"].split()
            if not (600 < rating < 1000 and len(moves) > 2):
                continue
            if not board.is_valid():             # Stockfish may crash on an impossible position
                raise DataError(f"{where}: FEN {row['FEN']!r} is not a valid position ({board.status()!r})")
            try:
                board.push_uci(moves[0])
                move = chess.Move.from_uci(moves[1])
                if not board.is_legal(move):
                    raise ValueError(f"{moves[1]} is not legal after {moves[0]}")
                solution = board.san(move)
            except ValueError as err:
                raise DataError(f"{where}: illegal puzzle move ({err})") from None
            items.append(Question(task=self.name, qid=row["PuzzleId"],
                                  query=f"Instruction: {INSTRUCTION}\nFEN: {board.fen()}",
                                  meta={"fen": board.fen(), "solution": solution, "rating": rating}))
        return require_items(items, path, f"puzzles rated strictly between 600 and 1000 with more than two "
                                          f"moves (the paper's filter); none among the {n_rows} rows")

    def format_options(self, q: Question, order: list[int]) -> str:
        return "".join(f"{LETTERS[i]}. {q.options[j]} " for i, j in enumerate(order)) + "\n"

    # -- engine analyses
    def _cache_path(self, fen: str) -> Path:
        limit = f"depth={self.depth}" if self.depth is not None else f"time={self.time}"
        key = hashlib.sha256(f"{fen}|{limit}|multipv=4".encode()).hexdigest()[:24]
        return paths.cache_dir() / "chess" / f"{key}.json"

    def analyse(self, fen: str, engine=None) -> list[tuple[str, float]]:
        """[(SAN move, win chance)] of Stockfish's top-4 moves, best first; cached on disk."""
        cache = self._cache_path(fen)
        if cache.exists():
            return [(move, chance) for move, chance in json.loads(cache.read_text())]
        import chess
        import chess.engine
        own = engine is None
        engine = engine or open_engine()
        try:
            limit = (chess.engine.Limit(depth=self.depth) if self.depth is not None
                     else chess.engine.Limit(time=self.time))
            board = chess.Board(fen)
            infos = engine.analyse(board, limit, multipv=4)
            result = [(board.san(info["pv"][0]), round(win_chance(info["score"]), 6)) for info in infos]
        finally:
            if own:
                engine.quit()
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, cache)
        return result

    def materialise(self, items: list[Question]) -> list[Question]:
        """Options and proxies from the engine; one engine process for the whole batch."""
        engine = None
        out = []
        try:
            for q in items:
                if engine is None and not self._cache_path(q.meta["fen"]).exists():
                    engine = open_engine()
                analysis = self.analyse(q.meta["fen"], engine)
                if len(analysis) < 2:
                    raise DataError(f"chess puzzle {q.qid}: fewer than two legal moves to choose from")
                moves = [move for move, _ in analysis]
                proxies = [chance for _, chance in analysis]
                best = proxies.index(max(proxies))
                out.append(mc_question(self.name, q.qid, q.query, moves, proxies, best,
                                       f"chess puzzle {q.qid}", q.meta))
        finally:
            if engine is not None:
                engine.quit()
        return out


def open_engine():
    """A Stockfish process with one thread and a fixed hash, so depth-limited analyses repeat."""
    import chess.engine
    engine = chess.engine.SimpleEngine.popen_uci(find_stockfish())
    engine.configure({"Threads": 1, "Hash": 64})
    return engine
