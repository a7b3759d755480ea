"""ExCon saliency positives: the masking against a numpy reference, the fallback when the prediction
changes, the complement negative, the trainer's cache (refreshes, checkpoint, resume, two processes) on a
dataset with no positives and no masks, and the generator's saliency rows."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from augment.dataset import load_counterfactual_dataset, load_rejected
from debias.excon import complement_views, excon_views, keep_masks, mask_views, mean_colour
from tests.conftest import accelerate_launch, python_script, run_script

FILL = torch.tensor([10, 20, 30], dtype=torch.uint8)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0


def test_masking_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 3, 8, 8), dtype=np.uint8)
    maps = rng.random((3, 8, 8)).astype(np.float32)
    maps[0, 2, 3] = 0.5  # exactly at the threshold: replaced (importance <= 0.5)
    maps[1] = 0.0  # nothing salient: every pixel replaced
    keep = keep_masks(torch.from_numpy(maps), 0.5)
    got = mask_views(torch.from_numpy(images), keep, FILL).numpy()
    comp = complement_views(torch.from_numpy(images), keep, FILL).numpy()
    fill = FILL.numpy()
    for b in range(3):
        for i in range(8):
            for j in range(8):
                salient = maps[b, i, j] > 0.5
                want = images[b, :, i, j] if salient else fill
                want_comp = fill if salient else images[b, :, i, j]
                assert (got[b, :, i, j] == want).all() and (comp[b, :, i, j] == want_comp).all()
    assert not keep[0, 2, 3] and not keep[1].any()
    assert (got[1] == fill[:, None, None]).all() and (comp[1] == images[1]).all()
    ones = torch.full((2, 3, 4, 4), 7, dtype=torch.uint8)
    ones[1] = 9
    assert mean_colour(ones).tolist() == [8, 8, 8]


class _RedGreen(nn.Module):
    """A classifier with a known Grad-CAM: a 1x1 convolution passes the red (channel 0) and the green
    (channel 1) planes, pooled to a 2 x 2 map; logit 0 is the mean red, logit 1 the mean green. So the
    map of class 0 is where the red is and the map of class 1 where the green is. Returns
    (logits, features) as the trainer's wrapper does."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = 1.0
            self.conv.weight[1, 1] = 1.0
        self.pool = nn.AdaptiveAvgPool2d(2)

    def forward(self, x):
        a = self.pool(self.conv(x))  # (B, 2, 2, 2)
        return a.mean(dim=(2, 3)), a.flatten(1)


def test_views_keep_the_salient_region_and_fall_back_when_the_prediction_flips():
    model = _RedGreen().train()
    x = torch.zeros(3, 3, 8, 8, dtype=torch.uint8)
    x[:, 0, :4, :4] = 200  # red top-left: class 0's evidence, the stronger
    x[:, 1, 4:, 4:] = 100  # green bottom-right: class 1's evidence
    black = torch.tensor([0, 0, 0], dtype=torch.uint8)
    views = excon_views(model, x[:2], [0, 1], _identity, black, threshold=0.5, layer="pool", negatives=True)
    assert torch.equal(views.keep, views.maps > 0.5)
    # class 0's map is on the red top-left, class 1's on the green bottom-right
    assert views.keep[0, :2, :2].all() and not views.keep[0, 4:].any() and not views.keep[0, :, 4:].any()
    assert views.keep[1, 6:, 6:].all() and not views.keep[1, :4].any() and not views.keep[1, :, :4].any()
    # image 1 is predicted 0 (more red), but its masked view keeps only green: predicted 1 = its label
    assert views.predictions.tolist() == [0, 1] and views.kept_prediction.tolist() == [True, True]
    assert torch.equal(views.positives, mask_views(x[:2], views.keep, black))
    assert torch.equal(views.complements, complement_views(x[:2], views.keep, black))
    # the same image and label with a red fill colour: the masked view is red outside the green corner,
    # so the prediction flips to 0 -> no saliency view; the positive falls back to the image itself
    red = torch.tensor([250, 0, 0], dtype=torch.uint8)
    flip = excon_views(model, x[2:], [1], _identity, red, layer="pool", negatives=True)
    assert flip.predictions.tolist() == [0] and flip.kept_prediction.tolist() == [False]
    assert torch.equal(flip.positives[0], x[2])  # the fallback: the anchor, augmented by the trainer
    assert torch.equal(flip.complements[0], complement_views(x[2:], flip.keep, red)[0])
    assert model.training  # the training flag is restored


def test_model_state_is_untouched():
    from debias.models import ClassifierWithFeatures, build_model

    torch.manual_seed(0)
    model, pre = build_model("small-resnet", ["a", "b"], 16, widths=(4, 4, 8, 8))
    net = ClassifierWithFeatures(model).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    views = excon_views(net, x, [0, 1, 0, 1], _identity, (128, 128, 128), negatives=True)
    assert views.positives.shape == x.shape and views.complements.shape == x.shape
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics included
    assert all(p.grad is None and p.requires_grad for p in net.parameters()) and net.training


