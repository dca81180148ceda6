"""The multi-task fine-tuning loop of the reference's train_tasks.py, on modern PyTorch.

Each iteration visits every selected task in order; a task that the stop-and-go controller has "stopped" only
trains every `train_iter_gap`-th iteration. With no gradient accumulation each task's batch gets its own
optimiser step, as in the reference; with accumulation, gradients of all tasks are summed over the
accumulation window and applied once. Every task is validated after each pass over its training data.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from modelkit.precision import precision_autocast
from vilbert.checkpoint import load_model, save_checkpoint
from vilbert.configuration import ViLBertConfig
from vilbert.modeling import ViLBertForVLTasks
from vilbert.predictor import CHECKPOINT_FILE, CONFIG_FILE, VOCAB_FILE
from vilbert.tokenization import PACKAGED_VOCAB, Tokenizer

from .checkpointing import RESUME_FILE, ResumeError, load_resume, save_resume
from .datasets import TaskDataset
from .losses import compute_loss, forward
from .optimization import StopOnPlateau, build_optimizer, build_scheduler
from .specs import TaskSpec
from .streams import TaskStream, eval_batches

logger = logging.getLogger("vilbert_train")
# Epochs at which the reference resets every stop-and-go controller.
CONTROLLER_RESET_EPOCHS = (5, 7)
ANSWER_FILES = ("vqa_answers.json", "gqa_answers.json")


@dataclass
class RunContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> RunContext:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; one process per GPU (NCCL) or per CPU worker (gloo)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but no CUDA device is available")
    target = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return RunContext(rank, world_size, local_rank, target)


def resolve_vocab(bert_model: str) -> Path:
    """`bert-base-uncased` is the packaged vocabulary; otherwise a vocab.txt file or a folder holding one."""
    if bert_model in ("bert-base-uncased", ""):
        return PACKAGED_VOCAB
    path = Path(bert_model)
    path = path / "vocab.txt" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"--bert_model: no vocabulary at {path} (use bert-base-uncased or a vocab.txt)")
    return path


def resolve_checkpoint(from_pretrained: str) -> Path:
    """A checkpoint file, or a weights-bundle folder holding multi_task_model.bin."""
    path = Path(from_pretrained)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"--from_pretrained: checkpoint not found: {path} (a ViLBERT state dict such as pretrained_model.bin "
            "or multi_task_model.bin, or a weights bundle folder)")
    return path


def load_config(config_file: str, task_specific_tokens: bool) -> ViLBertConfig:
    path = Path(config_file)
    if not path.is_file():
        raise FileNotFoundError(f"--config_file not found: {path}")
    config = ViLBertConfig.from_json_file(path)
    if task_specific_tokens:
        config = ViLBertConfig.from_dict({**config.to_dict(), "task_specific_tokens": True})
    return config


def load_training_model(checkpoint: Path, config: ViLBertConfig, device: torch.device) -> ViLBertForVLTasks:
    """Strict when the checkpoint has every key (multi_task_model.bin); otherwise (pretrained_model.bin, which
    lacks the task heads) missing weights keep a fresh initialisation, as the reference's from_pretrained."""
    from vilbert.checkpoint import CheckpointError, read_state_dict

    state = read_state_dict(checkpoint)
    try:
        model = load_model(state, config, device=device, strict=True)
    except CheckpointError as exc:
        if "mis-shaped" in str(exc) or "unexpected" in str(exc):
            raise
        logger.warning("%s lacks some weights; they start from a fresh initialisation", checkpoint)
        model = load_model(state, config, device=device, strict=False)
    return model


def enable_gradient_checkpointing(model: ViLBertForVLTasks) -> int:
    """Recompute each transformer / co-attention layer in the backward pass instead of storing activations."""
    from torch.utils.checkpoint import checkpoint

    encoder = model.bert.encoder
    layers = [*encoder.layer, *encoder.v_layer, *encoder.c_layer]
    for module in layers:
        original = module.forward

        def wrapped(*args, _forward=original, _module=module):
            if _module.training and torch.is_grad_enabled():
                return checkpoint(_forward, *args, use_reentrant=False)
            return _forward(*args)

        module.forward = wrapped
    return len(layers)


