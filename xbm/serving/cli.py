"""Command lines: xbm-index, xbm-search and xbm-export.

Each ends a bad input in one sentence on stderr and exit status 2 (a traceback with --debug).
"""
from __future__ import annotations

import argparse
import sys

from ..utils.errors import fail
from .images import ImageInputError, image_paths
from .index import INDEX_TYPES, IndexFolderError
from .models import ModelInputError

_EXPECTED = (ImageInputError, ModelInputError, IndexFolderError, ValueError, OSError)


def _model_options(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--ckpt", help="training checkpoint (.pth) written by xbm-train")
    group.add_argument("--model", help="exported model (.onnx or TorchScript .pt) with its FILE.json sidecar")
    parser.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=64, help="images embedded per batch (default 64)")
    parser.add_argument("--workers", type=int, default=4, help="threads decoding images (default 4)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")


def index_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="xbm-index", description="Embed a gallery of images and write a faiss index of it (atomically).")
    _model_options(parser, required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", metavar="DIR", help="every image under this folder (no labels)")
    source.add_argument("--list", metavar="FILE", help="'relative/path,label' lines, paths relative to FILE")
    source.add_argument("--split", metavar="NAME", help="a split of the checkpoint's dataset, e.g. test (--ckpt only)")
    parser.add_argument("--out", required=True, metavar="INDEX_DIR", help="index folder to write")
    parser.add_argument("--add", action="store_true",
                        help="append the images not yet in INDEX_DIR, without re-embedding the others")
    parser.add_argument("--overwrite", action="store_true", help="replace an index already in INDEX_DIR")
    parser.add_argument("--index-type", default="flat",
                        help=f"one of {', '.join(INDEX_TYPES)} (exact inner product: flat, the default) or a faiss "
                        "index-factory string such as IVF1024,Flat, IVF1024,PQ32 or HNSW32")
    parser.add_argument("--train-size", type=int, default=100_000,
                        help="vectors sampled to train IVF/PQ index types (default 100000)")
    parser.add_argument("--search-params", default=None,
                        help="faiss search parameters stored with the index, e.g. nprobe=32 or efSearch=128 "
                        "(default: chosen for the index type, see BENCHMARKS.md)")
    parser.add_argument("--skip-bad", action="store_true", help="leave undecodable images out instead of stopping")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides of a --ckpt model, e.g. DATA.ROOT /data/sop")
    args = parser.parse_args(argv)
    from .gallery import SPLIT_NEEDS_CHECKPOINT, build_index, images_source, list_source, split_source
    from .models import load_embedder

    try:
        if args.opts and args.model:
            raise ModelInputError("KEY VALUE overrides apply to --ckpt models only; an exported model has no config")
        if args.split and args.model:
            raise ModelInputError(SPLIT_NEEDS_CHECKPOINT)
        # List the images before loading a model: an empty folder or a bad list fails at once.
        gallery = images_source(args.images) if args.images else list_source(args.list) if args.list else None
        embedder = load_embedder(args.ckpt, args.model, args.device, args.opts or None)
        if gallery is None:
            gallery = split_source(embedder, args.split)
        summary = build_index(embedder, gallery, args.out, index_type=args.index_type, train_size=args.train_size,
                              search_params=args.search_params, add=args.add, overwrite=args.overwrite,
                              batch_size=args.batch_size, workers=args.workers, skip_bad=args.skip_bad,
                              progress=not args.no_progress)
    except _EXPECTED as err:
        fail(err, 2, args.debug)
    except KeyboardInterrupt:
        parser.exit(130, f"interrupted: {args.out} is as it was before this command\n")
    print(summary)
    return 0


def search_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="xbm-search", description="Find the gallery images most similar to query images.")
    parser.add_argument("--index", required=True, metavar="INDEX_DIR", help="index folder written by xbm-index")
    parser.add_argument("--query", required=True, metavar="IMAGE_OR_DIR", help="an image, or a folder of images")
    parser.add_argument("--topk", type=int, default=5, help="results per query (default 5)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="also draw each query (the first 20) and its results")
    parser.add_argument("--search-params", default=None,
                        help="override the index's stored faiss search parameters, e.g. nprobe=64")
    _model_options(parser, required=False)
    parser.epilog = "Without --ckpt/--model the model that built the index is used (its path is in index.json)."
    args = parser.parse_args(argv)
    from .gallery import (
        check_same_model,
        format_results,
        model_of_index,
        plot_results,
        search_images,
        write_json,
    )
    from .index import load_index
    from .models import load_embedder

    try:
        if args.topk < 1:
            raise ValueError(f"--topk must be at least 1, got {args.topk}")
        gallery = load_index(args.index)
        queries = image_paths(args.query)
        if args.ckpt or args.model:
            embedder = load_embedder(args.ckpt, args.model, args.device)
        else:
            embedder = model_of_index(gallery, args.index, args.device)
        check_same_model(gallery, embedder, args.index)
        results = search_images(gallery, embedder, queries, args.topk, args.search_params,
                                batch_size=args.batch_size, workers=args.workers)
        print(format_results(queries, results))
        if args.json:
            write_json(args.json, args.index, gallery, embedder, queries, results, args.topk)
            print(f"wrote {args.json}", file=sys.stderr)
        if args.plot:
            rows = plot_results(args.plot, gallery, queries, results)
            print(f"wrote {args.plot} ({rows} queries)", file=sys.stderr)
    except _EXPECTED as err:
        fail(err, 2, args.debug)
    return 0


def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="xbm-export",
        description="Export a checkpoint's embedding model (backbone + head + L2 normalisation) with a JSON sidecar.")
    parser.add_argument("--ckpt", required=True, help="training checkpoint (.pth) written by xbm-train")
    parser.add_argument("--format", required=True, choices=["torchscript", "onnx"], help="file format")
    parser.add_argument("--out", required=True, metavar="FILE", help="model file; the sidecar is FILE.json")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides")
    args = parser.parse_args(argv)
    from .export import export_model

    try:
        meta = export_model(args.ckpt, args.format, args.out, args.opts or None)
    except _EXPECTED as err:
        fail(err, 2, args.debug)
    shape = "x".join(str(v) for v in meta["input"]["shape"])
    print(f"wrote {args.out} ({args.format}: {shape} {meta['input']['channel_order']} -> "
          f"{meta['output']['dim']}-d unit embeddings) and {args.out}.json")
    return 0
