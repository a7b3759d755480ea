"""Publishing: the dry run writes exactly the files a push sends and load_dataset reads them back, the
folder is validated first, a push without a token or offline is refused before anything is sent, and
the model card of a trained model shows its evaluation."""

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from datasets import Image as ImageFeature
from datasets import load_dataset
from PIL import Image

from augment import publish
from augment.dataset import DatasetWriter, Row, load_counterfactual_dataset, load_rejected
from tests.conftest import python_script, run_script


def _load(path, *config):
    """load_dataset with a cache of its own: datasets keys its cache of a local folder on the folder's
    name and card metadata, so a folder of the same name from an earlier run could be read instead."""
    return load_dataset(str(path), *config, cache_dir=str(Path(path).parent / f".cache-{Path(path).name}"))


def _yaml(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---")[1])


def _rows(ds):
    """(id, label, image bytes) of every row of every split."""
    out = {}
    for split, d in ds.items():
        d = d.cast_column("image", ImageFeature(decode=False))
        out[split] = [(r["id"], r["label"], r["image"]["bytes"]) for r in d]
    return out


class FakeApi:
    """Records the calls a push makes; snapshots the folder handed to upload_folder."""

    def __init__(self):
        self.calls = []
        self.uploaded: dict[str, bytes] = {}

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/datasets/{repo_id}"

    def create_branch(self, repo_id, **kw):
        self.calls.append(("create_branch", repo_id, kw))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw["repo_id"], kw))
        root = Path(kw["folder_path"])
        self.uploaded = {
            p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()
        }
        return None


def test_dry_run_writes_exactly_the_upload_and_reads_back(tiny_dataset, tmp_path):
    out = tmp_path / "dry"
    result = publish.publish_dataset(tiny_dataset, "me/tiny-cf", dry_run=out, license="cc-by-4.0")
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == result["files"] == publish.dataset_files(tiny_dataset)
    assert {"README.md", "generation.json", "preview.png", "data/train-00000-of-00001.parquet"} <= set(
        written
    )
    assert "rejected/train-00000-of-00001.parquet" in written
    assert _rows(_load(out)) == _rows(load_counterfactual_dataset(tiny_dataset))
    # nothing was rejected: the rejected tables are empty files that load_rejected reads
    assert {s: len(d) for s, d in load_rejected(out).items()} == {"train": 0, "validation": 0, "test": 0}
    text = (out / "README.md").read_text()
    meta = _yaml(text)
    assert [c["config_name"] for c in meta["configs"]] == ["default", "rejected"]
    assert {"dataset_info", "task_categories", "tags", "pretty_name"} <= set(meta)
    assert meta["license"] == "cc-by-4.0" and meta["task_categories"] == ["image-classification"]
    assert "## How the counterfactuals were made" in text and "`composite`" in text
    assert "## Known limitations" in text and "cut-and-paste" in text
    assert 'load_dataset("me/tiny-cf")' in text
    # the source folder's own card is untouched
    assert _yaml((tiny_dataset / "README.md").read_text())["license"] == "other"
    with pytest.raises(publish.PublishError, match="not empty"):
        publish.publish_dataset(tiny_dataset, "me/tiny-cf", dry_run=out)


def _writer_dataset(folder: Path) -> Path:
    """A small folder written by DatasetWriter with rejections and phrase masks, and no settings."""
    w = DatasetWriter(folder, ["cat", "dog"])
    mask = Image.new("L", (8, 8), 0)
    mask.paste(255, (2, 2, 6, 6))
    for i in range(4):
        img = Image.new("RGB", (8, 8), (60 * i, 20, 200))
        w.add(
            "train",
            Row(
                id=f"x/train/{i}",
                image=img,
                mask=mask,
                label=i % 2,
                kind="original",
                source_id=f"x/train/{i}",
            ),
        )
        w.add_phrase_mask("train", f"x/train/{i}", "a thing", mask, boxes=[[2, 2, 6, 6]], scores=[0.9])
    w.add(
        "test",
        Row(id="x/test/0", image=Image.new("RGB", (8, 8)), label=1, kind="original", source_id="x/test/0"),
    )
    w.reject("x/train/9", "train", "read", "x/train/9.png: not an image")
    w.close()
    return folder


