"""Ray knowledge search: equal to the geo_time head's in-process search; FAISS recall against exact."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import in_process_embeddings
from training import knowledge


def test_exact_topk_equals_knowledge_search_with_ties():
    from serving.search import exact_topk

    torch.manual_seed(0)
    corpus = torch.nn.functional.normalize(torch.randn(3000, 16), dim=1)
    corpus[2500] = corpus[10]  # exact ties across blocks go to the lower id
    corpus[2999] = corpus[10]
    queries = torch.cat([torch.nn.functional.normalize(torch.randn(40, 16), dim=1), corpus[10:11]])
    ref_scores, ref_ids = knowledge.search(queries, corpus, k=5, block_size=700)
    scores, ids = exact_topk(queries.numpy(), corpus.numpy(), k=5, block_size=512)
    assert np.array_equal(ids, ref_ids.numpy())
    np.testing.assert_allclose(scores, ref_scores.numpy(), atol=1e-6)
    assert ids[-1, :3].tolist() == [10, 2500, 2999]


def test_int8_candidates_are_certified_or_searched_again():
    """Both passes equal the fp32 reference: near-duplicates that int8 cannot separate go to pass 2."""
    from serving.search import QuantizedCorpus, exact_topk

    rng = np.random.default_rng(1)
    corpus = rng.standard_normal((5000, 32)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    corpus[4000:4200] = corpus[7] + 1e-4 * rng.standard_normal((200, 32)).astype(np.float32)  # 201 near-ties
    queries = np.concatenate([rng.standard_normal((60, 32)).astype(np.float32), corpus[7:8]])
    prepared = QuantizedCorpus(corpus)
    scores, ids = exact_topk(queries, prepared, k=5, block_size=1024)
    assert prepared.last_stats["pass1"] >= 55 and prepared.last_stats["pass2"] >= 1
    ref_scores, ref_ids = knowledge.search(torch.from_numpy(queries), torch.from_numpy(corpus), k=5)
    assert np.array_equal(ids, ref_ids.numpy())
    np.testing.assert_allclose(scores, ref_scores.numpy(), atol=1e-6)
    prepared.max_pass2_rows = 100  # more near-ties than pass 2 takes: that query is searched in fp32
    assert np.array_equal(exact_topk(queries, prepared, k=5, block_size=1024)[1], ref_ids.numpy())
    assert prepared.last_stats["fp32"] >= 1


@pytest.fixture
def local_ray(tmp_path):
    import ray

    from serving.extract import init_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def test_search_equals_in_process_knowledge_search(geo_run, local_ray, tmp_path):  # noqa: F811
    from serving.extract import EncoderSpec, ExtractOptions, extract
    from serving.search import (CORPUS_EMBEDDINGS, IndexOptions, SearchOptions, read_results,
                                search_extraction)
    from training.config import config_from_dict
    from training.evaluation import load_weights
    from training.model import build_model

    run, shards = geo_run
    encoder = EncoderSpec("torch-run", str(run))
    feats = tmp_path / "feats"
    extract(str(shards / "val"), feats, encoder, ExtractOptions(actors=1, batch_size=64))
    columns = ["geo_time_location_cls", "geo_time_time_cls", "image_embedding"]
    out = tmp_path / "search"
    manifest = search_extraction(feats, shards / "knowledge.txt", out, encoder, columns, SearchOptions(k=4, actors=2))
    assert manifest["queries"] == 120 * (2 + 2 + 1) and manifest["recall_at_k"] is None

    # the reference: the geo_time head's own corpus embedding and search, in this process
    cfg = config_from_dict(json.loads((run / "final" / "config.json").read_text()))
    model, backbone = build_model(cfg)
    load_weights(model, run)
    model.eval()
    with torch.no_grad():
        texts, corpus = knowledge.embed_corpus(model.backbone, backbone.tokenizer, shards / "knowledge.txt",
                                               cache=False)
    assert manifest["corpus"]["texts"] == len(texts)
    np.testing.assert_allclose(np.load(out / CORPUS_EMBEDDINGS), corpus.numpy(), atol=2e-5)
    assert manifest["encoder"]["text_fingerprint"] == knowledge.tower_fingerprint(model.backbone)
    reference = in_process_embeddings(run, shards / "val")
    for column in columns:
        results = read_results(out, column)
        assert set(results) == set(reference)
        keys = sorted(reference)
        queries = torch.from_numpy(np.stack([reference[k][column] for k in keys]))
        shape = queries.shape[:-1]
        ref_scores, ref_ids = knowledge.search(queries.reshape(-1, queries.shape[-1]), corpus, 4)
        ids = np.stack([results[k][0] for k in keys])
        scores = np.stack([results[k][1] for k in keys])
        assert ids.shape == (*shape, 4)
        agree = (ids == ref_ids.reshape(*shape, 4).numpy()).mean()
        assert agree >= 0.995, f"{column}: {agree:.4f} of the ids agree"  # fp near-ties may swap neighbours
        np.testing.assert_allclose(scores, ref_scores.reshape(*shape, 4).numpy(), atol=1e-4)

    # FAISS: a flat index searched by the Ray actors finds the exact neighbours; IVF reports its recall
    import ray

    from serving.search import build_index, measure_recall, query_tables, search_dataset

    parts = [str(feats / p) for p in json.loads((feats / "manifest.json").read_text())["parts"]]
    flat = SearchOptions(k=4, actors=2, index=IndexOptions(kind="flat"))
    image = ["image_embedding"]
    ds = search_dataset(ray.data.from_arrow(query_tables(parts, image)), corpus.numpy(), image, flat,
                        build_index(corpus.numpy(), flat.index))
    from serving.extract import tensor_column

    found = {}
    for t in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        found.update(zip(t["key"].to_pylist(), tensor_column(t["image_embedding_ids"])))
    exact = read_results(out, "image_embedding")
    assert set(found) == set(exact)
    assert np.mean([np.array_equal(found[k], exact[k][0]) for k in exact]) >= 0.98
    queries = np.stack([reference[k]["geo_time_location_cls"][0] for k in sorted(reference)])
    ivf = SearchOptions(k=4, index=IndexOptions(kind="ivf", nlist=16, nprobe=2))
    recall = measure_recall(corpus.numpy(), queries, build_index(corpus.numpy(), ivf.index), ivf)
    assert 0.2 < recall <= 1.0
    assert measure_recall(corpus.numpy(), queries, build_index(corpus.numpy(), flat.index), flat) == pytest.approx(1.0)
