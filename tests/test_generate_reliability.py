"""Crash-safe, resumable and multi-process generation: jobs killed with SIGKILL at chosen points
(``AUGMENT_FAULT``) and resumed, settings refused on a rerun, and one process against two, every
result compared row by row (ids, every column, image bytes) and file by file with a run that was
never interrupted."""

from __future__ import annotations

import contextlib
import io
import json
import signal
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from augment.pipeline import cli
from tests.conftest import accelerate_launch, python_script, run_script

ARGS = [
    "--num-classes", "3",
    "--image-size", "32",
    "--train-per-class", "5",
    "--validation-per-class", "2",
    "--test-per-class", "2",
    "--chunk-size", "4",  # train: 4 units, validation 2, test 2
    "--shard-size", "6",  # several shards per split, so a merge can die between two of them
    "--no-progress",
]  # fmt: skip
# killed in turn on one output folder, each rerun resuming what the one before left
FAULTS = [
    ("annotate:2", "after 2 units of the annotation stage"),
    ("partial-write:3", "half-way through writing a file of the annotation stage"),
    ("shard:2", "between a unit's rows file and its manifest"),
    ("unit:3", "after 3 committed units"),
    ("merge:3", "in the merge, after 3 units (final shards written)"),
    ("partial-write:2", "half-way through a final shard of the merge"),
    ("merged:1", "after the merge, before the work folder is removed"),
]
TALLY = {"faults": 0, "rows": 0, "lost": 0}


def killed(out: Path, fault: str, args=ARGS) -> None:
    """Run the job in a subprocess that ``AUGMENT_FAULT=fault`` kills with SIGKILL."""
    cmd = python_script("generate.py", "--output", str(out), *args)
    proc = run_script(cmd, env={"AUGMENT_FAULT": fault}, check=False)
    assert proc.returncode == -signal.SIGKILL, f"{fault} did not stop the job: {proc.stderr[-2000:]}"
    TALLY["faults"] += 1


def generate(out: Path, *extra: str, args=ARGS) -> tuple[int, str, str]:
    """Run the command line in this process (no fault is armed here); (exit code, stdout, stderr)."""
    out_buf, err_buf = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out_buf), contextlib.redirect_stderr(err_buf):
        code = cli(["--output", str(out), *args, *extra])
    return code, out_buf.getvalue(), err_buf.getvalue()


def folder(out: Path) -> dict[str, object]:
    """Every file of a dataset folder: parquet files as lists of rows (every column, image bytes as
    stored), the rest as text or bytes with the folder's own path taken out (the card records it)."""
    files = {}
    for f in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = str(f.relative_to(out))
        if f.suffix == ".parquet":
            files[rel] = pq.read_table(f).to_pylist()
        elif f.suffix in (".md", ".json"):
            files[rel] = f.read_text().replace(str(out), "<output>")
        else:
            files[rel] = f.read_bytes()
    return files


