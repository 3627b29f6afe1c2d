from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.metrics import (
    candidate_batch_prf,
    chance_recall_at_1,
    cyclic_distance,
    positives_from_labels,
    precision_at_k,
    recall_at_k,
    topk_accuracy,
)

# 3 queries x 4 gallery items.
SIM = torch.tensor(
    [
        [0.9, 0.1, 0.5, 0.3],  # ranking: 0, 2, 3, 1
        [0.2, 0.8, 0.4, 0.6],  # ranking: 1, 3, 2, 0
        [0.1, 0.2, 0.3, 0.4],  # ranking: 3, 2, 1, 0
    ]
)
POS = torch.tensor(
    [
        [True, False, False, False],  # q0: {0}       -> ranks {1}
        [True, True, False, True],  # q1: {0, 1, 3} -> ranks {4, 1, 2}
        [False, True, False, False],  # q2: {1}       -> ranks {3}
    ]
)


def test_positives_from_labels_strings_and_ints():
    got = positives_from_labels(["cat", "dog"], ["dog", "cat", "cat"])
    assert got.dtype == torch.bool
    assert got.tolist() == [[False, True, True], [True, False, False]]
    got = positives_from_labels(torch.tensor([1, 2]), np.array([2, 2, 1]))
    assert got.tolist() == [[False, False, True], [True, True, False]]


def test_recall_at_k_hand_computed():
    # R@1: q0 hit, q1 hit, q2 miss -> 2/3; R@2: same -> 2/3; R@3: q2 hit at rank 3 -> 1.
    # k=10 > G=4 is clipped to 4 -> 1.
    got = recall_at_k(SIM, POS, ks=(1, 2, 3, 10))
    assert got == pytest.approx({"R@1": 2 / 3, "R@2": 2 / 3, "R@3": 1.0, "R@10": 1.0})
    assert all(isinstance(v, float) for v in got.values())


def test_precision_at_k_hand_computed():
    # P@1 = (1 + 1 + 0) / 3 = 2/3
    # P@2 = (1/2 + 2/2 + 0) / 3 = 1/2
    # P@3 = (1/3 + 2/3 + 1/3) / 3 = 4/9
    # P@4 = (1/4 + 3/4 + 1/4) / 3 = 5/12; k=10 clipped to G=4 -> same as P@4
    got = precision_at_k(SIM, POS, ks=(1, 2, 3, 4, 10))
    assert got == pytest.approx({"P@1": 2 / 3, "P@2": 0.5, "P@3": 4 / 9, "P@4": 5 / 12, "P@10": 5 / 12})


def test_ranking_accepts_numpy():
    got = recall_at_k(SIM.numpy(), POS.numpy(), ks=(1,))
    assert got == pytest.approx({"R@1": 2 / 3})


def test_ties_break_by_lower_gallery_index():
    sim = torch.tensor([[0.5, 0.5, 0.5]])
    # all tied -> ranking 0, 1, 2
    assert recall_at_k(sim, torch.tensor([[True, False, False]]), ks=(1,))["R@1"] == 1.0
    assert recall_at_k(sim, torch.tensor([[False, True, False]]), ks=(1, 2)) == {"R@1": 0.0, "R@2": 1.0}
    # tie between items 1 and 2 at the top -> ranking 1, 2, 0
    sim = torch.tensor([[0.1, 0.7, 0.7]])
    pos = torch.tensor([[False, False, True]])
    assert recall_at_k(sim, pos, ks=(1, 2)) == {"R@1": 0.0, "R@2": 1.0}
    assert precision_at_k(sim, pos, ks=(1, 2)) == {"P@1": 0.0, "P@2": 0.5}


def test_ranking_errors():
    with pytest.raises(ValueError, match="shape"):
        recall_at_k(SIM, POS[:, :3])
    with pytest.raises(ValueError, match="shape"):
        precision_at_k(SIM, POS[:2])
    no_pos = POS.clone()
    no_pos[2] = False
    with pytest.raises(ValueError, match="without any positive"):
        recall_at_k(SIM, no_pos)
    with pytest.raises(ValueError, match="without any positive"):
        precision_at_k(SIM, no_pos)
    with pytest.raises(ValueError):
        chance_recall_at_1(no_pos)
    with pytest.raises(ValueError, match="k"):
        recall_at_k(SIM, POS, ks=(0,))