class OutputsAsDict(torch.nn.Module):
    """DDP finds the tensors of a forward's result (to detect unused parameters) in dicts, not dataclasses."""

    def __init__(self, model: ViLBertForVLTasks):
        super().__init__()
        self.model = model

    def forward(self, **inputs: torch.Tensor) -> dict[str, Any]:
        return dict(vars(self.model(**inputs)))


def freeze_text(model: ViLBertForVLTasks, last_layer: int) -> int:
    """--freeze N: the text embeddings and text layers 0..N stop training (the reference meant this; its name
    check against a `module.` prefix made the flag do nothing)."""
    frozen = 0
    prefixes = ("bert.embeddings.",) + tuple(f"bert.encoder.layer.{i}." for i in range(last_layer + 1))
    for name, param in model.named_parameters():
        if name.startswith(prefixes) and "task_embeddings" not in name:
            param.requires_grad_(False)
            frozen += 1
    return frozen


def save_folder_name(specs: list[TaskSpec], config_file: str, save_name: str) -> str:
    """The reference's `<task names>_<config name>-<save_name>`."""
    name = "-".join(s.yml_name for s in specs) + "_" + Path(config_file).stem
    return name + (f"-{save_name}" if save_name else "")


def autocast(ctx: RunContext, precision: str) -> torch.autocast:
    return precision_autocast(ctx.device.type, precision)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate_split(model: torch.nn.Module, dataset: TaskDataset, spec: TaskSpec, ctx: RunContext, batch_size: int,
                   precision: str = "fp32", num_workers: int = 0) -> dict[str, float]:
    """Mean loss and metric (VQA score or accuracy) of the task's training-time metric, over all ranks."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)
    for batch in eval_batches(dataset, batch_size, ctx.rank, ctx.world_size, num_workers):
        batch = to_device(batch, ctx.device)
        with autocast(ctx, precision):
            output = forward(model, batch, spec)
        result = compute_loss(output, batch, spec)
        totals += torch.tensor([float(result.loss) * result.count, result.score, result.count], dtype=torch.float64)
    if ctx.distributed:
        totals = totals.to(ctx.device)
        dist.all_reduce(totals)
        totals = totals.cpu()
    model.train(was_training)
    count = max(1.0, float(totals[2]))
    return {"loss": float(totals[0]) / count, "score": float(totals[1]) / count, "count": int(totals[2])}


def write_bundle_extras(folder: Path, config: ViLBertConfig, vocab: Path, from_pretrained: Path, data_root: Path) -> list[str]:
    """Make the save folder a weights bundle for `vilbert.Predictor.from_dir`: config, vocabulary and the
    answer lists (copied from the bundle we started from, or converted from the dataset's label2ans pickles)."""
    config.to_json_file(folder / CONFIG_FILE)
    if vocab.resolve() != (folder / VOCAB_FILE).resolve():
        shutil.copyfile(vocab, folder / VOCAB_FILE)
    missing = []
    sources = {"vqa_answers.json": data_root / "VQA" / "cache" / "trainval_label2ans.pkl",
               "gqa_answers.json": data_root / "gqa" / "cache" / "trainval_label2ans.pkl"}
    for name in ANSWER_FILES:
        bundled = from_pretrained.parent / name
        if bundled.is_file():
            if bundled.resolve() != (folder / name).resolve():
                shutil.copyfile(bundled, folder / name)
        elif sources[name].is_file():
            from .safe_pickle import load_label2ans

            (folder / name).write_text(json.dumps(load_label2ans(sources[name])), encoding="utf-8")
        elif not (folder / name).is_file():
            missing.append(name)
    return missing


class Trainer:
    def __init__(self, args: Any, specs: list[TaskSpec], ctx: RunContext):
        self.args, self.specs, self.ctx = args, specs, ctx
        self.data_root = Path(args.data_root)
        torch.manual_seed(args.seed + ctx.rank)
        self.vocab = resolve_vocab(args.bert_model)
        tokenizer = Tokenizer(self.vocab)
        world = ctx.world_size
        self.train_sets, self.val_sets, self.streams = [], [], []
        features = dict(args.features or {})
        for spec in specs:
            train = TaskDataset(spec, spec.train_split, self.data_root, tokenizer, args.seed, features.get(spec.name))
            val = TaskDataset(spec, spec.val_split, self.data_root, tokenizer, args.seed, features.get(spec.name),
                              four_way=True)
            per_rank = max(1, spec.batch_size // args.gradient_accumulation_steps // world)
            self.train_sets.append(train)
            self.val_sets.append(val)
            self.streams.append(TaskStream(train, per_rank, args.seed, spec.task_id, ctx.rank, world, args.num_workers))
        base_lr = min(s.lr for s in specs)
        self.loss_scale = [s.lr / base_lr for s in specs]
        # The reference's "median_num_iter" is the largest per-task iteration count per epoch (here each task
        # uses its own num_epoch; the reference used the last task's for all, a bug).
        self.iters_per_epoch = max(
            max(1, math.ceil(s.num_epoch * len(st) * args.train_iter_multiplier / args.num_train_epochs))
            for s, st in zip(specs, self.streams))
        self.total_iters = self.iters_per_epoch * args.num_train_epochs
        self.total_steps = math.ceil(self.total_iters / args.gradient_accumulation_steps)
        warmup = int(args.warmup_proportion * self.total_steps)

        self.config = load_config(args.config_file, args.task_specific_tokens)
        self.checkpoint = resolve_checkpoint(args.from_pretrained)
        model = load_training_model(self.checkpoint, self.config, ctx.device)
        self.config = model.config
        if getattr(args, "freeze", -1) >= 0:
            freeze_text(model, args.freeze)
        if args.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        self.model = model
        self.wrapped: torch.nn.Module = model
        if ctx.distributed:
            self.wrapped = DistributedDataParallel(
                OutputsAsDict(model), device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                find_unused_parameters=True)  # each task reads one head: the others get no gradient
        self.optimizer = build_optimizer(model, base_lr, args.vil_learning_rate, args.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, args.lr_scheduler, self.total_steps, warmup,
                                         math.ceil(self.iters_per_epoch / args.gradient_accumulation_steps))
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=args.precision == "fp16" and ctx.device.type == "cuda")
        self.controllers = [StopOnPlateau() for _ in specs]
        self.save_dir = Path(args.output_dir) / save_folder_name(specs, args.config_file, args.save_name)
        self.iteration = 0  # iterations done (all epochs)
        self.since_eval = [0] * len(specs)
        self.log_path = self.save_dir / "train_log.jsonl"
        self.resume_path = None
        if args.resume_file:
            self.resume_path = Path(args.resume_file)
        elif args.resume and (self.save_dir / RESUME_FILE).is_file():
            self.resume_path = self.save_dir / RESUME_FILE
        if ctx.is_main:
            self.save_dir.mkdir(parents=True, exist_ok=True)
        if self.resume_path:
            self._resume(self.resume_path)
        elif ctx.is_main:
            self.log_path.write_text("", encoding="utf-8")
            (self.save_dir / "command.json").write_text(json.dumps(vars(args), indent=2, default=str), encoding="utf-8")

    # ------------------------------------------------------------------------------------------------------

    def _resume(self, path: Path) -> None:
        state = load_resume(path)
        if state["task_ids"] != [s.task_id for s in self.specs]:
            raise ResumeError(f"{path}: saved for tasks {state['task_ids']}, this run has {[s.task_id for s in self.specs]}")
        self.model.load_state_dict(state["model_state_dict"])
        self.optimizer.load_state_dict(state["optimizer_state_dict"])
        self.scheduler.load_state_dict(state["scheduler_state_dict"])
        if "scaler_state_dict" in state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler_state_dict"])
        self.iteration = int(state["iteration"])
        self.since_eval = list(state["since_eval"])
        for stream, s in zip(self.streams, state["streams"]):
            stream.load_state_dict(s)
        for controller, s in zip(self.controllers, state["controllers"]):
            controller.load_state_dict(s)
        rng = state["rng"]
        torch.set_rng_state(rng["cpu"][self.ctx.rank % len(rng["cpu"])])
        if self.ctx.device.type == "cuda" and rng.get("cuda"):
            torch.cuda.set_rng_state(rng["cuda"][self.ctx.rank % len(rng["cuda"])], self.ctx.device)
        if int(state.get("world_size", 1)) != self.ctx.world_size:
            logger.warning("%s was saved by %s process(es), this run has %d: the data order will not continue "
                           "exactly", path, state.get("world_size"), self.ctx.world_size)
        if self.ctx.is_main:
            self._trim_log()
            logger.info("resumed from %s at iteration %d", path, self.iteration)

    def _trim_log(self) -> None:
        """Drop log records of iterations after the resume point (a run that crashed after its last save)."""
        if not self.log_path.is_file():
            return
        kept = []
        for line in self.log_path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            done = record["iteration"] + (0 if "eval" in record else 1)  # eval records count finished iterations
            if done <= self.iteration:
                kept.append(line)
        self.log_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def _gather_rng(self) -> dict[str, list[torch.Tensor]]:
        cpu = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state(self.ctx.device) if self.ctx.device.type == "cuda" else None
        if not self.ctx.distributed:
            return {"cpu": [cpu], "cuda": [cuda] if cuda is not None else []}
        gathered: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(gathered, (cpu, cuda))
        return {"cpu": [g[0] for g in gathered], "cuda": [g[1] for g in gathered if g[1] is not None]}

    def save_resume_state(self) -> None:
        rng = self._gather_rng()  # collective: every rank takes part
        if self.ctx.is_main:
            save_resume(self.save_dir / RESUME_FILE, {
                "task_ids": [s.task_id for s in self.specs],
                "model_state_dict": self.model.state_dict(),
                "optimizer_state_dict": self.optimizer.state_dict(),
                "scheduler_state_dict": self.scheduler.state_dict(),
                "scaler_state_dict": self.scaler.state_dict(),
                "iteration": self.iteration,
                "epoch": self.iteration // self.iters_per_epoch,
                "since_eval": list(self.since_eval),
                "streams": [s.state_dict() for s in self.streams],
                "controllers": [c.state_dict() for c in self.controllers],
                "rng": rng,
                "world_size": self.ctx.world_size,
            })
        self.barrier()

    def save_epoch(self, epoch: int) -> None:
        if self.ctx.is_main:
            path = self.save_dir / f"pytorch_model_{epoch}.bin"
            save_checkpoint(self.model, path)
            bundle = self.save_dir / CHECKPOINT_FILE
            tmp = bundle.with_name(bundle.name + ".tmp")
            shutil.copyfile(path, tmp)
            os.replace(tmp, bundle)
            missing = write_bundle_extras(self.save_dir, self.config, self.vocab, self.checkpoint, self.data_root)
            if missing and epoch == 0:
                logger.warning("no %s to copy: the save folder is not a complete service bundle",
                               " / ".join(missing))
        self.save_resume_state()

    def barrier(self) -> None:
        if self.ctx.distributed:
            dist.barrier()

    def log(self, record: dict) -> None:
        if self.ctx.is_main:
            with self.log_path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------------------------------------------

    def _train_task(self, index: int) -> tuple[float, float, int]:
        spec, args = self.specs[index], self.args
        batch = to_device(self.streams[index].next_batch(), self.ctx.device)
        with autocast(self.ctx, args.precision):
            output = forward(self.wrapped, batch, spec)
        result = compute_loss(output, batch, spec)
        loss = result.loss * self.loss_scale[index] / args.gradient_accumulation_steps
        self.scaler.scale(loss).backward()
        return float(result.loss.detach()), result.score, result.count

    def _optimizer_step(self) -> None:
        if self.args.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def _validate(self, index: int, epoch: int) -> dict[str, float]:
        spec = self.specs[index]
        metrics = evaluate_split(self.wrapped, self.val_sets[index], spec, self.ctx, self.streams[index].batch_size,
                                 self.args.precision, self.args.num_workers)
        self.controllers[index].step(metrics["score"])
        self.log({"eval": spec.name, "split": spec.val_split, "epoch": epoch, "iteration": self.iteration,
                  "in_stop": self.controllers[index].in_stop, **metrics})
        if self.ctx.is_main:
            logger.info("validation %s (%s) epoch %d: score %.4f loss %.4f", spec.name, spec.val_split, epoch,
                        metrics["score"], metrics["loss"])
        return metrics

    def train(self) -> Path:
        args, accum = self.args, self.args.gradient_accumulation_steps
        if self.ctx.is_main:
            logger.info("training %s: %d iterations per epoch, %d epochs, %d optimiser steps, %d process(es) on %s",
                        ", ".join(s.name for s in self.specs), self.iters_per_epoch, args.num_train_epochs,
                        self.total_steps, self.ctx.world_size, self.ctx.device)
        start_epoch = self.iteration // self.iters_per_epoch
        stop_at = args.stop_after_steps if args.stop_after_steps else None
        for epoch in range(start_epoch, args.num_train_epochs):
            if epoch in CONTROLLER_RESET_EPOCHS and self.iteration % self.iters_per_epoch == 0:
                for controller in self.controllers:
                    controller.reset()
            first = self.iteration - epoch * self.iters_per_epoch
            bar = tqdm(range(first, self.iters_per_epoch), desc=f"epoch {epoch}", disable=not self.ctx.is_main,
                       dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
            for step in bar:
                postfix = {}
                for index, spec in enumerate(self.specs):
                    if self.controllers[index].in_stop and self.iteration % args.train_iter_gap != 0:
                        continue
                    loss, score, count = self._train_task(index)
                    if accum == 1:
                        self._optimizer_step()
                    self.log({"iteration": self.iteration, "epoch": epoch, "task": spec.name, "loss": loss,
                              "score": score / max(1, count), "lr": self.optimizer.param_groups[0]["lr"]})
                    postfix[spec.name] = f"loss {loss:.3f} score {score / max(1, count):.3f}"
                if accum > 1 and (self.iteration + 1) % accum == 0:
                    self._optimizer_step()
                if accum == 1 or (self.iteration + 1) % accum == 0:
                    self.scheduler.step()
                self.iteration += 1
                bar.set_postfix(postfix, refresh=False)
                last = self.iteration == self.total_iters
                for index in range(len(self.specs)):
                    self.since_eval[index] += 1
                    if self.since_eval[index] >= len(self.streams[index]) or last:
                        self.since_eval[index] = 0
                        self._validate(index, epoch)
                if stop_at is not None and self.iteration >= stop_at and not last:
                    bar.close()
                    if self.iteration % self.iters_per_epoch == 0:
                        self.save_epoch(epoch)
                    else:
                        self.save_resume_state()
                    if self.ctx.is_main:
                        logger.info("stopping after %d iterations as asked; resume with --resume", self.iteration)
                    return self.save_dir
                if args.save_every_steps and self.iteration % args.save_every_steps == 0:
                    self.save_resume_state()
            bar.close()
            self.save_epoch(epoch)
        return self.save_dir