def test_rejected_and_phrase_masks_configurations_are_published(tmp_path):
    src = _writer_dataset(tmp_path / "src")
    text = (src / "README.md").read_text()
    meta = _yaml(text)  # the card holds up without generators, annotation or source in the settings
    assert [c["config_name"] for c in meta["configs"]] == ["default", "rejected", "phrase_masks"]
    assert "## Known limitations" in text and meta["license"] == "other"
    out = tmp_path / "dry"
    result = publish.publish_dataset(src, "me/x", dry_run=out)
    assert "phrase_masks/train-00000-of-00001.parquet" in result["files"]
    rejected = _load(out, "rejected")
    assert rejected["train"]["id"] == ["x/train/9"] and rejected["train"]["stage"] == ["read"]
    assert _load(out, "phrase_masks")["train"]["phrase"] == ["a thing"] * 4
    assert _load(out)["train"]["id"] == [f"x/train/{i}" for i in range(4)]


def test_incomplete_folders_are_refused(tiny_dataset, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dataset, bad)
    (bad / "data" / "test-00000-of-00001.parquet").unlink()
    with pytest.raises(publish.PublishError, match="'default' split 'test' has no file"):
        publish.publish_dataset(bad, "me/x", dry_run=tmp_path / "o1")
    shutil.copy(
        tiny_dataset / "data" / "validation-00000-of-00001.parquet",
        bad / "data" / "test-00000-of-00001.parquet",
    )
    with pytest.raises(publish.PublishError, match="has 12 rows in its files but the card says 18"):
        publish.publish_dataset(bad, "me/x", dry_run=tmp_path / "o2")
    (bad / "README.md").write_text("# no metadata\n")
    with pytest.raises(publish.PublishError, match="YAML metadata"):
        publish.validate_dataset_folder(bad)
    (bad / "README.md").unlink()
    proc = run_script(
        python_script("publish.py", str(bad), "--repo-id", "me/x", "--dry-run", str(tmp_path / "o3")),
        check=False,
    )
    assert proc.returncode == 2 and "no README.md" in proc.stderr
    assert not (tmp_path / "o1").exists() or not any((tmp_path / "o1").iterdir())


def test_push_calls_create_repo_and_upload_folder(tiny_dataset, tmp_path, monkeypatch, capsys):
    secret = "hf_notarealtoken_0123456789"
    monkeypatch.setattr(publish, "resolve_token", lambda: secret)
    monkeypatch.setattr(publish, "hub_offline", lambda: False)
    api = FakeApi()
    result = publish.publish_dataset(
        tiny_dataset, "me/tiny-cf", private=True, revision="v1", license="mit", api=api
    )
    names = [c[0] for c in api.calls]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[0][2]["repo_type"] == "dataset" and api.calls[0][2]["private"] is True
    up = api.calls[2][2]
    assert up["repo_type"] == "dataset" and up["revision"] == "v1" and "data/*" in up["delete_patterns"]
    dry = tmp_path / "dry"
    publish.publish_dataset(tiny_dataset, "me/tiny-cf", dry_run=dry, license="mit")
    assert sorted(api.uploaded) == result["files"]
    for rel, data in api.uploaded.items():  # byte for byte what the dry run wrote
        assert (dry / rel).read_bytes() == data, rel
    assert not list(tiny_dataset.parent.glob(".publish-*"))  # the staging folder is gone
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: api)
    assert publish.cli([str(tiny_dataset), "--repo-id", "me/tiny-cf"]) == 0  # the command line too
    assert [c[0] for c in api.calls[3:]] == ["create_repo", "upload_folder"]
    printed = capsys.readouterr()
    assert secret not in printed.out + printed.err
    assert not any(
        secret in v.decode("utf-8", "ignore") for k, v in api.uploaded.items() if not k.endswith(".parquet")
    )


def test_no_token_or_offline_is_refused_before_sending(tiny_dataset, monkeypatch, capsys):
    import huggingface_hub

    made = []

    class Refuse:
        def __init__(self, *a, **kw):
            made.append(kw)

        def __getattr__(self, name):
            raise AssertionError(f"HfApi.{name} called")

    monkeypatch.setattr(huggingface_hub, "HfApi", Refuse)
    monkeypatch.setattr(publish, "hub_offline", lambda: False)
    monkeypatch.setattr(publish, "resolve_token", lambda: None)
    assert publish.cli([str(tiny_dataset), "--repo-id", "me/x"]) == 2
    err = capsys.readouterr().err
    assert "no Hugging Face token" in err and "hf auth login" in err and "HF_TOKEN" in err
    monkeypatch.setattr(publish, "hub_offline", lambda: True)
    monkeypatch.setattr(publish, "resolve_token", lambda: "hf_x")
    assert publish.cli([str(tiny_dataset), "--repo-id", "me/x"]) == 2
    assert "offline mode is on" in capsys.readouterr().err
    assert made == []  # no client was even built


