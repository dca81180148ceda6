#!/usr/bin/env python
"""Fine-tune ViLBERT on one or more of the 12-in-1 tasks (the reference's train_tasks.py, on modern PyTorch).

The classic command works unchanged:

    python train_tasks.py --bert_model bert-base-uncased --from_pretrained <multi_task_model.bin> \
        --config_file config/bert_base_6layer_6conect.json --tasks 13 --lr_scheduler warmup_linear \
        --train_iter_gap 4 --task_specific_tokens --save_name finetune_from_multi_task_model

Data is read from --data_root (default `datasets`, the reference's layout). Multi-GPU: `torchrun
--nproc_per_node N train_tasks.py ...`. See docs/TRAINING.md.
"""

from __future__ import annotations

import argparse
import logging
import sys

from vilbert_train.optimization import SCHEDULERS


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "y"):
        return True
    if value.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _feature_override(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError("expected TASK=PATH, e.g. vqa=features/coco_store")
    return name, path


def split_for(spec, overrides: list[str]) -> str | None:
    """The last matching override: `TASK=SPLIT` (registry name or task id) or a bare `SPLIT` for every task."""
    chosen = None
    for value in overrides:
        task, sep, split = value.rpartition("=")
        if not sep or task in (spec.name, str(spec.task_id)):
            chosen = split
    return chosen


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The reference's options (same names and defaults, except where noted in docs/TRAINING.md).
    p.add_argument("--bert_model", default="bert-base-uncased", help="WordPiece vocabulary: bert-base-uncased or a vocab.txt")
    p.add_argument("--from_pretrained", default="bert-base-uncased",
                   help="ViLBERT checkpoint (pretrained_model.bin / multi_task_model.bin) or a weights-bundle folder")
    p.add_argument("--output_dir", default="save")
    p.add_argument("--config_file", default="config/bert_base_6layer_6conect.json")
    p.add_argument("--num_train_epochs", type=int, default=20)
    p.add_argument("--train_iter_multiplier", type=float, default=1.0)
    p.add_argument("--train_iter_gap", type=int, default=4, help="a stopped task trains every Nth iteration")
    p.add_argument("--warmup_proportion", type=float, default=0.1)
    p.add_argument("--do_lower_case", type=_bool, default=True, help="must stay true (bert-base-uncased)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--fp16", action="store_true", help="same as --precision fp16")
    p.add_argument("--num_workers", type=int, default=4)
    p.add_argument("--save_name", default="")
    p.add_argument("--in_memory", type=_bool, default=False, help="accepted; features are memory-mapped LMDB reads")
    p.add_argument("--optim", default="AdamW", choices=["AdamW"])
    p.add_argument("--tasks", default="", help="'-'-separated task ids (1-2-4-...) or registry names (vqa-gqa)")
    p.add_argument("--freeze", type=int, default=-1,
                   help="freeze the text embeddings and text layers 0..N (-1: train everything)")
    p.add_argument("--lr_scheduler", default="warmup_linear", choices=SCHEDULERS)
    p.add_argument("--resume_file", default="")
    p.add_argument("--task_specific_tokens", action="store_true")
    p.add_argument("--visual_target", type=int, default=0, choices=[0], help="only 0 (pre-training objective)")
    # Ours.
    p.add_argument("--data_root", "--dataroot", default="datasets", help="folder with the reference's datasets/ layout")
    p.add_argument("--features", type=_feature_override, action="append",
                   help="TASK=PATH: read TASK's detected regions from PATH (released LMDB or our FeatureStore)")
    p.add_argument("--batch_size", type=int, help="override every task's batch size (total over GPUs)")
    p.add_argument("--learning_rate", type=float, help="override every task's learning rate")
    p.add_argument("--vil_learning_rate", type=float, default=1e-4, help="learning rate of the vil_* heads")
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--max_grad_norm", type=float, default=0.0, help="clip gradients (0: off, as the reference)")
    p.add_argument("--num_epoch", type=int, help="override every task's num_epoch (the yml value)")
    p.add_argument("--train_split", action="append", default=[],
                   help="override the training split: SPLIT for every task, or TASK=SPLIT (repeatable)")
    p.add_argument("--val_split", action="append", default=[],
                   help="override the validation split: SPLIT for every task, or TASK=SPLIT (repeatable)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast precision")
    p.add_argument("--gradient_checkpointing", action="store_true", help="recompute layers in backward (less memory)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--resume", action="store_true", help="continue from <save folder>/pytorch_ckpt_latest.tar if present")
    p.add_argument("--save_every_steps", type=int, default=0, help="also write the resume file every N iterations")
    p.add_argument("--stop_after_steps", type=int, default=0,
                   help="save the resume file and exit after N iterations (time-limited jobs)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.fp16:
        args.precision = "fp16"
    if not args.do_lower_case:
        raise SystemExit("--do_lower_case false is not supported: the released model uses bert-base-uncased")
    if args.gradient_accumulation_steps < 1:
        raise SystemExit("--gradient_accumulation_steps must be at least 1")
    if args.in_memory:
        logging.getLogger("vilbert_train").info("--in_memory: region features are read through a memory-mapped LMDB")

    from vilbert.tasks import UnknownTaskError
    from vilbert_train.annotations import AnnotationError
    from vilbert_train.features import FeatureFileError
    from vilbert_train.pickles import UnsafePickleError
    from vilbert_train.engine import ResumeError, Trainer, setup_distributed
    from vilbert_train.specs import resolve_tasks, with_overrides

    try:
        specs = [with_overrides(s, batch_size=args.batch_size, lr=args.learning_rate, num_epoch=args.num_epoch,
                                train_split=split_for(s, args.train_split), val_split=split_for(s, args.val_split))
                 for s in resolve_tasks(args.tasks)]
    except (UnknownTaskError, ValueError) as exc:
        raise SystemExit(f"--tasks: {exc}")
    args.features = dict(args.features or [])
    ctx = setup_distributed(args.device)
    try:
        trainer = Trainer(args, specs, ctx)
        save_dir = trainer.train()
    except (FileNotFoundError, AnnotationError, FeatureFileError, UnsafePickleError, ResumeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if ctx.is_main:
        print(f"saved to {save_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
