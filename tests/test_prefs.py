"""Preference datasets (wowlib.prefs): which pairs each type keeps, in which direction, and the
counts, caps, mixes and files around them.

Samples and judgments are small hand-made records for real tasks (question ids from the real
D_train splits, since prompts are looked up there); every expected count is worked out by hand
next to its case.
"""
from __future__ import annotations

import csv
import itertools
from collections import Counter

import pytest

from wowlib import elicit, paths, prefs, store
from wowlib.prefs import PrefSpec
from wowlib.tasks import get_task

KC = "kc"
NL = "nlgraph_shortest_path"
MED = "medmcqa"                     # binary task (graded = False)
GEN = "gen"
T3 = 1 / 3


# ---------------------------------------------------------------------------- builders

@pytest.fixture(scope="module")
def qids(data_dir) -> dict[str, list[str]]:
    """The first question ids of each task's D_train."""
    return {t: [q.qid for q in get_task(t).splits()["train"][:4]] for t in (KC, NL, MED)}


def rec(task, qid, idx, proxy, correct=False, status="ok", gen=GEN, response=None, split="train"):
    """One Phase 1 sample record (a unique response text unless given)."""
    return {"task": task, "split": split, "question_id": qid, "sample_idx": idx, "option_order": None,
            "prompt": "p", "response": f"{gen} {task} {qid} answer {idx}" if response is None else response,
            "n_tokens": 10 + idx, "mean_logprob": -1.0, "extraction": "x",
            "answer": None if status != "ok" else idx, "proxy": proxy, "correct": correct,
            "status": status, "generator": gen}


def wrongs(task, qid, proxies, gen=GEN, start=0):
    """Wrong, parsed answers with the given proxies (sample_idx start, start + 1, ...)."""
    return [rec(task, qid, start + k, p, gen=gen) for k, p in enumerate(proxies)]


def pw(task, qid, i, j, verdict, swapped, status="ok", swapped_status="ok", gen=GEN, judge="tiny"):
    """One pairwise judgment record (verdict 1 = sample i; swapped_verdict in swapped positions)."""
    return {"task": task, "question_id": qid, "generator": gen, "judge": judge, "mode": "text", "i": i, "j": j,
            "proxy_i": None, "proxy_j": None, "verdict": verdict, "status": status,
            "swapped_verdict": swapped, "swapped_status": swapped_status}


def sc(task, qid, samples, scores, status="ok", gen=GEN, judge="tiny"):
    """One score-judge batch record."""
    return {"task": task, "question_id": qid, "generator": gen, "judge": judge, "mode": "text",
            "samples": list(samples), "scores": scores, "status": status}


def build(spec, records, judgments=None, gen=GEN, task=None):
    """prefs.build over one (generator, task) group; ``judgments`` is a {kind: records} map."""
    task = task or spec.tasks[0]
    jd = {(gen, spec.judge, task, kind): rs for kind, rs in (judgments or {}).items()}
    return prefs.build(spec, {(gen, task): records}, jd)


def directions(data):
    """(question_id, chosen sample, rejected sample) of every pair."""
    return [(p["question_id"], p["chosen_sample"], p["rejected_sample"]) for p in data]


def per_question(data):
    return Counter(p["question_id"] for p in data)


def many_wrongs(task, qid, n, gen=GEN):
    """``n`` wrong answers with distinct proxies: n (n - 1) / 2 WoW pairs."""
    return wrongs(task, qid, [k / (n + 1) for k in range(n)], gen=gen)


def assert_consistent(stats, data):
    assert stats.kept == len(data)
    assert stats.candidates - stats.degenerate - stats.capped == stats.kept
    assert sum(stats.by_task.values()) == stats.kept


# ---------------------------------------------------------------------------- oracle

def kc_question(qid):
    """kc: wrong proxies 0, 1/3, 1/3, 2/3 (samples 0-3) -> 6 pairs, one with equal proxies -> 5
    WoW pairs; plus a correct (4), an unparsed (5) and an errored (6) sample that never pair."""
    return wrongs(KC, qid, [0.0, T3, T3, 2 * T3]) + [
        rec(KC, qid, 4, 1.0, correct=True),
        rec(KC, qid, 5, None, status="unparsed"),
        rec(KC, qid, 6, None, status="error", response=""),   # as sample.grade writes it: correct False
    ]


