"""train_tasks.py end to end on a tiny model and synthetic data in the official formats: it learns, resumes
exactly, and its checkpoints load strictly into the service's predictor and back into training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import eval_tasks
import train_tasks
from vilbert import Predictor, ImageRegions
from vilbert.checkpoint import load_model, read_state_dict
from vilbert.configuration import ViLBertConfig
from vilbert.tiny import write_tiny_vilbert
from vilbert_train import synthetic
from vilbert_train.engine import enable_gradient_checkpointing
from vilbert_train.losses import compute_loss, forward
from vilbert_train.optimization import StopOnPlateau, build_scheduler, parameter_groups
from vilbert_train.specs import SPECS
from vilbert_train.datasets import TaskDataset
from vilbert.tokenization import Tokenizer
from torch.utils.data import default_collate

DIM = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("train")
    write_tiny_vilbert(work / "tiny", feature_dim=DIM)
    config = json.loads((work / "tiny" / "vilbert_config.json").read_text())
    # attention dropout off: SDPA's dropout path is slow on CPU; hidden dropout stays on (RNG matters on resume)
    config.update(attention_probs_dropout_prob=0.0, v_attention_probs_dropout_prob=0.0)
    (work / "tiny" / "train_config.json").write_text(json.dumps(config))
    synthetic.write_snli_ve(work / "datasets", DIM)
    synthetic.write_nlvr2(work / "datasets", DIM)
    return work


def classic(work: Path, out: str, *extra: str) -> list[str]:
    """The classic README command, plus the data root and the sizes of a tiny run."""
    return ["--bert_model", "bert-base-uncased", "--from_pretrained", str(work / "tiny" / "multi_task_model.bin"),
            "--config_file", str(work / "tiny" / "train_config.json"), "--tasks", "13", "--lr_scheduler",
            "warmup_linear", "--train_iter_gap", "4", "--task_specific_tokens", "--save_name",
            "finetune_from_multi_task_model", "--data_root", str(work / "datasets"), "--output_dir", str(work / out),
            "--num_workers", "0", "--batch_size", "8", *extra]


def run_dir(work: Path, out: str) -> Path:
    return work / out / "VisualEntailment_train_config-finetune_from_multi_task_model"


def train_losses(folder: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    return [(r["iteration"], r["loss"]) for r in rows if "task" in r]


@pytest.fixture(scope="module")
def finished(work) -> Path:
    """An uninterrupted 2-epoch run (6 iterations, stop-and-go active, dropout on)."""
    assert train_tasks.main(classic(work, "full", "--num_train_epochs", "2", "--num_epoch", "2")) == 0
    return run_dir(work, "full")


def test_tiny_model_learns_to_95_percent_training_accuracy(work, capsys):
    # 36 iterations of batch 8 over 24 examples; the task is never "stopped" (gap 1) so every iteration trains.
    args = classic(work, "learn", "--num_train_epochs", "1", "--num_epoch", "12", "--train_iter_gap", "1",
                   "--learning_rate", "2e-3", "--vil_learning_rate", "2e-3")
    assert train_tasks.main(args) == 0
    folder = run_dir(work, "learn")
    assert eval_tasks.main(["--from_pretrained", str(folder), "--tasks", "snli_ve", "--split", "train",
                            "--data_root", str(work / "datasets"), "--output_dir", str(work / "eval")]) == 0
    metrics = json.loads((work / "eval" / "multi_task_model" / "snli_ve_train_metrics.json").read_text())
    assert metrics["examples"] == 24
    assert metrics["accuracy"] >= 0.95
    losses = [loss for _, loss in train_losses(folder)]
    assert len(losses) == 36 and np.mean(losses[-6:]) < 0.9 * np.mean(losses[:6])


def test_resume_reproduces_the_uninterrupted_losses(work, finished):
    args = classic(work, "resumed", "--num_train_epochs", "2", "--num_epoch", "2")
    assert train_tasks.main(args + ["--stop_after_steps", "4"]) == 0  # stops mid-epoch 1
    folder = run_dir(work, "resumed")
    assert [i for i, _ in train_losses(folder)] == [0, 1, 2, 3]
    assert not (folder / "pytorch_model_1.bin").exists()
    with (folder / "train_log.jsonl").open("a") as log:  # as if the run had crashed after more iterations
        log.write(json.dumps({"iteration": 4, "epoch": 1, "task": "snli_ve", "loss": -1.0, "score": 0, "lr": 0}) + "\n")
    assert train_tasks.main(args + ["--resume"]) == 0
    expected, got = train_losses(finished), train_losses(folder)
    assert [i for i, _ in got] == [i for i, _ in expected] == list(range(6))
    assert [loss for _, loss in got] == [loss for _, loss in expected]  # bit-identical, not approximately
    a, b = read_state_dict(finished / "pytorch_model_1.bin"), read_state_dict(folder / "pytorch_model_1.bin")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_loader_worker_processes_give_the_same_batches(work, finished):
    args = classic(work, "workers", "--num_train_epochs", "2", "--num_epoch", "2", "--stop_after_steps", "3")
    args[args.index("--num_workers") + 1] = "2"
    assert train_tasks.main(args) == 0
    assert train_losses(run_dir(work, "workers")) == train_losses(finished)[:3]


def test_checkpoints_load_strictly_into_the_service_and_training(work, finished):
    config = ViLBertConfig.from_json_file(finished / "vilbert_config.json")
    state = read_state_dict(finished / "pytorch_model_1.bin")
    assert not any(k.startswith("module.") for k in state)
    load_model(state, config, strict=True)  # the official key set, nothing missing or extra
    resume = read_state_dict(finished / "pytorch_ckpt_latest.tar")  # its model_state_dict
    assert all(torch.equal(resume[k], state[k]) for k in state)

    predictor = Predictor.from_dir(finished)  # multi_task_model.bin + config + vocab + answer lists
    bundle = read_state_dict(finished / "multi_task_model.bin")
    assert all(torch.equal(bundle[k], state[k]) for k in state)
    rng = np.random.default_rng(0)
    image = ImageRegions(np.array([[10, 10, 50, 60], [100, 100, 200, 220]], np.float32),
                         rng.random((2, DIM), dtype=np.float32), 640, 480)
    result = predictor.predict([image], "a photo", ["snli_ve"])["snli_ve"]
    assert result["label"] in ("contradiction", "neutral", "entailment")

    # and back into training with --from_pretrained (strict load: train_tasks refuses unexpected keys)
    args = classic(work, "again", "--num_train_epochs", "1", "--num_epoch", "1", "--stop_after_steps", "1")
    args[args.index("--from_pretrained") + 1] = str(finished / "pytorch_model_1.bin")
    assert train_tasks.main(args) == 0


def test_stop_and_go_round_robin(work):
    """Two tasks in turn; once validation stops improving a task trains only every 4th iteration."""
    args = classic(work, "multi", "--tasks", "13-12", "--num_train_epochs", "1", "--num_epoch", "10")
    assert train_tasks.main(args) == 0
    folder = work / "multi" / "VisualEntailment-NLVR2_train_config-finetune_from_multi_task_model"
    rows = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    stopped = {"snli_ve": False, "nlvr2": False}
    trained_while_stopped = 0
    for row in rows:
        if "eval" in row:  # logged after `iteration` iterations are done
            stopped[row["eval"]] = row["in_stop"]
        elif stopped[row["task"]]:
            assert row["iteration"] % 4 == 0, row
            trained_while_stopped += 1
    assert trained_while_stopped >= 2  # the stop did happen (scores on the six-item dev split plateau early)
    iterations = [r["iteration"] for r in rows if r.get("task") == "snli_ve"]
    assert iterations[:3] == [0, 1, 2]  # both tasks train every iteration before any stop
    assert [r["task"] for r in rows if r.get("iteration") == 0] == ["snli_ve", "nlvr2"]  # in the given order


def test_from_pretraining_checkpoint_with_frozen_text_layers(work, caplog):
    """pretrained_model.bin has only bert.* (no task tokens) and cls.*: the task heads start fresh."""
    full = read_state_dict(work / "tiny" / "multi_task_model.bin")
    pretrained = {k: v for k, v in full.items()
                  if k.startswith(("bert.", "cls.")) and "task_embeddings" not in k}
    torch.save(pretrained, work / "pretrained_model.bin")
    args = classic(work, "pre", "--num_train_epochs", "1", "--num_epoch", "1", "--stop_after_steps", "2",
                   "--freeze", "1")
    args[args.index("--from_pretrained") + 1] = str(work / "pretrained_model.bin")
    assert train_tasks.main(args) == 0
    assert "lacks some weights" in caplog.text
    trained = torch.load(run_dir(work, "pre") / "pytorch_ckpt_latest.tar", weights_only=True)["model_state_dict"]
    assert set(trained) == set(full)  # the full official key set, task tokens and heads included
    for key in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.1.output.dense.weight"):
        assert torch.equal(trained[key], full[key])  # frozen
    for key in ("bert.encoder.layer.2.output.dense.weight", "bert.encoder.c_layer.0.biattention.query1.weight"):
        assert not torch.equal(trained[key], full[key])  # trained


def test_missing_data_is_named(work, tmp_path, capsys):
    args = classic(work, "missing")
    args[args.index("--data_root") + 1] = str(tmp_path)
    assert train_tasks.main(args) == 2
    assert f"{tmp_path}/visual_entailment/snli_ve_train.jsonl" in capsys.readouterr().err


def test_resume_file_of_other_tasks_is_refused(work, finished, capsys):
    args = classic(work, "other", "--tasks", "12", "--resume_file", str(finished / "pytorch_ckpt_latest.tar"))
    assert train_tasks.main(args) == 2
    assert "saved for tasks [13], this run has [12]" in capsys.readouterr().err


def test_unknown_task_is_refused(work):
    with pytest.raises(SystemExit, match="unknown task"):
        train_tasks.main(classic(work, "x", "--tasks", "13-99"))


def test_bf16_autocast_and_gradient_accumulation_run(work):
    args = classic(work, "bf16", "--num_train_epochs", "1", "--num_epoch", "1", "--precision", "bf16",
                   "--gradient_accumulation_steps", "2", "--gradient_checkpointing", "--stop_after_steps", "2")
    assert train_tasks.main(args) == 0
    folder = run_dir(work, "bf16")
    losses = [loss for _, loss in train_losses(folder)]
    assert len(losses) == 2 and all(np.isfinite(losses))
    state = torch.load(folder / "pytorch_ckpt_latest.tar", weights_only=True)
    assert state["iteration"] == 2 and state["scheduler_state_dict"]["last_epoch"] == 1  # one step per 2 iterations
    start = read_state_dict(work / "tiny" / "multi_task_model.bin")
    assert not torch.equal(state["model_state_dict"]["vil_tri_prediction.weight"], start["vil_tri_prediction.weight"])


def test_gradient_checkpointing_gives_the_same_gradients(work):
    config = ViLBertConfig.from_json_file(work / "tiny" / "train_config.json")
    ds = TaskDataset(SPECS[13], "train", work / "datasets", Tokenizer())
    batch = {k: torch.as_tensor(v) for k, v in default_collate([ds[i] for i in range(4)]).items()}
    grads = []
    for checkpointing in (False, True):
        model = load_model(work / "tiny" / "multi_task_model.bin", config).train()
        if checkpointing:
            assert enable_gradient_checkpointing(model) == 4 + 3 + 2
        torch.manual_seed(0)
        compute_loss(forward(model, batch, SPECS[13]), batch, SPECS[13]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


def test_parameter_groups_follow_the_reference():
    config = ViLBertConfig.from_json_file(Path(__file__).resolve().parent.parent / "config" / "bert_base_6layer_6conect.json")
    with torch.device("meta"):
        from vilbert.modeling import ViLBertForVLTasks

        model = ViLBertForVLTasks(config)
    groups = parameter_groups(model, 2e-5, 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert by_name["vil_prediction.logit_fc.0.weight"] == (1e-4, 0.01)
    assert by_name["vil_tri_prediction.bias"] == (1e-4, 0.0)
    assert by_name["vision_logit.weight"] == (2e-5, 0.01)  # not a vil_ head
    assert by_name["bert.encoder.layer.0.attention.output.LayerNorm.weight"] == (2e-5, 0.0)
    assert by_name["bert.encoder.c_layer.0.biOutput.dense1.bias"] == (2e-5, 0.0)
    assert "cls.predictions.decoder.weight" not in by_name  # tied to the word embeddings: one parameter


def test_warmup_linear_schedule():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = build_scheduler(optimizer, "warmup_linear", total_steps=10, warmup_steps=2, steps_per_epoch=5)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])


def test_stop_and_go_controller():
    c = StopOnPlateau()
    for score in (0.5, 0.6):
        c.step(score)
    assert not c.in_stop
    c.step(0.6)  # first non-improving validation: patience 1 tolerates it
    assert not c.in_stop
    c.step(0.6)  # second: the task stops (trained every train_iter_gap-th iteration)
    assert c.in_stop
    c.step(0.599)  # within 0.5 % of the best: stays stopped
    assert c.in_stop
    c.step(0.59)  # dropped more than 0.5 % below the best: switched back on
    assert not c.in_stop
    state = c.state_dict()
    d = StopOnPlateau()
    d.load_state_dict(state)
    assert d.state_dict() == state


def test_cost_estimate_counts_flops_and_saved_activations(work):
    from vilbert_train.estimate import measure

    config = ViLBertConfig.from_json_file(work / "tiny" / "train_config.json")
    with torch.device("meta"):
        from vilbert.modeling import ViLBertForVLTasks

        model = ViLBertForVLTasks(config).train()
    small, large, larger = (measure(model, SPECS[13], b) for b in (2, 4, 6))
    assert small["flops_per_step"] > 2 * small["forward_flops"] > 0  # backward costs about twice the forward
    assert large["flops_per_step"] == pytest.approx(2 * small["flops_per_step"], rel=1e-3)  # linear in the batch
    # saved tensors = weights (constant) + activations (linear in the batch)
    step = large["activation_bytes"] - small["activation_bytes"]
    assert step > 0 and larger["activation_bytes"] - large["activation_bytes"] == pytest.approx(step, rel=1e-3)