def test_chance_recall_at_1():
    # (1/4 + 3/4 + 1/4) / 3 = 5/12
    assert chance_recall_at_1(POS) == pytest.approx(5 / 12)
    assert chance_recall_at_1(np.eye(4, dtype=bool)) == pytest.approx(0.25)


def test_topk_accuracy():
    logits = torch.tensor(
        [
            [0.1, 0.7, 0.2],  # order 1, 2, 0; target 1 at rank 1
            [0.5, 0.3, 0.2],  # order 0, 1, 2; target 2 at rank 3
            [0.2, 0.3, 0.5],  # order 2, 1, 0; target 0 at rank 3
        ]
    )
    targets = torch.tensor([1, 2, 0])
    # top1 = 1/3, top2 = 1/3, top5 clipped to C=3 -> 1
    got = topk_accuracy(logits, targets, ks=(1, 2, 5))
    assert got == pytest.approx({"top1": 1 / 3, "top2": 1 / 3, "top5": 1.0})
    assert topk_accuracy(logits.numpy(), targets.numpy()) == pytest.approx({"top1": 1 / 3, "top5": 1.0})
    with pytest.raises(ValueError):
        topk_accuracy(logits, targets[:2])
    with pytest.raises(ValueError):
        topk_accuracy(logits, torch.tensor([0, 1, 3]))


E = torch.eye(3, dtype=torch.float64)


def _symmetric_case():
    """Two classes built so either query class gives the same counts.

    class 0 candidates: e0, 0.1*e0, e1, e2 ; class 1 candidates: e1, 5*e1, e0, e2
    Query class 0 (e0) retrieves {e0, 0.1*e0 (cosine 1 although dot 0.1), class-1 e0}:
    relevant class: TP=2, retrieved=3, relevant=4 -> P=2/3, R=1/2, F1=2*(1/3)/(7/6)=4/7;
    not relevant: TN=3 (class-1 e1, 5*e1, e2), not retrieved=5, not relevant=4 -> P=3/5, R=3/4, F1=2/3.
    Both-class mean: P=19/30, R=5/8, F1=13/21. Class 1 mirrors it.
    """
    query = E[:2]
    cands = torch.stack([E[0], 0.1 * E[0], E[1], E[2], E[1], 5 * E[1], E[0], E[2]])
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    return query, cands, labels


def test_candidate_batch_prf_exact_single_batch():
    query, cands, labels = _symmetric_case()
    for seed in range(5):
        got = candidate_batch_prf(query, cands, labels, batch_size=8, seed=seed)
        assert got["batches"] == 1
        assert got["precision"] == pytest.approx(19 / 30)
        assert got["recall"] == pytest.approx(5 / 8)
        assert got["f1"] == pytest.approx(13 / 21)
        assert got["precision_relevant"] == pytest.approx(2 / 3)
        assert got["recall_relevant"] == pytest.approx(1 / 2)
        assert got["f1_relevant"] == pytest.approx(4 / 7)


def test_candidate_batch_prf_num_batches_reshuffles():
    query, cands, labels = _symmetric_case()
    # batch_size == N: one batch per permutation, so 3 batches need 3 permutations.
    got = candidate_batch_prf(query, cands.numpy(), labels.numpy(), batch_size=8, num_batches=3)
    assert got == pytest.approx({"precision": 19 / 30, "recall": 5 / 8, "f1": 13 / 21, "precision_relevant": 2 / 3,
                                 "recall_relevant": 0.5, "f1_relevant": 4 / 7, "batches": 3})


def test_candidate_batch_prf_drops_incomplete_batch():
    query, cands, labels = _symmetric_case()
    assert candidate_batch_prf(query, cands, labels, batch_size=3)["batches"] == 2  # 8 // 3
    assert candidate_batch_prf(query, cands, labels, batch_size=3, num_batches=5)["batches"] == 5


def test_candidate_batch_prf_zero_retrieved():
    query, cands, labels = _symmetric_case()
    # cosine is at most 1 -> nothing predicted relevant -> relevant class: P = 0/0 = 0 (sklearn's
    # zero_division="warn" default), R = 0, F1 = 0; not relevant: TN=4 of 8 predicted, 4 true -> P=1/2,
    # R=1, F1=2/3. Mean: 1/4, 1/2, 1/3.
    got = candidate_batch_prf(query, cands, labels, batch_size=8, threshold=1.5)
    assert got == pytest.approx({"precision": 1 / 4, "recall": 1 / 2, "f1": 1 / 3, "precision_relevant": 0.0,
                                 "recall_relevant": 0.0, "f1_relevant": 0.0, "batches": 1})
    # All relevant, none retrieved (cosine -1): relevant P = 0/0 = 0, R = 0; "not relevant" is predicted
    # 4 times but never true: P = 0/4, R = 0/0 = 0. Everything 0.
    got = candidate_batch_prf(E[:1], -E[:1].repeat(4, 1), torch.zeros(4, dtype=torch.long), batch_size=4)
    assert got["precision"] == 0.0 and got["recall"] == 0.0 and got["f1"] == 0.0
    assert got["precision_relevant"] == 0.0 and got["recall_relevant"] == 0.0 and got["f1_relevant"] == 0.0


