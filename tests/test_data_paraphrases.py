"""The paraphrase set: same meanings and targets, wordings the training grammar never produces."""

from __future__ import annotations

import numpy as np

from custom.data.expressions import candidate_queries, render
from custom.data.paraphrases import paraphrase, paraphrase_cases


def test_no_paraphrase_is_a_sentence_of_the_training_grammar():
    queries = candidate_queries()[::7]
    for query in queries:
        for targets in ([], [1], [1, 2], [1, 2, 3]):
            if query.select == "all" and len(targets) == 1:
                continue
            training = {render(query, targets, np.random.default_rng(seed))[0] for seed in range(40)}
            said = {paraphrase(query.to_dict(), targets, np.random.default_rng(seed)) for seed in range(40)}
            assert said and not (said & training), (query, said & training)


def test_paraphrased_cases_keep_ids_queries_targets_and_kinds():
    cases = [
        {
            "case_id": "case_000",
            "expressions": [
                {
                    "id": "e0",
                    "text": "the largest cyst",
                    "targets": [2],
                    "kind": "size",
                    "query": {"select": "largest", "kind": "cyst"},
                },
                {
                    "id": "e1",
                    "text": "any bright lesion in segment 7",
                    "targets": [],
                    "kind": "negative",
                    "query": {"select": "only", "density": "hyperdense", "segment": 7},
                },
            ],
        }
    ]
    said = paraphrase_cases(cases, seed=0)
    for before, after in zip(cases[0]["expressions"], said[0]["expressions"]):
        assert {k: v for k, v in after.items() if k != "text"} == {k: v for k, v in before.items() if k != "text"}
        assert after["text"] != before["text"]
    assert paraphrase_cases(cases, seed=0) == said  # reproducible
    assert "7" in said[0]["expressions"][1]["text"] or "VII" in said[0]["expressions"][1]["text"]