def test_oracle_pairs_per_question_and_direction(qids):
    q0, q1, q2 = qids[KC][:3]
    records = kc_question(q0) + wrongs(KC, q1, [T3, T3]) + kc_question(q2)   # q1: equal proxies, no pair
    data, stats = build(PrefSpec("oracle"), records)
    assert per_question(data) == {q0: 5, q2: 5}
    assert all(p["chosen_proxy"] > p["rejected_proxy"] for p in data)
    assert {(p["chosen_sample"], p["rejected_sample"]) for p in data if p["question_id"] == q0} == \
        {(1, 0), (2, 0), (3, 0), (3, 1), (3, 2)}
    used = {s for p in data for s in (p["chosen_sample"], p["rejected_sample"])}
    assert used.isdisjoint({4, 5, 6})                   # correct, unparsed, errored
    assert {p["method"] for p in data} == {"oracle"} and {p["source"] for p in data} == {GEN}
    assert stats.candidates == stats.kept == 10 and stats.by_task == {KC: 10}
    assert_consistent(stats, data)


def test_oracle_pair_columns_and_prompt(qids):
    qid = qids[KC][0]
    data, _ = build(PrefSpec("oracle"), kc_question(qid))
    question = {q.qid: q for q in get_task(KC).splits()["train"]}[qid]
    pair = data[0]
    # multiple choice: the CoT instruction + the query, without the (per-sample shuffled) options
    assert pair["prompt"] == paths.prompt_text("cot") + question.query
    assert set(pair) >= {"prompt", "chosen", "rejected", "task", "question_id", "source", "method",
                         "chosen_proxy", "rejected_proxy"}
    assert pair["chosen"] == f"{GEN} {KC} {qid} answer {pair['chosen_sample']}"
    assert pair["rejected"] == f"{GEN} {KC} {qid} answer {pair['rejected_sample']}"


def test_oracle_numeric_task_prompt_is_the_sampling_prompt(qids):
    qid = qids[NL][0]
    data, _ = build(PrefSpec("oracle", tasks=(NL,)), wrongs(NL, qid, [0.2, 0.7]))
    task = get_task(NL)
    question = {q.qid: q for q in task.splits()["train"]}[qid]
    assert directions(data) == [(qid, 1, 0)]
    assert data[0]["prompt"] == task.prompt(question)


# ---------------------------------------------------------------------------- direct

def direct_case(qid):
    """kc, wrong proxies 0, 1/3, 2/3, 0 -> WoW pairs (0,1) (0,2) (1,2) (1,3) (2,3); the judge:
    (0,1) prefers 0, swap-consistent        (against the proxy: the judge's order wins)
    (0,2) prefers 2, not consistent          (swapped verdict 2 = sample 0)
    (1,2) prefers 2, swap-consistent
    (1,3) a tie: no verdict
    (2,3) prefers 2, the swapped call failed."""
    samples = wrongs(KC, qid, [0.0, T3, 2 * T3, 0.0])
    judgments = [pw(KC, qid, 0, 1, 1, 2), pw(KC, qid, 0, 2, 2, 2), pw(KC, qid, 1, 2, 2, 1),
                 pw(KC, qid, 1, 3, None, 1, status="tie"),
                 pw(KC, qid, 2, 3, 1, None, swapped_status="error")]
    return samples, judgments


def test_direct_filtered_keeps_swap_consistent_verdicts(qids):
    qid = qids[KC][0]
    samples, judgments = direct_case(qid)
    data, stats = build(PrefSpec("direct", judge="tiny"), samples, {"pairwise": judgments})
    assert sorted(directions(data)) == [(qid, 0, 1), (qid, 2, 1)]
    assert {p["method"] for p in data} == {"direct"}
    assert all(elicit.is_swap_consistent(j) for j in judgments
               if (j["i"], j["j"]) in {(0, 1), (1, 2)})
    assert_consistent(stats, data)


def test_direct_unfiltered_keeps_every_ok_verdict(qids):
    qid = qids[KC][0]
    samples, judgments = direct_case(qid)
    data, _ = build(PrefSpec("direct", judge="tiny", filtered=False), samples, {"pairwise": judgments})
    assert sorted(directions(data)) == [(qid, 0, 1), (qid, 2, 0), (qid, 2, 1), (qid, 2, 3)]


