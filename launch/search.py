"""Top-k knowledge texts for every query embedding of an extraction, on Ray.

    python launch/search.py --model exports/geo_time --queries feats/geo_val \
        --corpus data/synth/geo_time/knowledge.txt --out search/geo_val --k 4 \
        --columns geo_time_location_cls geo_time_time_cls
    python launch/search.py ... --index ivf --nprobe 16          # or flat / hnsw (faiss); default: exact

The corpus is embedded by the export's text tower (onnxruntime actors, no torch): pass the export folder
the extraction used (``launch/extract.py --model``; ``--int8`` for its int8 towers). Writes
``<out>/results/*.parquet`` (key, <column>_ids, <column>_scores), ``<out>/corpus_embeddings.npy`` (reused by
a rerun with the same corpus and text tower) and ``<out>/manifest.json`` (corpus hash, encoder, k, index and
its recall@k against exact search).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.extract import EncoderSpec, init_ray  # noqa: E402
from serving.search import INDEX_KINDS, IndexOptions, SearchOptions, search_extraction  # noqa: E402
from shards.progress import add_progress_argument, apply_progress_argument, logs_above_bars  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="export folder (launch/export.py) whose text tower embeds the corpus")
    parser.add_argument("--int8", action="store_true", help="the export's int8 text tower (exported with --int8)")
    parser.add_argument("--queries", required=True, help="output folder of launch/extract.py")
    parser.add_argument("--columns", nargs="+", default=["image_embedding"], help="query columns of the extraction")
    parser.add_argument("--corpus", required=True, help="one text per line, CSV or JSONL")
    parser.add_argument("--text-column", default="text", help="text column of a CSV / JSONL corpus")
    parser.add_argument("--out", required=True, help="a new or empty folder, or an earlier search's (search.json)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty folder that is not a search output (only this tool's files change)")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--index", choices=INDEX_KINDS, default="exact")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--ef-search", type=int, default=128)
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--num-cpus", type=int)
    parser.add_argument("--actors", type=int)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime / faiss threads per actor")
    add_progress_argument(parser)
    args = parser.parse_args(argv)
    apply_progress_argument(args)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("multiclip").setLevel(logging.INFO)
    encoder = EncoderSpec("onnx", args.model, int8=args.int8)
    try:
        encoder.check()
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    init_ray(args.address, args.num_cpus)
    options = SearchOptions(k=args.k, actors=args.actors, threads=args.threads,
                            index=IndexOptions(kind=args.index, nprobe=args.nprobe, ef_search=args.ef_search))
    try:
        with logs_above_bars():
            manifest = search_extraction(args.queries, args.corpus, args.out, encoder,
                                         args.columns, options, args.text_column, args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: manifest[k] for k in ("columns", "k", "index", "recall_at_k", "queries",
                                                "queries_per_s")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