def test_candidate_batch_prf_all_relevant():
    labels = torch.zeros(4, dtype=torch.long)
    # All relevant and all retrieved: "not relevant" occurs nowhere, so it is not averaged in (sklearn's
    # labels are those present): P = R = F1 = 1, not 0.5.
    got = candidate_batch_prf(E[:1], E[:1].repeat(4, 1), labels, batch_size=4)
    assert got == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "precision_relevant": 1.0, "recall_relevant": 1.0,
                   "f1_relevant": 1.0, "batches": 1}
    # All relevant, half retrieved: relevant P=1, R=1/2, F1=2/3; "not relevant" is predicted (twice), so it
    # counts, with P = 0/2 = 0, R = 0/0 = 0, F1 = 0. Mean: 1/2, 1/4, 1/3.
    got = candidate_batch_prf(E[:1], torch.stack([E[0], E[0], -E[0], -E[0]]), labels, batch_size=4)
    assert got == pytest.approx({"precision": 1 / 2, "recall": 1 / 4, "f1": 1 / 3, "precision_relevant": 1.0,
                                 "recall_relevant": 0.5, "f1_relevant": 2 / 3, "batches": 1})


def test_candidate_batch_prf_threshold_is_inclusive():
    """Retrieved means cosine >= threshold (clip_ir.py: ``sim >= args.sim_threshold``): a candidate exactly
    at the threshold counts. Cosines here are exact: 1 (e0, 3*e0) and 0 (e1)."""
    labels = torch.zeros(4, dtype=torch.long)
    cands = torch.stack([E[0], 3 * E[0], E[1], E[1]])
    # threshold 0: all four retrieved (> would retrieve 2: P=(1+0)/2, R=(1/2+0)/2)
    got = candidate_batch_prf(E[:1], cands, labels, batch_size=4, threshold=0.0)
    assert (got["precision"], got["recall"], got["f1"]) == (1.0, 1.0, 1.0)
    # threshold 1: e0 and 3*e0 retrieved (> would retrieve none: everything 0)
    got = candidate_batch_prf(E[:1], cands, labels, batch_size=4, threshold=1.0)
    assert got["precision_relevant"] == 1.0 and got["recall_relevant"] == 0.5
    assert got["precision"] == pytest.approx(1 / 2) and got["recall"] == pytest.approx(1 / 4)


def test_candidate_batch_prf_query_class_uniform_over_distinct_labels():
    """clip_ir.py draws the query class with random.choice over the batch's set of labels: with labels
    [0, 0, 0, 1] each class is drawn half of the time (a random candidate's class would be 0 three times in
    four). Class 0 (e0) retrieves exactly its three e0s (relevant F1 = 1); class 1 (query e1, its candidate
    e2) retrieves nothing (relevant F1 = 0): mean relevant F1 = share of class-0 draws."""
    cands = torch.stack([E[0], E[0], E[0], E[2]])
    labels = torch.tensor([0, 0, 0, 1])
    got = candidate_batch_prf(E[:2], cands, labels, batch_size=4, num_batches=2000, seed=3)
    assert got["f1_relevant"] == pytest.approx(0.5, abs=0.05)  # 4.5 standard errors; count-weighted: 0.75