def test_direct_without_judgments_names_the_judge(qids):
    samples, _ = direct_case(qids[KC][0])
    with pytest.raises(FileNotFoundError, match="nobody"):
        build(PrefSpec("direct", judge="nobody"), samples, {})
    with pytest.raises(FileNotFoundError, match="nobody"):       # a judgment of the other kind is no help
        build(PrefSpec("direct", judge="nobody"), samples, {"score": []})


# ---------------------------------------------------------------------------- score

def score_case(qid):
    """nlgraph, five wrong answers with distinct proxies scored 0, 1, 2, 3, 5 -> 10 pairs with
    gaps (0,1) 1 (0,2) 2 (0,3) 3 (0,4) 5 (1,2) 1 (1,3) 2 (1,4) 4 (2,3) 1 (2,4) 3 (3,4) 2."""
    samples = wrongs(NL, qid, [0.1, 0.2, 0.3, 0.4, 0.5])
    return samples, [sc(NL, qid, [0, 1, 2, 3, 4], [0, 1, 2, 3, 5])]


SCORES = {0: 0, 1: 1, 2: 2, 3: 3, 4: 5}


@pytest.mark.parametrize("top_p, gaps", [(1.0, [5, 4, 3, 3, 2, 2, 2, 1, 1, 1]), (0.5, [5, 4, 3, 3, 2]),
                                         (0.1, [5])])
def test_score_top_p_keeps_the_largest_gaps(qids, top_p, gaps):
    samples, judgments = score_case(qids[NL][0])
    data, _ = build(PrefSpec("score", tasks=(NL,), judge="tiny", top_p=top_p), samples, {"score": judgments})
    assert len(data) == round(10 * top_p)
    kept = sorted((SCORES[p["chosen_sample"]] - SCORES[p["rejected_sample"]] for p in data), reverse=True)
    assert kept == gaps                                  # also: chosen has the higher score
    assert {p["method"] for p in data} == {"score"}


def test_score_top_p_over_several_questions(qids):
    """20 pairs of one (generator, task), top 10% = 2: the gap-5 pair of each question."""
    q0, q1 = qids[NL][:2]
    s0, j0 = score_case(q0)
    s1, j1 = score_case(q1)
    data, stats = build(PrefSpec("score", tasks=(NL,), judge="tiny", top_p=0.1), s0 + s1, {"score": j0 + j1})
    assert per_question(data) == {q0: 1, q1: 1}
    assert_consistent(stats, data)


def test_score_drops_equal_scores_correct_and_unparsed(qids):
    """kc q0: scores 2, 2, 4 on wrong proxies 0, 1/3, 2/3 -> (0,1) tied, (0,2) and (1,2) kept;
    the correct sample 3 is scored but never paired; q1's batch did not parse."""
    q0, q1 = qids[KC][:2]
    samples = wrongs(KC, q0, [0.0, T3, 2 * T3]) + [rec(KC, q0, 3, 1.0, correct=True)] + wrongs(KC, q1, [0.0, T3])
    judgments = [sc(KC, q0, [0, 1, 2, 3], [2, 2, 4, 5]), sc(KC, q1, [0, 1], None, status="missing")]
    data, _ = build(PrefSpec("score", judge="tiny", top_p=1.0), samples, {"score": judgments})
    assert sorted(directions(data)) == [(q0, 2, 0), (q0, 2, 1)]


def test_score_graded_needs_different_proxies_binary_does_not(qids):
    """Graded kc: equal proxies (or a missing proxy) make no WoW pair; binary medmcqa: every
    differently scored pair of wrong answers counts (all wrong proxies are 0)."""
    qk, qm = qids[KC][0], qids[MED][0]
    kc = wrongs(KC, qk, [T3, T3, 0.0]) + [rec(KC, qk, 3, None)]     # 3: wrong, parsed, no proxy
    data, _ = build(PrefSpec("score", judge="tiny", top_p=1.0), kc,
                    {"score": [sc(KC, qk, [0, 1, 2, 3], [1, 3, 5, 0])]})
    assert sorted(directions(data)) == [(qk, 2, 0), (qk, 2, 1)]
    med = wrongs(MED, qm, [0.0, 0.0, 0.0])
    data, _ = build(PrefSpec("score", tasks=(MED,), judge="tiny", top_p=1.0), med,
                    {"score": [sc(MED, qm, [0, 1, 2], [1, 3, 5])]})
    assert sorted(directions(data)) == [(qm, 1, 0), (qm, 2, 0), (qm, 2, 1)]


