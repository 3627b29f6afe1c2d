"""Pure evaluation metrics over torch tensors (numpy arrays are accepted too).

Conventions shared by the ranking metrics:
- ``sim`` is a ``[Q, G]`` similarity matrix, larger means more similar.
- Ranking is by descending similarity; ties are broken deterministically in
  favour of the lower gallery index (stable sort).
- A ``k`` larger than the number of candidates is clipped; result keys use the
  requested ``k``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def _as_list(labels) -> list:
    if isinstance(labels, torch.Tensor) or hasattr(labels, "tolist"):
        return list(labels.tolist())
    return list(labels)


def positives_from_labels(query_labels: Sequence, gallery_labels: Sequence) -> torch.Tensor:
    """Bool ``[Q, G]`` matrix with ``True`` where ``query_labels[q] == gallery_labels[g]``.

    Labels may be any hashable values (ints, strings, ...), or tensors/arrays.
    """
    ql, gl = _as_list(query_labels), _as_list(gallery_labels)
    vocab: dict = {}
    qi = torch.tensor([vocab.setdefault(x, len(vocab)) for x in ql], dtype=torch.long)
    gi = torch.tensor([vocab.setdefault(x, len(vocab)) for x in gl], dtype=torch.long)
    return qi[:, None] == gi[None, :]


def _check_ks(ks: Sequence[int]) -> None:
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"all k must be >= 1, got {tuple(ks)}")


def _ranked_positives(sim, positives) -> torch.Tensor:
    """Validate inputs and return positives re-ordered by descending sim (stable)."""
    sim = torch.as_tensor(sim, dtype=torch.float64)
    positives = torch.as_tensor(positives).bool()
    if sim.ndim != 2 or sim.shape != positives.shape:
        raise ValueError(
            f"sim and positives must be 2-D with the same shape, got "
            f"{tuple(sim.shape)} and {tuple(positives.shape)}"
        )
    if sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError(f"need at least one query and one gallery item, got {tuple(sim.shape)}")
    missing = (~positives.any(dim=1)).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"queries without any positive in the gallery: {missing[:10]}")
    order = torch.sort(sim, dim=1, descending=True, stable=True).indices
    return positives.gather(1, order)


def recall_at_k(sim, positives, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k: share of queries with at least one positive among their top-k.

    Ties broken by lower gallery index; k is clipped to G. Raises ValueError on
    shape mismatch or if a query has no positive.
    """
    _check_ks(ks)
    ranked = _ranked_positives(sim, positives)
    g = ranked.shape[1]
    return {f"R@{k}": ranked[:, : min(int(k), g)].any(dim=1).double().mean().item() for k in ks}