def test_candidate_batch_prf_follows_seeded_class_choice():
    # labels [0, 0, 1, 1], all embeddings e0 except the last (e1); relevant class:
    #   class 0 chosen -> retrieves 3 (TP 2) of relevant 2: P=2/3, R=1,   F1=0.8
    #   class 1 chosen -> retrieves 1 (TP 1) of relevant 2: P=1,   R=1/2, F1=2/3
    # not relevant: class 0 -> P=1, R=1/2, F1=2/3; class 1 -> P=2/3, R=1, F1=0.8; so the two-class mean
    # is P=5/6, R=3/4, F1=11/15 either way.
    query = E[:2]
    cands = torch.stack([E[0], E[0], E[0], E[1]])
    labels = torch.tensor([0, 0, 1, 1])
    outcome = {0: (2 / 3, 1.0, 0.8), 1: (1.0, 0.5, 2 / 3)}
    seen = set()
    for seed in range(6):
        # Re-read the documented generator draws: randperm per batch (batch_size == N), then per batch
        # randint over its sorted distinct labels.
        g = torch.Generator().manual_seed(seed)
        perms = [torch.randperm(4, generator=g) for _ in range(4)]
        classes = []
        for p in perms:
            present = torch.unique(labels[p])
            classes.append(int(present[int(torch.randint(len(present), (1,), generator=g))]))
        seen.update(classes)
        exp = [sum(outcome[c][i] for c in classes) / 4 for i in range(3)]
        got = candidate_batch_prf(query, cands, labels, batch_size=4, num_batches=4, seed=seed)
        assert [got["precision_relevant"], got["recall_relevant"], got["f1_relevant"]] == pytest.approx(exp)
        assert [got["precision"], got["recall"], got["f1"]] == pytest.approx([5 / 6, 3 / 4, 11 / 15])
        assert got == candidate_batch_prf(query, cands, labels, batch_size=4, num_batches=4, seed=seed)
    assert seen == {0, 1}  # the choice really varies, so the check above is meaningful


def test_candidate_batch_prf_matches_sklearn_per_class_mean():
    """The headline figures are clip_ir.py's: sklearn's per-class P/R/F1 arrays (default arguments),
    their mean per batch, then the mean over batches."""
    from sklearn import metrics as sklearn_metrics  # a training dependency: never skipped
    import warnings

    g0 = torch.Generator().manual_seed(5)
    query = torch.randn(4, 8, generator=g0, dtype=torch.float64)
    labels = torch.randint(4, (57,), generator=g0)
    cands = query[labels] + 1.2 * torch.randn(57, 8, generator=g0, dtype=torch.float64)
    cands[:3] = query[labels[:3]]  # some cosines of exactly 1
    got = candidate_batch_prf(query, cands, labels, batch_size=10, threshold=0.3, num_batches=40, seed=2)
    sim = torch.nn.functional.normalize(cands, dim=1) @ torch.nn.functional.normalize(query, dim=1).T
    g = torch.Generator().manual_seed(2)
    batches = []
    while len(batches) < 40:
        perm = torch.randperm(57, generator=g)
        batches += [perm[i * 10:(i + 1) * 10] for i in range(5)]
    means = []
    for idx in batches[:40]:
        present = torch.unique(labels[idx])
        cls = int(present[int(torch.randint(len(present), (1,), generator=g))])
        truth = (labels[idx] == cls).long().tolist()
        pred = (sim[idx, cls] >= 0.3).long().tolist()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p, r, f, _ = sklearn_metrics.precision_recall_fscore_support(truth, pred)
        means.append((np.mean(p), np.mean(r), np.mean(f)))
    exp = np.mean(means, axis=0)
    assert [got["precision"], got["recall"], got["f1"]] == pytest.approx(exp.tolist(), abs=1e-12)


def test_candidate_batch_prf_errors():
    query, cands, labels = _symmetric_case()
    with pytest.raises(ValueError):
        candidate_batch_prf(query, cands[:, :2], labels)
    with pytest.raises(ValueError):
        candidate_batch_prf(query, cands, labels[:7])
    with pytest.raises(ValueError):
        candidate_batch_prf(query, cands, labels, batch_size=9)
    with pytest.raises(ValueError):
        candidate_batch_prf(query, cands, labels + 1, batch_size=8)  # label 2 has no query


def test_cyclic_distance():
    a = torch.tensor([23.0, 1.0, 12.0, 0.0, 5.0])
    b = torch.tensor([1.0, 23.0, 0.0, 0.0, 29.0])
    assert cyclic_distance(a, b, 24).tolist() == [2.0, 2.0, 12.0, 0.0, 0.0]
    # months on a 12 cycle (ints work, broadcasting too)
    assert cyclic_distance(torch.tensor([11, 0, 6]), 1, 12).tolist() == [2, 1, 5]
    assert math.isclose(float(cyclic_distance(0.5, 11.5, 12)), 1.0)
    with pytest.raises(ValueError):
        cyclic_distance(a, b, 0)