def test_oracle_of_a_binary_task_is_empty(qids):
    qm = qids[MED][0]
    data, stats = build(PrefSpec("oracle", tasks=(MED,)), wrongs(MED, qm, [0.0, 0.0, 0.0]))
    assert data == [] and stats.candidates == 0


# ---------------------------------------------------------------------------- row and mixes

def row_question(qid):
    """Correct 0, 1; wrong 2 (parsed), 3 (unparsed, still wrong); 4 errored -> 2 x 2 = 4 row pairs."""
    return [rec(KC, qid, 0, 1.0, correct=True), rec(KC, qid, 1, 1.0, correct=True), rec(KC, qid, 2, T3),
            rec(KC, qid, 3, None, status="unparsed"), rec(KC, qid, 4, None, status="error")]


def test_row_every_correct_wrong_pair(qids):
    q0, q1 = qids[KC][:2]
    records = row_question(q0) + wrongs(KC, q1, [0.0, T3])        # q1: no correct answer, no row pair
    data, _ = build(PrefSpec("row"), records)
    assert sorted(directions(data)) == [(q0, 0, 2), (q0, 0, 3), (q0, 1, 2), (q0, 1, 3)]
    assert {p["method"] for p in data} == {"row"}


def mixed_kc(qids):
    """Row pool 4 + 4 (questions 0, 1) + 5 + 5 (questions 2, 3: correct 4 over wrong 0-3 and the
    unparsed 5) = 18; oracle pool 5 + 5 = 10 (questions 0, 1 have a single WoW candidate)."""
    q = qids[KC]
    return row_question(q[0]) + row_question(q[1]) + kc_question(q[2]) + kc_question(q[3])


def test_mix_row_oracle_is_half_and_half(qids):
    data, stats = build(PrefSpec("row+oracle"), mixed_kc(qids))
    assert Counter(p["method"] for p in data) == {"row": 10, "oracle": 10}   # k = min(18, 10)
    assert stats.candidates == 28 and stats.capped == 8
    assert_consistent(stats, data)
    data, stats = build(PrefSpec("row+oracle", cap=7), mixed_kc(qids))
    assert Counter(p["method"] for p in data) == {"row": 3, "oracle": 3}     # k = cap // 2
    assert_consistent(stats, data)


def test_mix_row_direct_and_row_score(qids):
    q = qids[KC]
    samples, judgments = direct_case(q[0])
    samples += row_question(q[1])[:2] + [rec(KC, q[1], k, 0.0) for k in (2, 3, 4)]   # 2 x 3 = 6 row pairs
    data, _ = build(PrefSpec("row+direct", judge="tiny"), samples, {"pairwise": judgments})
    assert Counter(p["method"] for p in data) == {"row": 2, "direct": 2}
    data, _ = build(PrefSpec("row+score", judge="tiny", top_p=1.0), samples,
                    {"score": [sc(KC, q[0], [0, 1, 2, 3], [0, 1, 2, 3])]})    # 5 WoW pairs, all gaps > 0
    assert Counter(p["method"] for p in data) == {"row": 5, "score": 5}


def test_mix_with_an_empty_side_is_empty(qids):
    data, stats = build(PrefSpec("row+oracle"), wrongs(KC, qids[KC][0], [0.0, T3, 2 * T3]))   # no correct
    assert data == [] and stats.candidates == 3 and stats.capped == 3
    assert_consistent(stats, data)
    data, stats = prefs.build(PrefSpec("row+oracle", source="mix"), {})                 # no answers at all
    assert data == [] and (stats.candidates, stats.kept) == (0, 0)


# ---------------------------------------------------------------------------- controls