def assert_same(reference: Path, out: Path) -> int:
    """``out`` holds exactly ``reference``'s files and rows; returns the rows compared."""
    a, b = folder(reference), folder(out)
    assert sorted(a) == sorted(b)
    rows = 0
    for name in a:
        if isinstance(a[name], list):
            assert len(a[name]) == len(b[name]), name
            for ra, rb in zip(a[name], b[name], strict=True):
                assert ra == rb, f"{name}: row {ra.get('id')} differs"
            rows += len(a[name])
        else:
            assert a[name] == b[name], name
    TALLY["rows"] += rows
    return rows


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same job run once, never interrupted."""
    out = tmp_path_factory.mktemp("reference") / "ds"
    assert generate(out)[0] == 0
    return out


@pytest.fixture(scope="module", autouse=True)
def tally():
    yield TALLY
    print(f"\nreliability tally: {json.dumps(TALLY)}")


def test_killed_at_every_point_and_resumed_equals_an_uninterrupted_run(reference, tmp_path):
    out = tmp_path / "ds"
    units = out / ".work" / "units"
    for fault, _where in FAULTS:
        killed(out, fault)
        assert (out / ".work" / "settings.json").is_file()  # still unfinished: a rerun resumes it
        if fault == "shard:2":  # the second unit's rows are on disk but not its manifest
            orphans = [p for p in units.glob("generate-*.parquet") if not p.with_suffix(".json").exists()]
            assert len(orphans) == 1
        if fault.startswith("partial-write"):
            assert list(out.rglob("*.tmp")), "the half-written file should be left as a .tmp"
    code, stdout, _ = generate(out)
    assert code == 0 and '"resumed": true' in stdout
    assert not (out / ".work").exists() and not list(out.rglob("*.tmp"))
    assert assert_same(reference, out) > 0
    summary = json.loads(stdout[: stdout.rindex("}") + 1])
    assert summary["inputs"] == summary["originals"] + summary["rejected_inputs"] == 27
    # a finished dataset: the same command says so and touches nothing
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    code, stdout, _ = generate(out)
    assert code == 0 and "is complete" in stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_other_settings_are_refused_until_overwrite(reference, tmp_path):
    out = tmp_path / "ds"
    killed(out, "unit:2")
    code, _, stderr = generate(out, "--seed", "1", "--shard-size", "5")
    assert code == 2
    assert "unfinished generation" in stderr and "seed: 0 -> 1" in stderr
    assert "shard_size: 6 -> 5" in stderr and "--overwrite" in stderr
    assert generate(out)[0] == 0  # the same settings finish the job
    assert_same(reference, out)
    code, _, stderr = generate(out, "--seed", "1")  # a finished dataset is refused too
    assert code == 2 and "finished dataset" in stderr and "seed: 0 -> 1" in stderr
    assert generate(out, "--seed", "1", "--overwrite")[0] == 0
    first = sorted((out / "data").glob("train-*"))[0]
    assert first.name == sorted((reference / "data").glob("train-*"))[0].name
    ids = pq.read_table(first, columns=["id"]).column("id").to_pylist()
    assert ids == pq.read_table(sorted((reference / "data").glob("train-*"))[0]).column("id").to_pylist()
    assert json.loads((out / "generation.json").read_text())["seed"] == 1
    with pytest.raises(AssertionError):  # other seed, other images
        assert_same(reference, out)


def test_two_processes_write_the_dataset_of_one(reference, tmp_path):
    out = tmp_path / "ds"
    proc = run_script(
        accelerate_launch(str(Path("scripts") / "generate.py"), "--output", str(out), *ARGS, processes=2),
        env={"ACCELERATE_USE_CPU": "1"},
    )
    assert '"processes": 2' in proc.stdout
    assert assert_same(reference, out) > 0


@pytest.mark.slow  # ~2 minutes on 2 CPU cores; the same machinery is covered by the composite tests
def test_a_killed_diffusion_job_resumes_to_the_same_images(tmp_path):
    from augment.tiny_diffusion import build_tiny_diffusion

    model = build_tiny_diffusion(tmp_path / "inpaint", kind="inpaint")
    args = [
        "--num-classes", "3", "--image-size", "32", "--train-per-class", "2",
        "--validation-per-class", "1", "--test-per-class", "1", "--chunk-size", "2",
        "--positives", "inpaint", "--negatives", "inpaint", "--inpaint-model", str(model),
        "--steps", "2", "--device", "cpu", "--no-black-filter", "--no-progress",
    ]  # fmt: skip
    reference, out = tmp_path / "reference", tmp_path / "ds"
    assert generate(reference, args=args)[0] == 0
    killed(out, "unit:2", args=args)
    assert generate(out, args=args)[0] == 0
    assert assert_same(reference, out) > 0


def test_annotations_round_trip_through_json_not_pickle(tmp_path):
    """The annotation stage's results are stored as JSON (a planted pickle in an output folder must not
    run on a rerun) and come back equal: masks bit for bit, phrase masks byte for byte."""
    import numpy as np
    from PIL import Image

    from augment.annotate import Annotation
    from augment.dataset import phrase_mask_record
    from augment.workfolder import WorkFolder

    rng = np.random.default_rng(0)
    mask = rng.random((5, 7)) > 0.5
    bits, shape = Annotation.pack(mask)
    payload = {
        "annotations": {
            3: Annotation(
                "a dog on grass",
                ["dog"],
                ["grass"],
                ["sand"],
                {"caption": {"origin": "model"}},
                True,
                bits,
                shape,
                None,
            ),
            11: Annotation("a cat", mask_error="area 0.0 below --min-mask-area"),
        },
        "rejections": [("x/1", "extract", "not JSON")],
        "phrase_masks": [phrase_mask_record("x/3", "dog", Image.fromarray(mask.astype(np.uint8) * 255, "L"))],
    }
    work = WorkFolder(tmp_path)
    work.units.mkdir(parents=True)
    work.save_annotation("train-0", payload)
    assert not list(tmp_path.rglob("*.pkl")) and work.annotated("train-0")
    back = work.load_annotation("train-0")
    assert back["rejections"] == payload["rejections"]
    assert back["phrase_masks"] == payload["phrase_masks"]
    assert set(back["annotations"]) == {3, 11}
    a = back["annotations"][3]
    assert (a.caption, a.fg, a.bg, a.alt, a.recipe, a.replaces_mask) == (
        "a dog on grass",
        ["dog"],
        ["grass"],
        ["sand"],
        {"caption": {"origin": "model"}},
        True,
    )
    assert np.array_equal(np.asarray(a.mask_image()) > 127, mask)
    assert back["annotations"][11].mask_bits is None and back["annotations"][11].mask_error.startswith("area")
