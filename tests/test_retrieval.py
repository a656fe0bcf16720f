"""Retrieval evaluation (zoo/retrieval.py) and ``zoo compare --suite retrieval``.

``recall_at_k`` is checked on hand-made similarity matrices; ``retrieval_scores`` once for real
on a random-init tiny CLIP (one init and one embedding function compiled) and otherwise with its
embeddings replaced by functions of the pair's label or index, so the expected recall follows
from the data alone (what counts as a correct candidate: the same digit for labelled pairs, an
identical text otherwise). The whole suite (four tiny trainings) runs in the slow test.
"""
from __future__ import annotations

import json
import math
import types

import numpy as np
import pytest

import objectives
import zoo.compare
import zoo.config
import zoo.data
import zoo.retrieval
import zoo.train
from zoo.data import same_item
from zoo.retrieval import recall_at_k

LIMIT = 64
KEYS = ("a_to_b@1", "a_to_b@5", "b_to_a@1", "b_to_a@5")


# ---------------------------------------------------------------------------------------------
# recall_at_k by hand.
# ---------------------------------------------------------------------------------------------

def test_recall_counts_the_rank_of_the_correct_item():
    # Query 0's best candidate is its own (rank 1), query 1's own is 2nd, query 2's is last.
    similarity = np.array([[0.9, 0.1, 0.0],
                           [0.8, 0.5, 0.1],
                           [0.7, 0.6, 0.2]])
    recall = recall_at_k(similarity, np.eye(3, dtype=bool), ks=(1, 2, 3))
    assert recall == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})
    # Default ks are (1, 5); k beyond the number of candidates is every candidate.
    assert recall_at_k(similarity, np.eye(3, dtype=bool)) == pytest.approx({1: 1 / 3, 5: 1.0})


def test_recall_with_several_correct_candidates():
    similarity = np.array([[0.9, 0.1, 0.0],
                           [0.8, 0.5, 0.1],
                           [0.7, 0.6, 0.2]])
    correct = np.eye(3, dtype=bool)
    correct[2, 0] = True            # query 2: candidate 0 is as right as its own (ranked 1st)
    correct[1, 2] = True            # query 1: candidate 2 (ranked 3rd) changes nothing at k=2
    recall = recall_at_k(similarity, correct, ks=(1, 2))
    assert recall == pytest.approx({1: 2 / 3, 2: 1.0})


def test_recall_with_an_equivalence_matrix_from_labels():
    labels = np.array([0, 1, 0, 2])
    correct = same_item(labels)
    np.testing.assert_array_equal(correct, [[1, 0, 1, 0], [0, 1, 0, 0],
                                            [1, 0, 1, 0], [0, 0, 0, 1]])
    # Every query ranks the items 2, 3, 1, 0. Item 2 (label 0) is right for queries 0 and 2;
    # query 3's item comes 2nd, query 1's 3rd.
    similarity = np.tile([0.1, 0.2, 0.9, 0.3], (4, 1))
    assert recall_at_k(similarity, correct, ks=(1, 2, 3)) == pytest.approx(
        {1: 0.5, 2: 0.75, 3: 1.0})


def test_ties_rank_the_lower_index_first():
    # Documented: among equal similarities the lower candidate index ranks first.
    flat = np.full((3, 3), 0.5)
    assert recall_at_k(flat, np.eye(3, dtype=bool), ks=(1, 2, 3)) == pytest.approx(
        {1: 1 / 3, 2: 2 / 3, 3: 1.0})            # query i's own item ranks i + 1
    tie = np.array([[0.1, 0.5, 0.5]])
    assert recall_at_k(tie, np.array([[False, True, False]]), ks=(1,))[1] == 1.0
    assert recall_at_k(tie, np.array([[False, False, True]]), ks=(1,))[1] == 0.0
    assert recall_at_k(tie, np.array([[False, False, True]]), ks=(2,))[2] == 1.0


def test_no_correct_candidate_scores_zero():
    similarity = np.random.default_rng(0).normal(size=(5, 7))
    assert recall_at_k(similarity, np.zeros((5, 7), bool), ks=(1, 7)) == {1: 0.0, 7: 0.0}


# ---------------------------------------------------------------------------------------------
# retrieval_scores.
# ---------------------------------------------------------------------------------------------