def test_random_flips_about_half_of_the_oracle_pairs(qids):
    q0, q1 = qids[NL][:2]
    records = many_wrongs(NL, q0, 12) + many_wrongs(NL, q1, 12)             # 2 x 66 pairs
    oracle, _ = build(PrefSpec("oracle", tasks=(NL,)), records)
    rand, _ = build(PrefSpec("random", tasks=(NL,)), records)
    assert len(rand) == len(oracle) == 132
    assert [(p["question_id"], {p["chosen_sample"], p["rejected_sample"]}) for p in rand] == \
        [(p["question_id"], {p["chosen_sample"], p["rejected_sample"]}) for p in oracle]
    flipped = sum(p["chosen_proxy"] < p["rejected_proxy"] for p in rand)
    assert 40 <= flipped <= 92
    assert {p["method"] for p in rand} == {"random"}
    for p in rand:                                     # texts and provenance flipped together
        assert p["chosen"].endswith(f"answer {p['chosen_sample']}")
    assert build(PrefSpec("random", tasks=(NL,)), records)[0] == rand                      # seeded
    assert build(PrefSpec("random", tasks=(NL,), seed=7), records)[0] != rand


def test_random_coins_differ_between_generators(qids):
    qid = qids[NL][0]
    samples = {(g, NL): many_wrongs(NL, qid, 12, gen=g) for g in ("a", "b")}
    data, _ = prefs.build(PrefSpec("random", source="mix", tasks=(NL,)), samples)
    flips = {g: [p["chosen_proxy"] < p["rejected_proxy"] for p in data if p["source"] == g] for g in "ab"}
    assert len(flips["a"]) == len(flips["b"]) == 66
    assert flips["a"] != flips["b"]


def test_sft_wrong_is_the_oracle_pairs_relabelled(qids):
    records = kc_question(qids[KC][0])
    oracle, _ = build(PrefSpec("oracle"), records)
    sft, _ = build(PrefSpec("sft_wrong"), records)
    assert [{**p, "method": "oracle"} for p in sft] == oracle
    assert {p["method"] for p in sft} == {"sft_wrong"}


# ---------------------------------------------------------------------------- hygiene

def test_degenerate_pairs_are_removed_and_counted(qids):
    """Wrong proxies 0, 1/3, 2/3, 1/2 -> 6 WoW pairs. Samples 0 and 1 say the same thing (up to
    whitespace), sample 2 is blank -> (0,1) (0,2) (1,2) (2,3) are degenerate; (0,3) (1,3) stay."""
    qid = qids[KC][0]
    records = [rec(KC, qid, 0, 0.0, response="same text"), rec(KC, qid, 1, T3, response=" same text\n"),
               rec(KC, qid, 2, 2 * T3, response="  "), rec(KC, qid, 3, 0.5)]
    data, stats = build(PrefSpec("oracle"), records)
    assert stats.candidates == 6 and stats.degenerate == 4
    assert sorted(directions(data)) == [(qid, 3, 0), (qid, 3, 1)]
    assert_consistent(stats, data)


def test_cap_is_a_seeded_ordered_subset(qids):
    records = many_wrongs(NL, qids[NL][0], 12)                              # 66 pairs
    full, _ = build(PrefSpec("oracle", tasks=(NL,)), records)
    data, stats = build(PrefSpec("oracle", tasks=(NL,), cap=10), records)
    assert (stats.candidates, stats.capped, stats.kept) == (66, 56, 10)
    assert_consistent(stats, data)
    positions = [full.index(p) for p in data]
    assert positions == sorted(positions)                                   # original order
    assert build(PrefSpec("oracle", tasks=(NL,), cap=10), records)[0] == data
    assert build(PrefSpec("oracle", tasks=(NL,), cap=10, seed=1), records)[0] != data
    data, stats = build(PrefSpec("oracle", tasks=(NL,), cap=100), records)
    assert data == full and stats.capped == 0


@pytest.mark.parametrize("split", ["val", "test"])
def test_only_d_train(qids, split):
    records = kc_question(qids[KC][0]) + [rec(KC, get_task(KC).splits()[split][0].qid, 0, 0.0, split=split)]
    with pytest.raises(ValueError, match=f"(?s)D_train.*{GEN}/{KC}.*{split}"):
        build(PrefSpec("oracle"), records)


def test_other_tasks_are_ignored(qids):
    samples = {(GEN, KC): kc_question(qids[KC][0]),
               (GEN, NL): [rec(NL, "not-a-train-qid", 0, 0.1, split="test")]}  # never read
    data, stats = prefs.build(PrefSpec("oracle"), samples)
    assert len(data) == 5 and stats.by_task == {KC: 5}


