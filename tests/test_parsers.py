"""Adversarial judge replies, one parametrised test per judge parser, and a guard against
regexes that take super-linear time (a reply is untrusted text).

Every case states the expected parse: (verdict, "ok") / (scores, "ok"), or (None, status) with the
reason it is unparsed. The rules behind each expectation are in the parsers' docstrings
(``wowlib.judge.parse_pairwise``, ``wowlib.judge.parse_scores``).
"""
from __future__ import annotations

import time

import pytest

from wowlib.judge import parse_pairwise, parse_scores

# ---------------------------------------------------------------------------- pairwise

PAIRWISE = [
    # clean verdicts
    ("Output 2 is closer.\nPreferred output: 2.", (2, "ok")),
    ("Preferred output: 1", (1, "ok")),
    ("PREFERRED OUTPUT: 2", (2, "ok")),
    ("**Preferred output: 2**", (2, "ok")),
    ("**Preferred output:** **1**", (1, "ok")),
    ("Preferred output: **1**", (1, "ok")),
    ("**Preferred output**: 2", (2, "ok")),
    ("preferred output: output 1", (1, "ok")),
    ("Preferred output: Output 2", (2, "ok")),
    ("Preferred output: **Output 1**", (1, "ok")),
    ("Preferred output: [2]", (2, "ok")),
    ('Preferred output: "1"', (1, "ok")),
    ("Preferred output: 2!", (2, "ok")),
    ("Preferred output:\n\n2", (2, "ok")),                                   # on the next line
    ("Preferred\noutput: 2", (2, "ok")),
    ("Reasoning.\r\nPreferred output: 1\r\n", (1, "ok")),
    ("Preferred output: 2. (Output 2 gets more blanks right.)\nDone.", (2, "ok")),   # explanation after a break
    ("Preferred output: 1 (output 2 misses a blank)", (1, "ok")),
    ("Preferred output: 2\nOutput 1 misses two blanks.", (2, "ok")),
    ("Preferred output: \uff12", (2, "ok")),                                 # full-width digit (NFKC)
    ("Preferred output\uff1a 1", (1, "ok")),                                 # full-width colon
    ("Preferred output:" + " " * 50_000 + "2", (2, "ok")),                   # the old regex took minutes here
    # the LAST label wins
    ("Preferred output: 1\nOn reflection the second is better.\nPreferred output: 2\nThanks.", (2, "ok")),
    ('The template asks for "Preferred output: 1 or 2." Output 1 misses two blanks.\nPreferred output: 2',
     (2, "ok")),
    ("I would not say 'Preferred output: 1' here.\nPreferred output: 2", (2, "ok")),
    ("Preferred output: 2\nI was asked to end with 'Preferred output: 1 or 2.'", (None, "invalid")),
    ("Preferred output: 2\nPreferred output: 1 or 2.", (None, "invalid")),
    ("Preferred output: 1\nPreferred output: neither", (None, "invalid")),   # not the earlier 1
    # two outputs named: ambiguous
    ("Preferred output: 1 2", (None, "ambiguous")),
    ("Preferred output: 1, 2", (None, "ambiguous")),
    ("Preferred output: 1 & 2", (None, "ambiguous")),
    ("Preferred output: 2, then 1", (None, "ambiguous")),
    ("Preferred output: 1 and 2", (None, "ambiguous")),
    ("Preferred output: 2 or 1", (None, "ambiguous")),
    ("Preferred output: 1/2", (None, "ambiguous")),
    ("Preferred output: 1 (2)", (None, "ambiguous")),
    ("Preferred output: 1. 2.", (None, "ambiguous")),
    ("Preferred output: Output 1 and Output 2", (None, "ambiguous")),
    ("Preferred output: **1** and **2**", (None, "ambiguous")),
    ("Preferred output: 1 1", (None, "ambiguous")),
    ("Preferred output: 1 \u0662", (None, "ambiguous")),                      # a second digit of another script
    ("Preferred output: 2 because output 1 misses a blank", (None, "ambiguous")),   # cited without a break
    # not a verdict: invalid
    ("Preferred output: 1 or 2", (None, "invalid")),                         # the template echoed
    ("Preferred output: **1** or **2**.", (None, "invalid")),
    ("Preferred output: 1.5", (None, "invalid")),
    ("Preferred output: 2.0", (None, "invalid")),
    ("Preferred output: 3", (None, "invalid")),
    ("Preferred output: 0", (None, "invalid")),
    ("Preferred output: 12", (None, "invalid")),
    ("Preferred output: 01", (None, "invalid")),
    ("Preferred output: -1", (None, "invalid")),
    ("Preferred output: Output A", (None, "invalid")),
    ("Preferred output: neither", (None, "invalid")),
    ("Preferred output: two", (None, "invalid")),
    ("Preferred output: \u0662", (None, "invalid")),                          # Arabic-Indic two: no ASCII digit
    ("Preferred output:\n\nAfter careful analysis, the first.", (None, "invalid")),
    # no verdict: missing
    ("Preferred output:", (None, "missing")),                                # cut off
    ("Preferred output:   **  \n", (None, "missing")),
    ("Preferred output:" + " " * 50_000, (None, "missing")),
    ("I prefer the first output.", (None, "missing")),
    ("The preferred output is 2.", (None, "missing")),                       # no label
    ("Preferred output 2", (None, "missing")),
    ("", (None, "missing")),
    (None, (None, "missing")),
]


