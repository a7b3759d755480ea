"""The trainer: the objective against the reference loss, accelerate launch with checkpoint and resume,
two CPU processes, and a transformers backbone loaded from a folder."""

import json
import math
from argparse import Namespace

import pytest
import torch
import torch.nn.functional as F

from debias.data import BatchAugment, CounterfactualTrainSet
from debias.losses import clad_infonce
from debias.models import ClassifierWithFeatures, build_model
from debias.train import Objective
from tests.conftest import accelerate_launch, python_script, run_script

ARGS = Namespace(temperature=0.2, lambda_con=1.0, queue_size=4)


def _batch(tiny_dataset, method):
    from datasets import load_dataset

    ds = load_dataset(str(tiny_dataset))["train"]
    ts = CounterfactualTrainSet(
        ds, 32, need_positives=method != "erm", need_negatives=method.startswith("clad")
    )
    loader = torch.utils.data.DataLoader(ts, batch_size=6, shuffle=False)
    return next(iter(loader))


@pytest.mark.parametrize("method", ["erm", "augment", "clad", "clad+"])
def test_objective_equals_the_written_out_loss(tiny_dataset, method):
    torch.manual_seed(0)
    model, pre = build_model("small-resnet", ["a", "b", "c"], 32, widths=(8, 8, 16, 16))
    net = ClassifierWithFeatures(model).eval()  # eval: batch composition does not change features
    identity = BatchAugment(pre.mean, pre.std, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, jitter=0.0)
    obj = Objective(method, identity, 3, net.feature_dim, ARGS)
    batch = _batch(tiny_dataset, method)
    if obj.dictionary is not None:  # a dictionary with known contents
        obj.dictionary.push(torch.randn(7, net.feature_dim), torch.tensor([0, 1, 2, 0, 1, 2, 0]))
        before = obj.dictionary.queue.clone()
    loss, parts = obj(net, batch)
    y = batch["label"]
    logits_a, z = net(identity.normalize(batch["anchor"]))
    expected = F.cross_entropy(logits_a, y)
    if method != "erm":
        logits_p, zp = net(identity.normalize(batch["positive"]))
        if method == "augment":
            expected = F.cross_entropy(torch.cat([logits_a, logits_p]), torch.cat([y, y]))
        else:
            neg = net(identity.normalize(batch["negatives"].flatten(0, 1)))[1].view(6, 2, -1)
            dict_feats, dict_valid = obj.dictionary.lookup(y)
            z_neg = torch.cat([dict_feats, neg], 1)
            mask = torch.cat([dict_valid, batch["negative_valid"]], 1)
            expected = expected + clad_infonce(z, zp, z_neg, 0.2, mask)
            if method == "clad+":
                expected = expected + F.cross_entropy(logits_p, y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    if obj.dictionary is not None:
        assert torch.equal(obj.dictionary.queue, before)  # nothing pushed before the step ends
        obj.after_step(parts)
        pushed_keys = parts["push"][1]
        assert len(pushed_keys) == int(batch["has_positive"].sum())
        assert not torch.equal(obj.dictionary.queue, before)


def test_batch_augment_identity_and_ranges():
    aug = BatchAugment(
        (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, jitter=0.0
    )
    x = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    assert torch.allclose(aug(x), aug.normalize(x), atol=1e-5)  # a full-size crop is the identity
    strong = BatchAugment((0.5,) * 3, (0.5,) * 3)
    out = strong(x)
    assert out.shape == (3, 3, 16, 16) and out.min() >= -1 - 1e-5 and out.max() <= 1 + 1e-5
    flip = BatchAugment((0.0,) * 3, (1.0,) * 3, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=True, jitter=0.0)
    torch.manual_seed(0)
    flipped = flip(x)
    for i in range(3):  # each image is either itself or its mirror image
        a = x[i].float() / 255
        assert torch.allclose(flipped[i], a, atol=1e-5) or torch.allclose(flipped[i], a.flip(-1), atol=1e-5)


def test_paired_crops_share_geometry_and_match_affine_grid():
    aug = BatchAugment((0.5,) * 3, (0.5,) * 3, scale=(0.3, 1.0), jitter=0.0)
    torch.manual_seed(0)
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    crops = aug.geometry(8, "cpu")
    assert torch.equal(aug(x, crops), aug(x.clone(), crops))  # the same crops: identical views
    assert not torch.allclose(aug(x, crops), aug(x))  # fresh crops: different views
    theta = torch.zeros(8, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = crops.T
    assert torch.allclose(
        aug.sampling_grid(crops, 16, 16), F.affine_grid(theta, [8, 3, 16, 16], align_corners=False), atol=1e-6
    )


def _train_cmd(tiny_dataset, out, *extra):
    return [
        "scripts/train.py",
        "--dataset", str(tiny_dataset),
        "--output-dir", str(out),
        "--batch-size", "8",
        "--widths", "8", "8", "16", "16",
        "--no-progress",
        *extra,
    ]  # fmt: skip


def test_accelerate_launch_checkpoints_and_resumes(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    run_script(
        accelerate_launch(
            *_train_cmd(
                tiny_dataset, out, "--method", "clad", "--max-train-steps", "2", "--checkpointing-steps", "1"
            )
        )
    )
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    ckpt = out / "checkpoint-2"
    assert (ckpt / "model.safetensors").is_file() and any(ckpt.glob("custom_checkpoint_*"))
    for name in (
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "README.md",
        "training_args.json",
        "log.jsonl",
    ):
        assert (out / name).is_file(), name
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 2
    # resume and train two more steps: the counter continues from the checkpoint
    proc = run_script(
        accelerate_launch(
            *_train_cmd(
                tiny_dataset,
                out,
                "--method",
                "clad",
                "--max-train-steps",
                "4",
                "--checkpointing-steps",
                "1",
                "--checkpoints-total-limit",
                "2",
                "--resume-from-checkpoint",
                "latest",
            )
        )
    )
    assert "resuming from" in proc.stdout + proc.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 4
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 4 and "validation" in log[-1] and "con" in log[-1]


def test_two_cpu_processes_train_one_model(tiny_dataset, tmp_path):
    out = tmp_path / "ddp"
    proc = run_script(
        accelerate_launch(
            *_train_cmd(tiny_dataset, out, "--method", "clad+", "--max-train-steps", "2"), processes=2
        )
    )
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["steps"] == 2, proc.stdout


def test_transformers_backbone_from_a_folder(tiny_dataset, tmp_path):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    backbone = tmp_path / "tiny-resnet"
    cfg = ResNetConfig(
        num_labels=5, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"
    )
    ResNetForImageClassification(cfg).save_pretrained(backbone)
    out = tmp_path / "hf"
    run_script(
        python_script(
            "train.py", "--dataset", str(tiny_dataset), "--output-dir", str(out), "--backbone", str(backbone),
            "--resolution", "32", "--method", "clad", "--max-train-steps", "2", "--batch-size", "8", "--no-progress",
        )
    )  # fmt: skip
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "resnet" and cfg["id2label"] == {
        "0": "circle",
        "1": "square",
        "2": "triangle",
    }
    eval_dir = tmp_path / "eval"
    run_script(
        python_script(
            "evaluate.py",
            "--model",
            str(out),
            "--dataset",
            str(tiny_dataset),
            "--output",
            str(eval_dir),
            "--no-progress",
            "--hard-imagenet",
            "--split",
            "test",
        )
    )
    report = json.loads((eval_dir / "report.json").read_text())
    hin = report["hard_imagenet"]  # the Hard ImageNet measures ride along on the same masks
    assert set(hin["ablation_drop"]) == {"grey_object", "grey_box", "fill_box"}
    assert -1.0 <= hin["rfs"] <= 1.0 and 0.0 <= hin["saliency_iou"] <= 100.0
    assert json.loads((eval_dir / "hard_imagenet.json").read_text())["accuracy"] == hin["accuracy"]
    assert (eval_dir / "hard_imagenet.png").is_file()
    assert set(report["accuracy"]) == {
        "original",
        "only_fg",
        "no_fg",
        "only_bg_b",
        "only_bg_t",
        "mixed_same",
        "mixed_rand",
        "mixed_next",
    }
    assert (eval_dir / "report.png").stat().st_size > 1000 and "bg_gap" in (
        eval_dir / "report.md"
    ).read_text()


@pytest.mark.parametrize(
    "extra",
    [
        ("--loss", "supcon", "--fairkl-weight", "0.5"),
        ("--loss", "eps-supinfonce", "--eps", "0.2", "--fairkl-weight", "1"),
    ],
    ids=["supcon+fairkl", "eps-supinfonce+fairkl"],
)
def test_loss_family_trains_and_records_its_flags(tiny_dataset, tmp_path, extra):
    out = tmp_path / "loss"
    cmd = _train_cmd(tiny_dataset, out, "--method", "clad", "--max-train-steps", "2", *extra)
    run_script(python_script("train.py", *cmd[1:]))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2
    assert all(math.isfinite(log[-1][k]) for k in ("loss", "con", "fairkl"))
    recorded = json.loads((out / "training_args.json").read_text())
    flags = dict(zip(extra[::2], extra[1::2]))
    assert recorded["loss"] == flags["--loss"] and recorded["fairkl_weight"] == float(
        flags["--fairkl-weight"]
    )
    assert recorded["eps"] == float(flags.get("--eps", 0.1))
    assert json.loads((out / "train_summary.json").read_text())["loss"] == flags["--loss"]


@pytest.mark.parametrize("class_positives", [True, False])
def test_candidate_positives_with_and_without_same_class_originals(class_positives):
    from argparse import Namespace

    from debias.train import Objective

    args = Namespace(
        temperature=0.2, lambda_con=1.0, queue_size=2, loss="supcon", class_positives=class_positives
    )
    obj = Objective("clad", None, 3, 4, args)
    y = torch.tensor([0, 0, 1, 2])
    batch = {"label": y, "has_positive": torch.tensor([True, True, False, True]), "positive_bg": y}
    z, zp = torch.randn(4, 4), torch.randn(4, 4)
    c = obj.candidate_set(z, zp, batch, None)
    own = torch.eye(4, dtype=torch.bool) & batch["has_positive"][:, None]
    assert torch.equal(c["pos"][:, :4], own)  # each anchor's own counterfactual, if it has one
    same_class = (y[:, None] == y[None, :]) & ~torch.eye(4, dtype=torch.bool)
    assert torch.equal(
        c["pos"][:, 4:8], same_class if class_positives else torch.zeros(4, 4, dtype=torch.bool)
    )
    assert not c["pos"][:, 8:].any()  # dictionary entries are never positives


def test_a_lone_stored_negative_at_a_1x1_stage_is_embedded_with_running_statistics(tiny_dataset):
    """One valid stored negative in the batch, and the last stage's map is 1x1 at 32 px: training-mode
    BatchNorm cannot normalise a single value, so that image goes through with the running statistics;
    the loss equals the written-out one with the negative embedded in eval mode, and the model is left
    in training mode."""
    import copy

    torch.manual_seed(0)
    model, pre = build_model("small-resnet", ["a", "b", "c"], 32, widths=(8, 8, 16, 16))
    net = ClassifierWithFeatures(model).train()
    ref = copy.deepcopy(net)
    identity = BatchAugment(pre.mean, pre.std, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, jitter=0.0)
    obj = Objective("clad", identity, 3, net.feature_dim, ARGS)
    obj.dictionary.push(torch.randn(7, net.feature_dim), torch.tensor([0, 1, 2, 0, 1, 2, 0]))
    batch = dict(_batch(tiny_dataset, "clad"))
    valid = torch.zeros_like(batch["negative_valid"])
    valid[2, 0] = True
    batch["negative_valid"] = valid
    with pytest.raises(ValueError, match="more than 1 value per channel"):  # what the plain pass would do
        copy.deepcopy(ref)(identity.normalize(batch["negatives"][2, :1]))
    loss, _ = obj(net, batch)
    assert net.training
    # the reference, in the same order: the lone negative in eval mode, then anchors and positives
    ref.eval()
    with torch.no_grad():
        f_neg = ref(identity.normalize(batch["negatives"][2, :1]))[1]
    ref.train()
    y = batch["label"]
    logits, feats = ref(
        torch.cat([identity.normalize(batch["anchor"]), identity.normalize(batch["positive"])])
    )
    neg = torch.zeros(*valid.shape, ref.feature_dim)
    neg[valid] = f_neg
    dict_feats, dict_valid = obj.dictionary.lookup(y)
    z_neg = torch.cat([dict_feats, neg], 1)
    mask = torch.cat([dict_valid, valid], 1)
    expected = F.cross_entropy(logits[:6], y) + clad_infonce(feats[:6], feats[6:], z_neg, 0.2, mask)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