# ---------------------------------------------------------------------------- specs

@pytest.mark.parametrize("kwargs, match", [
    ({"type": "dpo"}, "preference type"),
    ({"type": "oracle", "source": "other"}, "source"),
    ({"type": "direct"}, "needs a judge"),
    ({"type": "row+score"}, "needs a judge"),
    ({"type": "score", "judge": "tiny", "top_p": 0.0}, "top_p"),
    ({"type": "score", "judge": "tiny", "top_p": 1.5}, "top_p"),
    ({"type": "oracle", "cap": 0}, "cap"),
    ({"type": "oracle", "tasks": ()}, "task"),
])
def test_spec_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PrefSpec(**kwargs)


def test_spec_names_are_unique_across_settings():
    specs = set()
    for t in prefs.TYPES:
        base = t.split("+")[-1]
        for source, tasks in itertools.product(("self", "mix"), ((KC,), (NL,), (KC, NL))):
            if base == "direct":
                specs |= {PrefSpec(t, source, tasks, judge=j, filtered=f)
                          for j in ("tiny", "tiny-logprob", "smollm2-135m") for f in (True, False)}
            elif base == "score":
                specs |= {PrefSpec(t, source, tasks, judge=j, top_p=p)
                          for j in ("tiny", "smollm2-135m") for p in (1.0, 0.5, 0.1)}
            else:
                specs.add(PrefSpec(t, source, tasks))
    names = [s.name for s in specs]
    assert len(names) == len(set(names)) == len(specs)
    assert all("/" not in n and " " not in n and "+" not in n for n in names)
    assert PrefSpec("oracle", tasks=KC) == PrefSpec("oracle", tasks=(KC,))    # a bare task name
    assert PrefSpec("oracle", tasks=[KC]).name == "self-oracle-kc"


@pytest.mark.parametrize("spec, key", [
    (PrefSpec("direct", judge="tiny-logprob", filtered=True), ("pairwise_logprob_consistent", "tiny", 1.0)),
    (PrefSpec("direct", judge="tiny", filtered=False), ("pairwise", "tiny", 1.0)),
    (PrefSpec("row+direct", judge="tiny"), ("pairwise_consistent", "tiny", 1.0)),
    (PrefSpec("score", judge="tiny", top_p=0.1), ("score", "tiny", 0.1)),
    (PrefSpec("score", judge="tiny-logprob", top_p=0.5), ("score_logprob", "tiny", 0.5)),
    # judge names with hyphens of their own
    (PrefSpec("direct", judge="smollm2-135m"), ("pairwise_consistent", "smollm2-135m", 1.0)),
    (PrefSpec("direct", judge="smollm2-135m-logprob", filtered=False), ("pairwise_logprob", "smollm2-135m", 1.0)),
    (PrefSpec("row+score", judge="gpt-3.5-turbo", top_p=1.0), ("score", "gpt-3.5-turbo", 1.0)),
    (PrefSpec("oracle"), None), (PrefSpec("row"), None), (PrefSpec("row+oracle"), None),
    (PrefSpec("random"), None), (PrefSpec("sft_wrong"), None),
])
def test_elicitation_key(spec, key):
    assert prefs.elicitation_key(spec) == key
    if key is not None:
        assert key[0] in elicit.METHOD_ORDER and key[2] in elicit.MARGINS


# ---------------------------------------------------------------------------- the stage

def _write_run(run, qids):
    """Generators a and b answer kc (a: 2 questions, b: 1); a's answers judged pairwise by tiny."""
    q = qids[KC]
    a = [{**r, "generator": "a"} for r in kc_question(q[0]) + row_question(q[1])]
    b = [{**r, "generator": "b", "response": r["response"] + " (b)"} for r in kc_question(q[0])]
    store.write_jsonl(run.samples("a", KC), a)
    store.write_jsonl(run.samples("b", KC), b)
    _, judgments = direct_case(q[0])
    store.write_jsonl(run.judgments("a", "tiny", KC, "pairwise"), [{**j, "generator": "a"} for j in judgments])
    store.write_jsonl(run.judgments("a", "tiny", NL, "score"), [{"not": "read"}])   # another task