def test_random_init_scores(data_dir):
    config = zoo.retrieval.retrieval_config("clip", "pycode_pairs", tiny=True)
    scores = zoo.retrieval.retrieval_scores(config, None, limit=LIMIT)
    assert set(scores) == {*KEYS, "num_pairs"}
    assert scores["num_pairs"] == LIMIT
    for key in KEYS:
        assert 0.0 <= scores[key] <= 1.0, (key, scores)
        assert scores[key] * LIMIT == pytest.approx(round(scores[key] * LIMIT))  # a count / 64
    assert scores["a_to_b@5"] >= scores["a_to_b@1"]
    assert scores["b_to_a@5"] >= scores["b_to_a@1"]


def test_retrieval_needs_a_two_tower_objective(data_dir):
    config = zoo.config.Config(objective={"name": "mae"})
    with pytest.raises(ValueError, match=r"^objective\.name: retrieval needs a two-tower"):
        zoo.retrieval.retrieval_scores(config, None, limit=LIMIT)


@pytest.fixture
def fake_embeddings(monkeypatch):
    """retrieval_scores with a random init that compiles nothing and embeddings ``embed(pairs)
    -> (za, zb)`` instead of the towers'."""
    def use(embed):
        monkeypatch.setattr(zoo.train, "restore_or_init",
                            lambda experiment, workdir: (types.SimpleNamespace(params=None), 0))
        monkeypatch.setattr(zoo.retrieval, "embeddings",
                            lambda experiment, params, pairs: embed(pairs))
    return use


def one_hot(ids, n):
    return np.eye(n, dtype=np.float32)[np.asarray(ids)]


def pairs_of(dataset):
    return zoo.data.load_pairs(dataset, zoo.retrieval.HELDOUT_SPLIT, seq_len=32, limit=LIMIT)


def scores_of(dataset):
    config = zoo.retrieval.retrieval_config("clip", dataset, tiny=True)
    return zoo.retrieval.retrieval_scores(config, None, limit=LIMIT)


def test_a_caption_of_the_same_digit_counts(data_dir, fake_embeddings):
    """Embeddings that know only the digit: the nearest caption is usually another pair's (the
    first caption of that digit), which is right (captions describe the digit, not one image)."""
    pairs = pairs_of("digits_captions")
    labels = pairs["label"]
    own_pair_first = [int(np.flatnonzero(labels == labels[i])[0]) == i for i in range(LIMIT)]
    assert not all(own_pair_first)   # so an "own pair only" rule would score below 1
    fake_embeddings(lambda p: (one_hot(p["label"], 10), one_hot(p["label"], 10)))
    scores = scores_of("digits_captions")
    assert {k: scores[k] for k in KEYS} == {k: 1.0 for k in KEYS}


def test_a_caption_of_another_digit_does_not_count(data_dir, fake_embeddings):
    fake_embeddings(lambda p: (one_hot(p["label"], 10), one_hot((p["label"] + 1) % 10, 10)))
    scores = scores_of("digits_captions")
    assert scores["a_to_b@1"] == 0.0 and scores["b_to_a@1"] == 0.0


def test_collapsed_embeddings_retrieve_the_first_item(data_dir, fake_embeddings):
    """All embeddings equal: every query's ranking is 0, 1, 2, ... (ties to the lower index), so
    recall@k is the fraction of queries whose answer is equivalent to one of the first k items."""
    fake_embeddings(lambda p: (np.ones((len(p["text"]), 4), np.float32),) * 2)
    # Labelled pairs: equivalent = same digit.
    labels = pairs_of("digits_captions")["label"]
    scores = scores_of("digits_captions")
    for k in (1, 5):
        expected = np.mean([labels[i] in labels[:k] for i in range(LIMIT)])
        assert scores[f"a_to_b@{k}"] == pytest.approx(expected)
        assert scores[f"b_to_a@{k}"] == pytest.approx(expected)
    assert scores["a_to_b@1"] < 1.0
    # Code and docstrings: equivalent = identical token rows.
    pairs = pairs_of("pycode_pairs")
    scores = scores_of("pycode_pairs")
    for k in (1, 5):
        text_hits = np.mean([any(np.array_equal(pairs["text"][i], pairs["text"][j])
                                 for j in range(k)) for i in range(LIMIT)])
        code_hits = np.mean([any(np.array_equal(pairs["code"][i], pairs["code"][j])
                                 for j in range(k)) for i in range(LIMIT)])
        assert scores[f"a_to_b@{k}"] == pytest.approx(text_hits)   # code queries docstrings
        assert scores[f"b_to_a@{k}"] == pytest.approx(code_hits)


