#!/usr/bin/env python
"""Evaluate a ViLBERT checkpoint with the paper's metric of each task, and write prediction files.

    python eval_tasks.py --bert_model bert-base-uncased --from_pretrained save/<run>/pytorch_model_19.bin \
        --config_file config/bert_base_6layer_6conect.json --tasks 1 --split minval --task_specific_tokens

Metrics: VQA / GQA / Genome QA soft score, accuracy (SNLI-VE, NLVR2, Visual7W, GuessWhat), grounding accuracy at
IoU > 0.5 (RefCOCO/+/g), retrieval R@1/5/10 with median and mean rank (every caption against every image of the
split). `--split test` for VQA and GQA writes the evaluation servers' result files. See docs/TRAINING.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bert_model", default="bert-base-uncased")
    p.add_argument("--from_pretrained", required=True, help="checkpoint file or weights-bundle folder")
    p.add_argument("--config_file", default=None,
                   help="default: the bundle's vilbert_config.json, else config/bert_base_6layer_6conect.json")
    p.add_argument("--tasks", required=True, help="'-'-separated task ids or registry names")
    p.add_argument("--split", default=None, help="split to evaluate (default: each task's validation split); "
                                                "TASK=SPLIT to set one task's")
    p.add_argument("--data_root", "--dataroot", default="datasets")
    p.add_argument("--features", action="append", default=[], help="TASK=PATH region features to read instead")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--output_dir", default="results")
    p.add_argument("--save_name", default="")
    p.add_argument("--task_specific_tokens", action="store_true")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--device", default="auto")
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--do_lower_case", default="True", help="accepted for compatibility; always lower-cased")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from vilbert.tasks import UnknownTaskError
    from vilbert.tokenization import Tokenizer
    from vilbert_train.annotations import AnnotationError
    from vilbert_train.features import FeatureFileError
    from vilbert_train.pickles import UnsafePickleError
    from vilbert_train.datasets import TaskDataset
    from vilbert_train.engine import (load_config, load_training_model, resolve_checkpoint, resolve_vocab,
                                      setup_distributed)
    from vilbert_train.evaluation import evaluate_task, load_answers, write_json
    from vilbert_train.specs import resolve_tasks

    try:
        specs = resolve_tasks(args.tasks)
    except (UnknownTaskError, ValueError) as exc:
        raise SystemExit(f"--tasks: {exc}")
    checkpoint = resolve_checkpoint(args.from_pretrained)
    model_dir = checkpoint.parent
    config_file = args.config_file
    if config_file is None:
        bundled = model_dir / "vilbert_config.json"
        config_file = str(bundled if bundled.is_file() else Path(__file__).resolve().parent / "config"
                          / "bert_base_6layer_6conect.json")
    ctx = setup_distributed(args.device)
    if ctx.distributed:
        raise SystemExit("eval_tasks.py runs in one process; use one GPU")
    features = dict(f.split("=", 1) for f in args.features)
    splits = {}
    for value in ([args.split] if args.split else []):
        for part in value.split(","):
            task, sep, split = part.rpartition("=")
            splits[task if sep else "*"] = split
    try:
        config = load_config(config_file, args.task_specific_tokens)
        model = load_training_model(checkpoint, config, ctx.device).eval()
        tokenizer = Tokenizer(resolve_vocab(args.bert_model))
        data_root = Path(args.data_root)
        out_dir = Path(args.output_dir) / (args.save_name or checkpoint.stem)
        summary = []
        for spec in specs:
            split = splits.get(spec.name, splits.get(str(spec.task_id), splits.get("*", spec.val_split)))
            dataset = TaskDataset(spec, split, data_root, tokenizer, args.seed, features.get(spec.name), four_way=False)
            answers = load_answers(spec, model_dir, data_root) if spec.answers else None
            result, predictions = evaluate_task(model, dataset, ctx, args.batch_size, answers, args.precision,
                                                args.num_workers)
            write_json(out_dir / f"{spec.name}_{split}_result.json", predictions)
            write_json(out_dir / f"{spec.name}_{split}_metrics.json", result)
            summary.append(result)
            logging.getLogger("vilbert_train").info("%s", json.dumps(result))
    except (FileNotFoundError, AnnotationError, FeatureFileError, UnsafePickleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