def test_build_sets_end_to_end(tmp_path, qids):
    run = store.Run(tmp_path)
    _write_run(run, qids)
    specs = [PrefSpec("oracle"), PrefSpec("oracle", source="mix"), PrefSpec("direct", judge="tiny"),
             PrefSpec("row+oracle"), PrefSpec("sft_wrong")]
    rows = prefs.build_sets(run, specs, "a")
    assert [r["name"] for r in rows] == [s.name for s in specs]
    kept = {r["name"]: r["kept"] for r in rows}
    # a: oracle 5 (q0); row 5 (q0) + 4 (q1) = 9 -> row+oracle 5 + 5; b adds 5 oracle pairs
    assert kept == {"self-oracle-kc": 5, "mix-oracle-kc": 10, "self-direct-tiny-filtered-kc": 2,
                    "self-row_oracle-kc": 10, "self-sft_wrong-kc": 5}
    for spec, row in zip(specs, rows):
        data = prefs.load(run, spec.name)
        assert len(data) == row["kept"]
        stats = store.read_json(run.prefs(spec.name).with_suffix(".stats.json"))
        assert stats["kept"] == row["kept"] and stats["candidates"] == row["candidates"]
        assert PrefSpec(**{**stats["spec"], "tasks": tuple(stats["spec"]["tasks"])}) == spec   # as align reads it
    assert {p["source"] for p in prefs.load(run, "mix-oracle-kc")} == {"a", "b"}
    assert {p["source"] for p in prefs.load(run, "self-oracle-kc")} == {"a"}
    with (run.root / "prefs" / "summary.csv").open() as f:
        summary = list(csv.DictReader(f))
    assert [r["name"] for r in summary] == [s.name for s in specs]
    direct = summary[2]
    assert (direct["elicitation_method"], direct["elicitation_judge"], direct["kept"]) == \
        ("pairwise_consistent", "tiny", "2")
    with pytest.raises(FileNotFoundError, match="no preference dataset"):
        prefs.load(run, "self-nothing-kc")


def test_build_sets_missing_inputs(tmp_path, qids):
    run = store.Run(tmp_path)
    _write_run(run, qids)
    with pytest.raises(FileNotFoundError, match="b's kc answers by judge 'tiny'"):   # b never judged
        prefs.build_sets(run, [PrefSpec("direct", source="mix", judge="tiny")], "a")
    with pytest.raises(FileNotFoundError, match="no samples"):
        prefs.build_sets(run, [PrefSpec("oracle")], "c")


def test_written_sets_load_as_trl_datasets(tmp_path, qids):
    from wowlib.align import to_dataset
    run = store.Run(tmp_path)
    _write_run(run, qids)
    (row,) = prefs.build_sets(run, [PrefSpec("row+oracle")], "a")
    data = prefs.load(run, row["name"])
    ds = to_dataset(data, "dpo")
    assert ds.column_names == ["prompt", "chosen", "rejected"] and len(ds) == row["kept"] == 10
    assert data[0]["chosen"] == [{"role": "assistant", "content": prefs.text(data[0]["chosen"])}]   # as written
    assert ds[0]["chosen"] == data[0]["chosen"]
    sft = to_dataset(data, "sft")
    assert sft.column_names == ["prompt", "completion"]


def test_plan_sets_extra_grammar():
    specs = prefs.plan_sets([KC], ["oracle"], "tiny", ["self direct kc unfiltered", "self direct kc",
                                                        "mix score@other:text kc+nlgraph_shortest_path"])
    oracle, unfiltered, filtered, mixed = specs
    assert oracle == PrefSpec("oracle", tasks=(KC,))
    assert (unfiltered.judge, unfiltered.filtered) == ("tiny-logprob", False)
    assert filtered.filtered and filtered.name != unfiltered.name
    assert prefs.elicitation_key(unfiltered) == ("pairwise_logprob", "tiny", 1.0)
    assert (mixed.source, mixed.judge, mixed.tasks) == ("mix", "other", (KC, NL))
    for bad, match in [("self oracle kc unfiltered", "direct sets only"), ("self direct kc filtered", "expected"),
                       ("kc oracle", "expected"), ("self best kc", "not one of"),
                       ("self direct@tiny:verbal kc", "judge mode")]:
        with pytest.raises(ValueError, match=match):
            prefs.plan_sets([KC], [], "tiny", [bad])