def test_offline_push_exits_2_from_the_script(tiny_dataset):
    proc = run_script(
        python_script("publish.py", str(tiny_dataset), "--repo-id", "me/x"),
        env={"HF_HUB_OFFLINE": "1"},
        check=False,
    )
    assert proc.returncode == 2 and "offline mode is on" in proc.stderr and "--dry-run" in proc.stderr


REPORT = {
    "accuracy": {
        "original": 91.25,
        "only_fg": 80.5,
        "no_fg": 30.0,
        "only_bg_b": 25.0,
        "only_bg_t": 33.3,
        "mixed_same": 88.75,
        "mixed_rand": 77.5,
        "mixed_next": 76.0,
    },
    "bg_gap": 11.25,
    "challenge_accuracy": 42.0,
    "worst_group_accuracy": 55.5,
    "details": {"num_images": {"original": 18}},
    "split": "test",
    "hard_imagenet": {"ablation_drop": {"grey_object": 20.0}, "rfs": 0.25, "saliency_iou": 40.0},
}


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "clad"
    run_script(
        python_script(
            "train.py", "--dataset", str(tiny_dataset), "--output-dir", str(out), "--method", "clad",
            "--batch-size", "8", "--widths", "8", "8", "16", "16", "--max-train-steps", "1", "--no-progress",
        )
    )  # fmt: skip
    return out


def test_model_card_after_training_and_publish_dry_run(trained, tiny_dataset, tmp_path):
    card = (trained / "README.md").read_text()
    meta = _yaml(card)
    assert meta["library_name"] == "transformers" and meta["license"] == "other"
    assert {"tags", "metrics"} <= set(meta) and "clad" in meta["tags"]
    assert "| InfoNCE temperature tau | 0.2 |" in card and "Not evaluated yet" in card
    assert "AutoModelForImageClassification.from_pretrained" in card and "import debias.models" in card
    assert "| train | 24 | 24 | 48 | 0 |" in card  # the data section counts the dataset's rows
    # an evaluation written after training is picked up when publishing
    (trained / "eval").mkdir(exist_ok=True)
    (trained / "eval" / "report.json").write_text(json.dumps({**REPORT, "model": str(trained)}))
    out = tmp_path / "dry"
    result = publish.publish_model(
        trained, "me/clad-tiny", dry_run=out, license="apache-2.0", dataset_id="me/tiny-cf"
    )
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == result["files"]
    assert {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "README.md",
        "eval/report.json",
    } <= set(written)
    assert not any(f.startswith("checkpoint-") for f in written)
    text = (out / "README.md").read_text()
    meta = _yaml(text)
    assert meta["license"] == "apache-2.0" and meta["datasets"] == ["me/tiny-cf"]
    row = next(line for line in text.splitlines() if line.startswith("| `eval/report.json`"))
    assert (
        row
        == "| `eval/report.json` | test | 91.2 | 80.5 | 30.0 | 25.0 | 33.3 | 88.8 | 77.5 | 76.0 | 11.2 | 42.0 | 55.5 |"
    )
    assert 'from_pretrained("me/clad-tiny")' in text
    assert "grey_object 20.0" in text and "relative foreground sensitivity 0.250" in text
    from transformers import AutoModelForImageClassification

    import debias.models  # noqa: F401

    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.id2label == {0: "circle", 1: "square", 2: "triangle"}


def test_stale_reports_are_ignored(trained, tmp_path):
    from debias.modelcard import find_reports, write_model_card

    model_dir = tmp_path / "m"
    shutil.copytree(trained, model_dir, ignore=shutil.ignore_patterns("checkpoint-*", "eval"))
    (model_dir / "old").mkdir()
    (model_dir / "old" / "report.json").write_text(json.dumps(REPORT))
    saved = (model_dir / "model.safetensors").stat().st_mtime
    os.utime(model_dir / "old" / "report.json", (saved - 100, saved - 100))  # older than the weights
    (model_dir / "other").mkdir()
    (model_dir / "other" / "report.json").write_text(json.dumps({**REPORT, "model": str(tmp_path)}))
    assert find_reports(model_dir) == []
    (model_dir / "report.json").write_text(json.dumps(REPORT))
    assert [rel for rel, _ in find_reports(model_dir)] == ["report.json"]
    text = write_model_card(model_dir, license="mit").read_text()
    assert "| `report.json` | test | 91.2 |" in text and _yaml(text)["license"] == "mit"


def test_model_folder_is_validated(tmp_path):
    with pytest.raises(publish.PublishError, match="no config.json"):
        publish.publish_model(tmp_path, "me/x", dry_run=tmp_path / "o")
    assert publish.cli([str(tmp_path), "--repo-id", "not a repo//id", "--dry-run", str(tmp_path / "o")]) == 2