def precision_at_k(sim, positives, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Precision@k: share of the top-k that are positive (denominator min(k, G)), mean over queries.

    Same tie-breaking and validation as :func:`recall_at_k`.
    """
    _check_ks(ks)
    ranked = _ranked_positives(sim, positives)
    g = ranked.shape[1]
    out = {}
    for k in ks:
        kk = min(int(k), g)
        out[f"P@{k}"] = (ranked[:, :kk].double().sum(dim=1) / kk).mean().item()
    return out


def chance_recall_at_1(positives) -> float:
    """Expected R@1 of a uniformly random ranking: mean over queries of n_pos / G."""
    positives = torch.as_tensor(positives).bool()
    if positives.ndim != 2 or positives.numel() == 0:
        raise ValueError(f"positives must be a non-empty 2-D matrix, got {tuple(positives.shape)}")
    if not bool(positives.any(dim=1).all()):
        raise ValueError("every query needs at least one positive")
    return positives.double().mean(dim=1).mean().item()


def topk_accuracy(logits, targets, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k classification accuracy, keys ``"top{k}"``; k clipped to C, ties to the lower class index."""
    _check_ks(ks)
    logits = torch.as_tensor(logits, dtype=torch.float64)
    targets = torch.as_tensor(targets, dtype=torch.long)
    if logits.ndim != 2 or targets.ndim != 1 or logits.shape[0] != targets.shape[0]:
        raise ValueError(
            f"expected logits [N, C] and targets [N], got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    n, c = logits.shape
    if n == 0 or c == 0:
        raise ValueError(f"need N >= 1 and C >= 1, got {tuple(logits.shape)}")
    if bool(((targets < 0) | (targets >= c)).any()):
        raise ValueError(f"targets must lie in [0, {c})")
    order = torch.sort(logits, dim=1, descending=True, stable=True).indices
    hit = order == targets[:, None]
    return {f"top{k}": hit[:, : min(int(k), c)].any(dim=1).double().mean().item() for k in ks}


def candidate_batch_prf(
    query_emb,
    cand_emb,
    cand_labels,
    batch_size: int = 10,
    threshold: float = 0.25,
    num_batches: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Macro precision/recall/F1 over random candidate batches ("Image retrieval from text" protocol).

    ``query_emb[c]`` is the text query of class ``c``; both sides are l2-normalised
    and compared by cosine. With ``g = torch.Generator().manual_seed(seed)``:
    repeatedly draw ``perm = torch.randperm(N, generator=g)`` and cut it into
    consecutive full batches (an incomplete tail is dropped), until ``num_batches``
    batches exist (default: the batches of one permutation). Then, per batch in
    order, the query class is drawn uniformly among the batch's distinct labels:
    ``u = torch.unique(cand_labels[batch])`` (sorted), ``cls = u[torch.randint(len(u),
    (1,), generator=g)]`` (clip_ir.py: ``random.choice`` over the set of labels).
    Retrieved: cosine >= threshold; relevant: label == query class.

    As the original (sklearn ``precision_recall_fscore_support`` with its defaults,
    then the mean of the per-class arrays), each batch is scored as a two-class
    problem, "relevant" and "not relevant", each class with its own P/R/F1
    (not relevant: TP = not retrieved and not relevant). A class enters the mean
    only if it occurs among the batch's truths or predictions (sklearn's labels),
    so a batch that is all relevant and all retrieved scores the relevant class
    alone. A 0/0 ratio is 0 (sklearn's default ``zero_division="warn"``):
    P = 0 if the class is never predicted, R = 0 if it never occurs,
    F1 = 2PR/(P+R), 0 if P+R == 0.

    Returns ``precision``/``recall``/``f1``: the means over batches of that two-class
    mean (the original's figures); ``precision_relevant``/``recall_relevant``/
    ``f1_relevant``: the relevant class alone; and ``batches``.
    """
    q = torch.as_tensor(query_emb, dtype=torch.float64)
    x = torch.as_tensor(cand_emb, dtype=torch.float64)
    y = torch.as_tensor(cand_labels, dtype=torch.long)
    if q.ndim != 2 or x.ndim != 2 or q.shape[1] != x.shape[1] or y.shape != (x.shape[0],):
        raise ValueError(
            f"expected query_emb [C, D], cand_emb [N, D], cand_labels [N], got "
            f"{tuple(q.shape)}, {tuple(x.shape)}, {tuple(y.shape)}"
        )
    n = x.shape[0]
    if batch_size < 1 or n < batch_size:
        raise ValueError(f"batch_size must be in [1, N={n}], got {batch_size}")
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    if bool(((y < 0) | (y >= q.shape[0])).any()):
        raise ValueError(f"cand_labels must lie in [0, C={q.shape[0]})")

    sim = F.normalize(x, dim=1) @ F.normalize(q, dim=1).T  # [N, C] cosine
    g = torch.Generator().manual_seed(seed)
    per_perm = n // batch_size
    wanted = per_perm if num_batches is None else num_batches
    batches: list[torch.Tensor] = []
    while len(batches) < wanted:
        perm = torch.randperm(n, generator=g)
        batches.extend(perm[i * batch_size : (i + 1) * batch_size] for i in range(per_perm))
    batches = batches[:wanted]

    def prf(tp: int, n_pred: int, n_true: int) -> tuple[float, float, float]:
        p = tp / n_pred if n_pred else 0.0
        r = tp / n_true if n_true else 0.0
        return p, r, (2 * p * r / (p + r) if p + r else 0.0)

    both, rel = [], []  # per batch: (P, R, F1) two-class mean / relevant class
    for idx in batches:
        present = torch.unique(y[idx])
        cls = int(present[int(torch.randint(len(present), (1,), generator=g))])
        retrieved = sim[idx, cls] >= threshold
        relevant = y[idx] == cls
        scores = [prf(int((retrieved & relevant).sum()), int(retrieved.sum()), int(relevant.sum()))]
        rel.append(scores[0])
        n_not_ret, n_not_rel = int((~retrieved).sum()), int((~relevant).sum())
        if n_not_ret or n_not_rel:  # "not relevant" occurs in truths or predictions
            scores.append(prf(int((~retrieved & ~relevant).sum()), n_not_ret, n_not_rel))
        both.append([sum(v) / len(scores) for v in zip(*scores)])
    m = len(batches)
    out = {k: sum(b[i] for b in both) / m for i, k in enumerate(("precision", "recall", "f1"))}
    out.update({f"{k}_relevant": sum(b[i] for b in rel) / m for i, k in enumerate(("precision", "recall", "f1"))})
    out["batches"] = m
    return out


def cyclic_distance(a, b, period: float) -> torch.Tensor:
    """Elementwise minimal distance between ``a`` and ``b`` on a circle of length ``period``.

    E.g. with period 24, hours 23 and 1 are 2 apart. Result lies in [0, period / 2].
    """
    if period <= 0:
        raise ValueError(f"period must be positive, got {period}")
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    d = torch.remainder(a - b, period)
    return torch.minimum(d, period - d)


def time_of_day_errors(pred_bins, true_minutes, num_bins: int) -> torch.Tensor:
    """Minutes between the predicted bin's centre and the true time of day, wrapped around 24 h."""
    pred_bins = torch.as_tensor(pred_bins)
    true_minutes = torch.as_tensor(true_minutes, dtype=torch.float64)
    if pred_bins.shape != true_minutes.shape:
        raise ValueError(f"shape mismatch: predictions {tuple(pred_bins.shape)} vs truth {tuple(true_minutes.shape)}")
    centre = (pred_bins.to(torch.float64) + 0.5) * (24 * 60 / num_bins)
    return cyclic_distance(centre, true_minutes, 24 * 60)


def cyclic_positives(query_values, gallery_values, tolerance: float, period: float) -> torch.Tensor:
    """Bool [Q, G]: gallery items within ``tolerance`` of the query on a circle of ``period``."""
    q = torch.as_tensor(query_values, dtype=torch.float64)[:, None]
    g = torch.as_tensor(gallery_values, dtype=torch.float64)[None, :]
    return cyclic_distance(q, g, period) <= tolerance + 1e-9


# --- TARA protocol (geo_time) -------------------------------------------------------------------

PROMPT_PREFIX = "a photo taken in "  # TARA's prompt; its scorer leaves it glued to the first location part
MONTH_NAMES = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
               "November", "December")


def strip_prompt(label) -> str:
    """The label without TARA's "a photo taken in " prefix (the scorer's labels are prompts)."""
    text = str(label).strip()
    return text[len(PROMPT_PREFIX):].strip() if text.startswith(PROMPT_PREFIX) else text


def century_name(year: int) -> str:
    """TARA's century name: "1st century" up to year 100, else "N century" (2000 is in the 20th)."""
    return "1st century" if year <= 100 else f"{(year - 1) // 100 + 1} century"


def _date_parts(label: str) -> list[int]:
    """[year], [year, month] or [year, month, day] of "2017-05-23" (zero padding read as the scorer does,
    by int) or of the prompt form "May 23, 2017" / "May, 2017"; ValueError for anything else."""
    text = str(label).strip()
    if "," in text or text[:1].isalpha():
        head, _, year = text.rpartition(", ")
        words = head.split()
        if not words or words[0] not in MONTH_NAMES or len(words) > 2:
            raise ValueError(f"not a time label: {label!r}")
        text = "-".join([year, str(MONTH_NAMES.index(words[0]) + 1), *words[1:]])
    try:
        parts = [int(p) for p in text.split("-")]
    except ValueError:
        raise ValueError(f"not a YYYY, YYYY-M, YYYY-M-D, decade or century time label: {label!r}") from None
    if not 1 <= len(parts) <= 3 or (len(parts) > 1 and not 1 <= parts[1] <= 12) or \
            (len(parts) > 2 and not 1 <= parts[2] <= 31):
        raise ValueError(f"not a YYYY, YYYY-M, YYYY-M-D, decade or century time label: {label!r}")
    return parts


def time_levels(label: str) -> list[str]:
    """TARA's time hierarchy, as the scorer names its levels.

    A label naming a century ("20 century") is one level; a decade "1990s" is [century, decade]; a date
    is [century, decade, year, year-month, year-month-day] as far as it goes ("2017-5" -> ["21 century",
    "2010s", "2017", "2017-5"]). The "a photo taken in " prefix is dropped first.
    """
    text = strip_prompt(label)
    if "century" in text:
        return [text]
    if text.endswith("s") and text[:-1].isdigit():
        return [century_name(int(text[:-1])), text]
    parts = _date_parts(text)
    year = parts[0]
    levels = [century_name(year), f"{year // 10 * 10}s", str(year)]
    if len(parts) > 1:
        levels.append(f"{year}-{parts[1]}")
    if len(parts) > 2:
        levels.append(f"{year}-{parts[1]}-{parts[2]}")
    return levels


def time_hierarchy(label: str) -> set[str]:
    """The set of ``time_levels``: century, decade, year, year-month, date (as many as the label has)."""
    return set(time_levels(label))

def location_levels(label: str) -> list[str]:
    """Split on ", "; with more than 3 parts: [all but the last two joined, second-to-last, last].

    The "a photo taken in " prefix is dropped first (TARA's scorer leaves it glued to the first part).
    """
    parts = [p.strip() for p in strip_prompt(label).split(", ") if p.strip()]
    return [", ".join(parts[:-2]), parts[-2], parts[-1]] if len(parts) > 3 else parts


def location_hierarchy(label: str, depth_aware: bool = False) -> set[str]:
    """The set of location names, compared as plain strings across levels as TARA's scorer does
    ("Georgia, United States" and "Tbilisi, Georgia" share "Georgia"). ``depth_aware`` tags each name
    with its depth from the end (1 = last), so a name only matches at the same level."""
    parts = location_levels(label)
    if not depth_aware:
        return set(parts)
    return {f"{depth}:{part}" for depth, part in zip(range(len(parts), 0, -1), parts)}


def location_hierarchy_depth_aware(label: str) -> set[str]:
    return location_hierarchy(label, depth_aware=True)

def example_f1(predictions: Sequence[str], golds: Sequence[str], hierarchy) -> float:
    """Mean over examples of 2|P ∩ G| / (|P| + |G|) over hierarchical label sets.

    |P| and |G| count distinct names (TARA's scorer divides by list lengths, so an identical label with a
    repeated name, "New York, New York, United States", scores 2/3 against itself there and 1 here).
    """
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions vs {len(golds)} gold labels")
    if not golds:
        raise ValueError("no examples")
    total = 0.0
    for pred, gold in zip(predictions, golds):
        p, g = set(hierarchy(pred)), set(hierarchy(gold))
        total += 2 * len(p & g) / (len(p) + len(g))
    return total / len(golds)