# ----------------------------------------------------------------------------------------------
# A dataset of originals only: no masks, no positives, no negatives
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def originals_only(tmp_path_factory):
    from augment.pipeline import GenerateConfig, run

    root = tmp_path_factory.mktemp("plain")
    colours = {"red": (220, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 220)}
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("validation", 2)):
        for name, colour in colours.items():
            (root / "images" / split / name).mkdir(parents=True)
            for i in range(n):
                img = np.full((48, 48, 3), rng.integers(60, 200, size=3), dtype=np.uint8)
                r, c = rng.integers(0, 24, size=2)
                img[r : r + 24, c : c + 24] = colour
                Image.fromarray(img).save(root / "images" / split / name / f"{i}.png")
    out = root / "dataset"
    run(GenerateConfig(output=str(out), source="folder", data_dir=str(root / "images"), progress=False))
    kinds = load_counterfactual_dataset(out)["train"]["kind"]
    assert set(kinds) == {"original"}
    return out


def _train(dataset, out, *extra):
    return python_script(
        "train.py",
        "--dataset", str(dataset), "--output-dir", str(out), "--method", "clad", "--widths", "4", "4", "8", "8",
        "--batch-size", "6", "--queue-size", "4", "--no-progress", "--cpu", *extra,
    )  # fmt: skip


def test_trainer_without_positives_needs_the_flag(originals_only, tmp_path, capsys):
    from debias.train import cli

    assert cli(_train(originals_only, tmp_path / "x", "--max-train-steps", "1")[2:]) == 2
    assert "--saliency-positives" in capsys.readouterr().err


def test_trainer_refreshes_and_checkpoints_the_cache(originals_only, tmp_path):
    out = tmp_path / "run"
    # 48 px: the small ResNet's last stage keeps a 2 x 2 map, so one stored negative alone can pass BN.
    # 18 rows, batch 6: 3 steps per epoch; refresh every 2 epochs over 3 epochs -> epochs 0 and 2
    cmd = ["--epochs", "3", "--saliency-positives", "--saliency-refresh-epochs", "2", "--saliency-negatives"]
    proc = run_script(
        _train(originals_only, out, *cmd, "--checkpointing-steps", "3", "--checkpoints-total-limit", "9")
    )
    summary = json.loads((out / "train_summary.json").read_text())
    ex = summary["excon"]
    assert [r["epoch"] for r in ex["refreshes"]] == [0, 2], proc.stdout
    assert proc.stdout.count("saliency positives refreshed") == 2
    assert ex["eligible_rows"] == 18 and ex["mode"] == "missing" and ex["negatives"]
    views = [r["saliency_views"] for r in ex["refreshes"]]
    assert ex["saliency_positives_total"] == views[0] * 2 + views[1]  # epochs 0, 1 | 2
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all("saliency_share" in e and "con" in e for e in log)
    assert "saliency positives (ExCon)" in (out / "README.md").read_text()
    first = _cache_state(out / "checkpoint-3")
    assert first["refreshed_epoch"] == 0 and first["keep"].shape == (18, 48, 48)
    assert int(first["kept"].sum()) == views[0]
    # resume at the end of epoch 0: the cache comes from the checkpoint (epoch 1 recomputes nothing and
    # trains on it), epoch 2 refreshes
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-3", resumed / "checkpoint-3")
    proc2 = run_script(
        _train(
            originals_only, resumed, *cmd, "--resume-from-checkpoint", "latest", "--checkpointing-steps", "3"
        )
    )
    assert proc2.stdout.count("saliency positives refreshed") == 1  # epoch 2 only
    ex2 = json.loads((resumed / "train_summary.json").read_text())["excon"]
    assert [r["epoch"] for r in ex2["refreshes"]] == [0, 2] and ex2["refreshes"][0] == ex["refreshes"][0]
    mid = _cache_state(resumed / "checkpoint-6")
    assert mid["refreshed_epoch"] == 0
    assert torch.equal(mid["keep"], first["keep"]) and torch.equal(mid["kept"], first["kept"])


def _cache_state(ckpt):
    for path in sorted(ckpt.glob("custom_checkpoint_*.pkl")):
        state = torch.load(path, weights_only=False)
        if "refreshed_epoch" in state:
            return state
    raise AssertionError(f"no saliency cache in {ckpt}")


class _Shard:
    """Stands in for one of two accelerate processes: ``gather`` puts the other rank's recorded share
    beside this one's, in rank order."""

    num_processes, device = 2, torch.device("cpu")

    def __init__(self, rank, other=None):
        self.process_index, self.other, self.sent = rank, other, []

    def gather(self, t):
        self.sent.append(t)
        theirs = self.other.sent[len(self.sent) - 1] if self.other else t
        return torch.cat([t, theirs] if self.process_index == 0 else [theirs, t])