@pytest.mark.parametrize("text, expected", PAIRWISE, ids=[f"{k}:{str(t)[:40]!r}" for k, (t, _) in enumerate(PAIRWISE)])
def test_parse_pairwise(text, expected):
    assert parse_pairwise(text) == expected


# ---------------------------------------------------------------------------- score

def labelled(order, scores, style="Response {k}: reasoning about it.\nScore: {s}") -> str:
    return "\n\n".join(style.format(k=k, s=s) for k, s in zip(order, scores))


SCORES = [
    # clean batches
    (labelled([1, 2, 3, 4, 5], [0, 5, 3, 2, 1]), ([0, 5, 3, 2, 1], "ok")),
    ("Score: **4**\n**Score:** 0\nscore: 5\nScore:1\nScore: 2", ([4, 0, 5, 1, 2], "ok")),     # unlabelled, in order
    (labelled([1, 2, 3, 4, 5], [3, 3, 3, 3, 3], "**Response {k}:** fine.\n**Score: {s}**"), ([3] * 5, "ok")),
    (labelled([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], "### Response {k}\nIt is wrong.\nScore: {s}"), ([1, 2, 3, 4, 5], "ok")),
    (labelled([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], "Response {k}: Score: {s}"), ([1, 2, 3, 4, 5], "ok")),
    (labelled([1, 2, 3, 4, 5], [5, 4, 3, 2, 1], "Response {k} - Score: {s}"), ([5, 4, 3, 2, 1], "ok")),
    (labelled([3, 1, 2, 5, 4], [3, 1, 2, 5, 4]), ([1, 2, 3, 4, 5], "ok")),               # out of order: by label
    (("Response 1: misses a blank.\nResponse 2: right.\nResponse 3: wrong.\nResponse 4: wrong.\n"
      "Response 5: close.\nScore: 2\nScore: 5\nScore: 0\nScore: 1\nScore: 4"), ([2, 5, 0, 1, 4], "ok")),  # scores last
    (("Response 1: x\nScore: 1\nResponse 2: x\nScore: 2\nThe third is odd.\nScore: 3\nResponse 4: x\nScore: 4\n"
      "Response 5: x\nScore: 5"), ([1, 2, 3, 4, 5], "ok")),                               # one heading missing
    ("Response 3:\nResponse 1 had the right idea, this one not.\nScore: 2\n" + labelled([1, 2, 4, 5], [1, 1, 1, 1]),
     ([1, 1, 2, 1, 1], "ok")),                                                          # prose is no heading
    ("Response 1: Unlike Response 2, it is right.\nScore: 5\n" + labelled([2, 3, 4, 5], [0, 0, 0, 0]),
     ([5, 0, 0, 0, 0], "ok")),
    ("Score: 3.0\nScore: 4\nScore: 4\nScore: 4\nScore: 4", ([3, 4, 4, 4, 4], "ok")),      # 3.0 is the integer 3
    ("Score: 4/5\nScore: 3 / 5\nScore: 2 out of 5\nScore: 0/5\nScore: 5/5", ([4, 3, 2, 0, 5], "ok")),
    ("Score: 4 (solid, but misses 1 blank)\nScore: 4. Response 2 is worse.\nScore: 3\nScore: 3\nScore: 3",
     ([4, 4, 3, 3, 3], "ok")),
    ("Score:\n4\nScore: 4\nScore: 4\nScore: 4\nScore: 4", ([4] * 5, "ok")),
    ("Score: +3\nScore: 3\nScore: 3\nScore: 3\nScore: 3", ([3] * 5, "ok")),
    ("Score: \uff14\nScore\uff1a 4\nScore: 4\nScore: 4\nScore: 4", ([4] * 5, "ok")),         # full-width (NFKC)
    ("Score: <rating>\n" + "Score: 1\n" * 5, ([1] * 5, "ok")),                            # the echo is no score
    ("Line one.\r\nScore: 1\r\nScore: 2\r\nScore: 3\r\nScore: 4\r\nScore: 5\r\n", ([1, 2, 3, 4, 5], "ok")),
    # structure: missing / extra / duplicate / mislabeled
    ("Score: 1\nScore: 2\nScore: 3\nScore: 4", (None, "missing")),
    ("Score: <rating>\n" * 5, (None, "missing")),
    ("Score: N/A\nScore: 2\nScore: 3\nScore: 4\nScore: 5", (None, "missing")),
    ("Score: \u0664\nScore: 2\nScore: 3\nScore: 4\nScore: 5", (None, "missing")),         # Arabic-Indic four
    ("Scores: 1, 2, 3, 4, 5", (None, "missing")),
    ("underscore: 3\n" * 5, (None, "missing")),
    (labelled([1, 2, 4, 5], [1, 2, 4, 5]), (None, "missing")),                            # response 3 skipped
    ("Score: 1\n" * 6, (None, "extra")),
    ("Score: 1\nScore: 2\nScore: 3\nScore: 4\nScore: 5\nTotal score: 15", (None, "extra")),
    (labelled([1, 2, 2, 4, 5], [1, 2, 3, 4, 5]), (None, "duplicate")),                    # 2 twice, 3 never
    (labelled([1, 2, 3, 4, 5, 2], [1, 2, 3, 4, 5, 2]), (None, "duplicate")),              # 2 twice, same value
    (labelled([1, 2, 3, 4, 5], [1, 2, 3, 4, 5]) + "\n\nSummary:\n" + labelled([1, 2, 3, 4, 5], [1, 2, 3, 4, 5],
                                                                               "Response {k}: Score: {s}"),
     (None, "duplicate")),
    (labelled([1, 2, 3, 4, 6], [1, 2, 3, 4, 5]), (None, "mislabeled")),
    (labelled([0, 1, 2, 3, 4], [1, 2, 3, 4, 5]), (None, "mislabeled")),
    ("Score: 1\nScore: 2\nResponse 4: x\nScore: 3\nResponse 3: x\nScore: 4\nScore: 5", (None, "mislabeled")),
    # values: out_of_range / ambiguous
    ("Score: 1\nScore: 2\nScore: 6\nScore: 4\nScore: 5", (None, "out_of_range")),
    ("Score: 1\nScore: 2\nScore: -1\nScore: 4\nScore: 5", (None, "out_of_range")),
    ("Score: 1\nScore: 2.5\nScore: 3\nScore: 4\nScore: 5", (None, "out_of_range")),
    ("Score: 8/10\nScore: 2\nScore: 3\nScore: 4\nScore: 5", (None, "out_of_range")),      # another scale
    ("Score: 10\nScore: 2\nScore: 3\nScore: 4\nScore: 5", (None, "out_of_range")),
    ("Score: 3-4\nScore: 2\nScore: 3\nScore: 4\nScore: 5", (None, "ambiguous")),
    ("Score: 3 or 4\nScore: 2\nScore: 3\nScore: 4\nScore: 5", (None, "ambiguous")),
    ("Score: 1\nScore: 3, 4\nScore: 3\nScore: 4\nScore: 5", (None, "ambiguous")),
    ("Score: 1\nScore: 2\nScore: 3 for Response 2\nScore: 4\nScore: 5", (None, "ambiguous")),
    (labelled([2, 1, 3, 4, 5], [9, 3, 3, 3, "2-3"]), (None, "out_of_range")),             # first in response order
    # nothing
    ("", (None, "missing")),
    (None, (None, "missing")),
    ("All five responses are wrong.", (None, "missing")),
]


