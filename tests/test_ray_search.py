"""Ray knowledge search on an export folder: torch-free, equal to the geo_time head's in-process search; FAISS recall."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, _run
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


def test_the_error_bound_is_what_keeps_int8_search_exact():
    """Uniform random vectors pack the scores together, so int8 products alone mis-rank rows: exactness
    rests on the quantisation error bound (without it, about 1 query in 10 here gets a wrong top-10)."""
    from serving.search import exact_topk

    rng = np.random.default_rng(3)
    corpus = rng.standard_normal((20000, 64)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = rng.standard_normal((200, 64)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    scores = queries @ corpus.T
    reference = np.lexsort((np.broadcast_to(np.arange(scores.shape[1]), scores.shape), -scores), axis=1)[:, :10]
    assert np.array_equal(exact_topk(queries, corpus, k=10)[1], reference)


def test_int8_bound_rescores_near_ties_and_stays_exact():
    """Near-duplicates that int8 cannot separate are all rescored in fp32; blocks narrower than k work too."""
    from serving.search import QuantizedCorpus, exact_topk, fp32_topk

    rng = np.random.default_rng(1)
    corpus = rng.standard_normal((5000, 32)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    corpus[4000:4200] = corpus[7] + 1e-4 * rng.standard_normal((200, 32)).astype(np.float32)  # 201 near-ties
    queries = np.concatenate([rng.standard_normal((60, 32)).astype(np.float32), corpus[7:8]])
    prepared = QuantizedCorpus(corpus)
    scores, ids = exact_topk(queries, prepared, k=5, block_size=1024)
    assert 201 <= prepared.last_stats["rescored"] < 61 * 5000 // 4  # the bound rules most rows out
    ref_scores, ref_ids = knowledge.search(torch.from_numpy(queries), torch.from_numpy(corpus), k=5)
    assert np.array_equal(ids, ref_ids.numpy())
    np.testing.assert_allclose(scores, ref_scores.numpy(), atol=1e-6)
    assert np.array_equal(exact_topk(queries, corpus[:300], k=5, block_size=3)[1],
                          knowledge.search(torch.from_numpy(queries), torch.from_numpy(corpus[:300]), k=5)[1].numpy())
    assert np.array_equal(fp32_topk(queries, corpus, k=5, block_size=1000)[1], ref_ids.numpy())


def test_serving_search_and_extract_import_no_torch():
    """A fresh interpreter: the search kernels and both modules' imports pull in no torch."""
    probe = ("import sys, numpy as np; import serving.search, serving.extract; from serving.search import exact_topk; "
             "c = np.eye(8, dtype=np.float32); exact_topk(c[:3], c, 2); "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip', 'training')))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("[]"), proc.stdout + proc.stderr[-2000:]


@pytest.fixture(scope="session")
def geo_export(geo_run, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(run, shard root, export folder): the tiny geo_time run of conftest's geo_run, exported once (fp32)."""
    run, shards = geo_run
    export = tmp_path_factory.getbasetemp() / "ray_geo_export"
    if not (export / "manifest.json").is_file():
        proc = _run([sys.executable, "launch/export.py", "--checkpoint", str(run), "--out", str(export)])
        assert proc.returncode == 0, proc.stderr[-3000:]
    return run, shards, export


@pytest.fixture
def local_ray(tmp_path):
    import ray

    from serving.extract import init_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def test_search_on_the_export_equals_in_process_knowledge_search(geo_export, local_ray, tmp_path):
    from serving.extract import EncoderSpec, ExtractOptions, extract, read_embeddings
    from shards.atomic import file_sha256
    from serving.search import (CORPUS_EMBEDDINGS, IndexOptions, SearchOptions, read_results,
                                search_extraction)
    from training.validation import config_from_dict
    from training.evaluation import load_weights
    from training.model import build_model

    run, shards, export = geo_export
    encoder = EncoderSpec("onnx", str(export))  # the extraction's spec embeds the corpus too
    feats = tmp_path / "feats"
    extract(str(shards / "val"), feats, encoder, ExtractOptions(actors=1, batch_size=64))
    columns = ["geo_time_location_cls", "geo_time_time_cls", "image_embedding"]
    out = tmp_path / "search"
    manifest = search_extraction(feats, shards / "knowledge.txt", out, encoder, columns, SearchOptions(k=4, actors=2))
    assert manifest["queries"] == 120 * (2 + 2 + 1) and manifest["recall_at_k"] is None
    assert not manifest["corpus"]["embeddings_reused"]
    with pytest.raises(ValueError, match="export folder"):  # torch weights never embed the corpus here
        search_extraction(feats, shards / "knowledge.txt", out, EncoderSpec("torch-run", str(run)), columns)

    # the text-tower fingerprint: a hash of the exported text graph (whose recorded sha256 is the file's)
    graph = json.loads((export / "manifest.json").read_text())["graphs"]["text_encoder"]
    assert file_sha256(export / graph["file"]) == graph["sha256"]
    assert manifest["encoder"]["text_fingerprint"] == encoder.text_fingerprint()

    # the corpus: the exported text tower embeds like the geo_time head's own embed_corpus, in this process
    cfg = config_from_dict(json.loads((run / "final" / "config.json").read_text()))
    model, backbone = build_model(cfg)
    load_weights(model, run)
    model.eval()
    with torch.no_grad():
        texts, reference_corpus = knowledge.embed_corpus(model.backbone, backbone.tokenizer, shards / "knowledge.txt",
                                                         cache=False)
    assert manifest["corpus"]["texts"] == len(texts)
    corpus = np.load(out / CORPUS_EMBEDDINGS)
    np.testing.assert_allclose(corpus, reference_corpus.numpy(), atol=1e-4)

    # the search: the Ray actors' exact top-k over the extraction's queries = knowledge.search over the same arrays
    for column in columns:
        results = read_results(out, column)
        keys, queries = read_embeddings(feats, column)
        assert set(results) == set(keys) and len(keys) == 120
        shape = queries.shape[:-1]
        ref_scores, ref_ids = knowledge.search(torch.from_numpy(queries.reshape(-1, queries.shape[-1])),
                                               torch.from_numpy(corpus), 4)
        ids = np.stack([results[k][0] for k in keys])
        scores = np.stack([results[k][1] for k in keys])
        assert ids.shape == (*shape, 4)
        agree = (ids == ref_ids.reshape(*shape, 4).numpy()).mean()
        assert agree >= 0.995, f"{column}: {agree:.4f} of the ids agree"  # fp near-ties may swap neighbours
        np.testing.assert_allclose(scores, ref_scores.reshape(*shape, 4).numpy(), atol=1e-5)

    # a rerun with the same corpus and text tower reuses the embeddings, and finds the same
    first = {k: v[0].tolist() for k, v in read_results(out, "image_embedding").items()}
    again = search_extraction(feats, shards / "knowledge.txt", out, encoder, ["image_embedding"],
                              SearchOptions(k=4, actors=2))
    assert again["corpus"]["embeddings_reused"]
    assert {k: v[0].tolist() for k, v in read_results(out, "image_embedding").items()} == first
    corpus = torch.from_numpy(corpus)

    # never run over what it did not write: the extraction folder itself, a foreign folder, a foreign results/
    extraction_manifest = (feats / "manifest.json").read_bytes()
    with pytest.raises(ValueError, match="is the extraction folder"):
        search_extraction(feats, shards / "knowledge.txt", feats, encoder, ["image_embedding"])
    assert (feats / "manifest.json").read_bytes() == extraction_manifest
    foreign = tmp_path / "foreign"
    (foreign / "results").mkdir(parents=True)
    (foreign / "results" / "mine.parquet").write_text("not the search's")
    with pytest.raises(FileExistsError, match="not a search output"):
        search_extraction(feats, shards / "knowledge.txt", foreign, encoder, ["image_embedding"])
    with pytest.raises(FileExistsError, match="not written by this tool"):  # even with --overwrite
        search_extraction(feats, shards / "knowledge.txt", foreign, encoder, ["image_embedding"], overwrite=True)
    assert (foreign / "results" / "mine.parquet").read_text() == "not the search's"

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
    queries = read_embeddings(feats, "geo_time_location_cls")[1][:, 0]
    ivf = SearchOptions(k=4, index=IndexOptions(kind="ivf", nlist=16, nprobe=2))
    recall = measure_recall(corpus.numpy(), queries, build_index(corpus.numpy(), ivf.index), ivf)
    assert 0.2 < recall <= 1.0
    assert measure_recall(corpus.numpy(), queries, build_index(corpus.numpy(), flat.index), flat) == pytest.approx(1.0)

    # the CLI, connected to the running cluster: an HNSW index, its recall@k against exact search in the
    # manifest, equal to the recall of the neighbours it wrote (the queries are fewer than recall_sample)
    from serving.search import recall_at_k

    cli_out = tmp_path / "hnsw"
    proc = _run([sys.executable, "launch/search.py", "--model", str(export), "--queries", str(feats),
                 "--corpus", str(shards / "knowledge.txt"), "--out", str(cli_out), "--k", "4", "--index", "hnsw",
                 "--ef-search", "4", "--address", ray.get_runtime_context().gcs_address])
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout[proc.stdout.index("{"):])
    manifest = json.loads((cli_out / "manifest.json").read_text())
    assert manifest["index"]["kind"] == "hnsw" and printed["recall_at_k"] == manifest["recall_at_k"]
    approx = read_results(cli_out, "image_embedding")
    keys, _ = read_embeddings(feats, "image_embedding")
    written = recall_at_k(np.stack([approx[k][0] for k in keys]), np.stack([exact[k][0] for k in keys]))
    assert manifest["recall_at_k"] == pytest.approx(written, abs=1e-9) and 0.5 < written <= 1.0
    proc = _run([sys.executable, "launch/search.py", "--model", str(export), "--queries", str(feats),
                 "--corpus", str(shards / "knowledge.txt"), "--out", str(feats), "--address",
                 ray.get_runtime_context().gcs_address])
    assert proc.returncode == 2 and "is the extraction folder" in proc.stderr and "Traceback" not in proc.stderr