def test_own_pairs_first_is_perfect_recall(data_dir, fake_embeddings):
    ids = np.arange(LIMIT)
    fake_embeddings(lambda p: (one_hot(ids, LIMIT), one_hot(ids, LIMIT)))
    scores = scores_of("pycode_pairs")
    assert {k: scores[k] for k in KEYS} == {k: 1.0 for k in KEYS}


# ---------------------------------------------------------------------------------------------
# Results files.
# ---------------------------------------------------------------------------------------------

def results_dict():
    row = lambda dataset, name, loss, r: {
        "dataset": dataset, "objective": name, "steps": 0 if loss is None else 4,
        "final_loss": loss, "train_seconds": 0.0 if loss is None else 12.3,
        "a_to_b@1": r, "a_to_b@5": 2 * r, "b_to_a@1": r / 2, "b_to_a@5": r, "num_pairs": 256}
    return {"suite": "retrieval", "dataset": "pycode_pairs, digits_captions",
            "model": {"size": "test"},
            "rows": [row("pycode_pairs", "random-init", None, 0.125),
                     row("pycode_pairs", "clip", 1.23456, 0.25),
                     row("digits_captions", "siglip", 0.5, 0.5)]}


def test_retrieval_table_rows():
    table = zoo.compare.results_table(results_dict())   # the suite's own table
    lines = table.splitlines()
    assert lines[0].startswith("Suite `retrieval`, towers of size `test`")
    assert ("| pycode_pairs (code->docstring) | random-init | 0 | - | 12.5% | 25.0% | 6.2% | "
            "12.5% | 256 | 0 |") in lines
    assert ("| pycode_pairs (code->docstring) | clip | 4 | 1.2346 | 25.0% | 50.0% | 12.5% | "
            "25.0% | 256 | 12 |") in lines
    assert any(line.startswith("| digits_captions (image->caption) | siglip |")
               for line in lines)
    assert len([line for line in lines if line.startswith("| ") and "---" not in line]) == 4


def test_write_results_writes_the_three_files(tmp_path):
    results = results_dict()
    zoo.compare.write_results(results, str(tmp_path))
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert (tmp_path / "results.md").read_text() == zoo.retrieval.retrieval_table(results)
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# The suite (slow: four tiny trainings).
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_compare_retrieval_suite(data_dir, tmp_path):
    results = zoo.compare.compare("retrieval", str(tmp_path), tiny=True, progress=False)
    assert objectives.suite_names("retrieval") == ("clip", "siglip")
    rows = {(r["dataset"], r["objective"]): r for r in results["rows"]}
    assert set(rows) == {(d, o) for d in ("pycode_pairs", "digits_captions")
                         for o in ("random-init", "clip", "siglip")}
    assert len(results["rows"]) == 6
    for (dataset, name), row in rows.items():
        if name == "random-init":
            assert row["final_loss"] is None and row["steps"] == 0
        else:
            assert math.isfinite(row["final_loss"]) and row["steps"] == 4
            assert (tmp_path / f"{dataset}_{name}" / "checkpoints").is_dir()
        assert row["num_pairs"] == 256
        for key in KEYS:
            assert 0.0 <= row[key] <= 1.0
        assert row["a_to_b@5"] >= row["a_to_b@1"] and row["b_to_a@5"] >= row["b_to_a@1"]
    assert json.loads((tmp_path / "results.json").read_text()) == results
    table = (tmp_path / "results.md").read_text()
    assert table == zoo.retrieval.retrieval_table(results)
    for dataset, (a, b) in zoo.retrieval.TOWERS.items():
        for name in ("random-init", "clip", "siglip"):
            assert f"| {dataset} ({a}->{b}) | {name} |" in table
    assert (tmp_path / "results.png").stat().st_size > 1000