@pytest.mark.parametrize("text, expected", SCORES, ids=[f"{k}:{str(t)[:40]!r}" for k, (t, _) in enumerate(SCORES)])
def test_parse_scores(text, expected):
    assert parse_scores(text) == expected


def test_parse_scores_batch_size():
    assert parse_scores("Score: 1\nScore: 2", n=2) == ([1, 2], "ok")
    assert parse_scores(labelled([2, 1], [4, 5]), n=2) == ([5, 4], "ok")
    assert parse_scores(labelled([1, 2, 3], [4, 5, 1]), n=2) == (None, "mislabeled")


# ---------------------------------------------------------------------------- linear time

MB = 1_000_000
ADVERSARIAL = {
    "whitespace_after_verdict_label": "Preferred output:" + " " * MB,
    "whitespace_after_verdict_label_then_text": "Preferred output:" + " " * MB + "x",
    "whitespace_inside_verdict_label": "Preferred" + " " * MB,
    "markup_after_verdict_label": "Preferred output" + " *" * (MB // 2),
    "many_verdict_labels": "Preferred output: 1 " * (MB // 20),
    "many_verdict_labels_no_colon": "Preferred output " * (MB // 17),
    "whitespace_after_score_label": "Score:" + " " * MB,
    "whitespace_before_score_colon": "Score" + " \t*" * (MB // 3),
    "long_score_lines": ("Score:" + " " * 8000 + "x\n") * 125,
    "many_scores": "Score: 1 " * (MB // 9),
    "many_headings": "Response 1:\n" * (MB // 12),
    "long_heading_lines": ("Response" + " " * 1000 + "\n") * 1000,
    "markup_before_heading": "-" * MB + "Response 1",
    "digits_after_score": "Score: " + "1" * MB,
    "headed_ambiguous_scores": "Response 2: Score: 3, 4 " * (MB // 24),
}


@pytest.mark.parametrize("parser", [parse_pairwise, parse_scores], ids=["pairwise", "scores"])
@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_a_megabyte_of_adversarial_reply_parses_in_linear_time(parser, name):
    """The old patterns took 119 s (verdict, 50,000 characters) and 9 s (scores, five 8,000-character
    lines); each reply here is ~1 MB and parses in well under a second: the bound is generous."""
    text = ADVERSARIAL[name]
    assert len(text) >= 125_000
    start = time.perf_counter()
    _, status = parser(text)
    assert time.perf_counter() - start < 2.0
    assert isinstance(status, str)