@pytest.mark.parametrize("rows", [18, 17])
def test_refresh_shares_rows_between_processes(originals_only, rows):
    from debias.data import BatchAugment, CounterfactualTrainSet
    from debias.excon import SaliencyPositives
    from debias.models import ClassifierWithFeatures, build_model

    ds = load_counterfactual_dataset(originals_only)["train"].select(range(rows))
    ts = CounterfactualTrainSet(ds, 48, need_positives=False, need_negatives=False)
    torch.manual_seed(0)
    model, pre = build_model("small-resnet", ["blue", "green", "red"], 48, widths=(4, 4, 8, 8))
    net = ClassifierWithFeatures(model)
    norm = BatchAugment(pre.mean, pre.std).normalize
    single = SaliencyPositives(ts, "all")
    single.refresh(net, norm, 0, batch_size=5)
    assert 0 < int(single.keep.sum()) < single.keep.numel()
    one = _Shard(1)
    SaliencyPositives(ts, "all").refresh(net, norm, 0, one, batch_size=5)
    shared = SaliencyPositives(ts, "all")
    shared.refresh(net, norm, 0, _Shard(0, one), batch_size=5)
    assert torch.equal(shared.keep, single.keep) and torch.equal(shared.kept, single.kept)
    assert shared.refreshes == single.refreshes


@pytest.mark.slow
def test_two_processes_gather_the_same_cache(originals_only, tmp_path):
    out = tmp_path / "ddp"
    flags = ("--saliency-positives", "all", "--saliency-refresh-epochs", "5")  # epoch 0's views only
    args = _train(originals_only, out, "--max-train-steps", "2", *flags)[2:]
    args = [a for a in args if a != "--cpu"]
    run_script(accelerate_launch("scripts/train.py", *args, processes=2), env={"ACCELERATE_USE_CPU": "1"})
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["excon"]["eligible_rows"] == 18
    one = tmp_path / "one"
    run_script(_train(originals_only, one, "--max-train-steps", "1", *flags))
    # both runs computed epoch 0's views with the same initial model: the gathered cache equals one process's
    assert torch.equal(_cache_state(out / "checkpoint-2")["keep"], _cache_state(one / "checkpoint-1")["keep"])


# ----------------------------------------------------------------------------------------------
# The generator: --positives saliency
# ----------------------------------------------------------------------------------------------


def test_generate_saliency_positives_and_complements(originals_only, tmp_path):
    from augment.pipeline import GenerateConfig, run
    from debias.train import main, parse_args

    clf = tmp_path / "clf"
    main(parse_args(_train(originals_only, clf, "--method", "erm", "--max-train-steps", "2")[2:]))
    images = originals_only.parent / "images"
    out = tmp_path / "sal"
    summary = run(
        GenerateConfig(
            output=str(out),
            source="folder",
            data_dir=str(images),
            positives="saliency",
            classifier=str(clf),
            saliency_negatives=True,
            negatives=[],
            progress=False,
        )
    )
    train = load_counterfactual_dataset(out)["train"]
    originals = {r["id"]: r for r in train if r["kind"] == "original"}
    positives = [r for r in train if r["kind"] == "positive"]
    negatives = {r["source_id"]: r for r in train if r["kind"] == "negative"}
    rejected = [r for r in load_rejected(out)["train"] if r["stage"] == "saliency"]
    assert len(originals) == 18 and summary["originals"] == 24
    # every original: a positive (and its complement) or a recorded rejection of both
    assert len(positives) + len(rejected) // 2 == 18 and len(negatives) == len(positives)
    assert all("on the saliency-masked view" in r["reason"] for r in rejected)
    assert positives and rejected  # this classifier keeps some views and loses others (6 and 12)
    fill = None
    for p in positives:
        recipe = json.loads(p["recipe"]) if isinstance(p["recipe"], str) else p["recipe"]
        assert recipe["generator"] == "saliency" and recipe["classifier"] == str(clf)
        assert recipe["threshold"] == 0.5 and recipe["kept_prediction"] is True and recipe["cam_layer"]
        fill = np.asarray(recipe["fill"], dtype=np.uint8)
        orig = np.asarray(originals[p["source_id"]]["image"])
        keep = np.asarray(p["mask"]) == 255
        assert 0 < keep.mean() < 1 and p["label"] == originals[p["source_id"]]["label"]
        np.testing.assert_array_equal(np.asarray(p["image"]), np.where(keep[..., None], orig, fill))
        neg = negatives[p["source_id"]]
        assert neg["label"] == -1
        np.testing.assert_array_equal(np.asarray(neg["image"]), np.where(keep[..., None], fill, orig))
    if fill is not None:  # the mean colour of the train originals
        mean = np.mean(
            [np.asarray(o["image"], dtype=np.float64).reshape(-1, 3).mean(0) for o in originals.values()], 0
        )
        np.testing.assert_array_equal(fill, mean.round().astype(np.uint8))


def test_generate_saliency_needs_a_classifier(tmp_path):
    from augment.pipeline import GenerateConfig, run

    with pytest.raises(ValueError, match="--classifier"):
        run(GenerateConfig(output=str(tmp_path / "x"), positives="saliency", progress=False))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        run(
            GenerateConfig(
                output=str(tmp_path / "x"), positives="saliency", classifier=str(tmp_path / "nope")
            )
        )
