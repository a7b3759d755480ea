"""Publishing to the Hugging Face Hub: a dataset folder (``scripts/generate.py``) or a trained model
folder (``scripts/train.py``), after checking that it is complete.

A dataset folder is pushed as it is, every configuration (``default``, ``rejected``, ``phrase_masks``
when present) with its card, ``preview.png`` and ``generation.json``::

    python scripts/publish.py DIR --repo-id me/my-counterfactuals [--private] [--license cc-by-4.0]
    python scripts/publish.py DIR --repo-id me/my-counterfactuals --dry-run OUT   # write, send nothing
    python scripts/publish.py --model RUN_DIR --repo-id me/my-clad-model

The files to send are first written into a staging folder (data and weights hard-linked where the file
system allows, the rest copied): ``--dry-run`` writes exactly that folder where you ask and sends
nothing, so ``datasets.load_dataset(OUT)`` reads what the Hub would serve. The card is the folder's own, with ``--license`` applied and the loading example
naming the repository. A model's card is refreshed (with the latest evaluation report) when it is the
one :mod:`debias.modelcard` wrote.

The token comes from huggingface_hub (``HF_TOKEN`` or the login cache of ``hf auth login``); it is never
written anywhere or printed.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from . import trust

LOGIN_HELP = (
    "log in with `hf auth login` (`huggingface-cli login` with older huggingface_hub) or set the HF_TOKEN "
    "environment variable to a token with write access (https://huggingface.co/settings/tokens)"
)

MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class PublishError(Exception):
    """A refusal to publish, with a message that says what to do."""


# ----------------------------------------------------------------------------------------------
# The card's YAML
# ----------------------------------------------------------------------------------------------


def split_card(text: str) -> tuple[dict[str, Any], str]:
    """(metadata, body) of a README with YAML front matter between ``---`` lines."""
    if not text.startswith("---"):
        raise PublishError("README.md has no YAML metadata block (it must start with a line '---')")
    end = text.find("\n---", 3)
    if end < 0:
        raise PublishError("README.md: the YAML metadata block is not closed by a line '---'")
    try:
        meta = yaml.safe_load(text[3:end]) or {}
    except yaml.YAMLError as e:
        raise PublishError(f"README.md: the YAML metadata does not parse ({e})") from e
    if not isinstance(meta, dict):
        raise PublishError("README.md: the YAML metadata is not a mapping")
    body = text[end + 4 :].lstrip("\n")
    return meta, body


def join_card(meta: dict[str, Any], body: str) -> str:
    return "---\n" + yaml.safe_dump(meta, sort_keys=False).rstrip() + "\n---\n\n" + body


# ----------------------------------------------------------------------------------------------
# Datasets: which files, and are they complete
# ----------------------------------------------------------------------------------------------


def _top_level_files(folder: Path) -> list[str]:
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".tmp")
    )


def _config_patterns(meta: dict[str, Any]) -> dict[str, dict[str, list[str]]]:
    """config name -> split -> path patterns, from the card's ``configs``."""
    configs = meta.get("configs")
    if not isinstance(configs, list) or not configs:
        raise PublishError(
            "README.md: the YAML metadata has no `configs:` list, so load_dataset cannot read it"
        )
    out: dict[str, dict[str, list[str]]] = {}
    for c in configs:
        name = c.get("config_name", "default")
        files = c.get("data_files")
        if isinstance(files, str):
            files = [{"split": "train", "path": files}]
        splits: dict[str, list[str]] = {}
        for entry in files or []:
            paths = entry.get("path")
            splits.setdefault(entry.get("split", "train"), []).extend(
                [paths] if isinstance(paths, str) else list(paths or [])
            )
        if not splits:
            raise PublishError(f"README.md: configuration {name!r} lists no data_files")
        out[name] = splits
    return out


def _matches(folder: Path, pattern: str) -> list[str]:
    """Files under ``folder`` matching a ``data_files`` pattern (relative, ``/``-separated)."""
    parent = pattern.rsplit("/", 1)[0] if "/" in pattern else ""
    base = folder / parent if parent else folder
    if not base.is_dir():
        return []
    found = []
    for p in base.rglob("*"):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and not p.name.endswith(".tmp") and fnmatch.fnmatchcase(rel, pattern):
            found.append(rel)
    return sorted(found)


def dataset_files(folder: str | os.PathLike) -> list[str]:
    """The files a dataset folder publishes (relative, ``/``-separated, sorted): its top-level files
    (card, settings, preview, reports) and every file of every configuration's directories."""
    folder = Path(folder)
    meta, _ = split_card((folder / "README.md").read_text(encoding="utf-8"))
    files = set(_top_level_files(folder))
    for splits in _config_patterns(meta).values():
        for patterns in splits.values():
            for pattern in patterns:
                top = pattern.split("/", 1)[0]
                if "/" in pattern and (folder / top).is_dir():
                    # the whole directory: empty rejected tables too, which load_rejected() reads
                    files.update(
                        p.relative_to(folder).as_posix()
                        for p in (folder / top).rglob("*")
                        if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".tmp")
                    )
                else:
                    files.update(_matches(folder, pattern))
    return sorted(files)


def _parquet_rows(folder: Path, files: list[str]) -> int | None:
    """Rows in parquet ``files`` from their footers (None when one is not parquet)."""
    import pyarrow.parquet as pq

    total = 0
    for f in files:
        if not f.endswith(".parquet"):
            return None
        try:
            total += pq.ParquetFile(folder / f).metadata.num_rows
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise PublishError(f"{folder / f}: not a readable parquet file ({e})") from e
    return total


def validate_dataset_folder(folder: str | os.PathLike) -> dict[str, Any]:
    """Check that a dataset folder is complete and that ``datasets.load_dataset`` reads it.

    Checks: a README.md with YAML ``configs``; at least one file for every split of every
    configuration; row counts equal to the card's ``dataset_info``; and ``load_dataset(folder, config,
    streaming=True)`` yields the card's splits and a first row of each (configurations whose splits
    are all empty, such as ``rejected`` when nothing was rejected, are checked by their files only:
    datasets cannot load a split with no rows). Returns ``{config: {split: rows}}``; raises
    :class:`PublishError` naming what is wrong.
    """
    from datasets import load_dataset

    folder = Path(folder)
    if not folder.is_dir():
        raise PublishError(f"{folder}: no such folder")
    if not (folder / "README.md").is_file():
        raise PublishError(
            f"{folder} has no README.md: not a dataset folder written by scripts/generate.py "
            "(its card holds the `configs:` that load_dataset reads)"
        )
    meta, _ = split_card((folder / "README.md").read_text(encoding="utf-8"))
    configs = _config_patterns(meta)
    if "default" not in configs and not any(c.get("default") for c in meta["configs"]):
        raise PublishError("README.md: no `default` configuration in `configs:`")
    info = {
        i.get("config_name", "default"): {s["name"]: s.get("num_examples") for s in i.get("splits", [])}
        for i in (meta.get("dataset_info") or [])
        if isinstance(i, dict)
    }
    rows: dict[str, dict[str, int]] = {}
    for name, splits in configs.items():
        rows[name] = {}
        for split, patterns in splits.items():
            files = sorted({f for p in patterns for f in _matches(folder, p)})
            if not files:
                raise PublishError(
                    f"{folder}: configuration {name!r} split {split!r} has no file matching "
                    f"{', '.join(patterns)} (was the folder copied incompletely?)"
                )
            n = _parquet_rows(folder, files)
            expected = info.get(name, {}).get(split)
            if n is not None and expected is not None and n != expected:
                raise PublishError(
                    f"{folder}: configuration {name!r} split {split!r} has {n} rows in its files but the "
                    f"card says {expected}; regenerate the folder (files may be left over from another run)"
                )
            rows[name][split] = n if n is not None else -1
    for name, splits in rows.items():
        if all(n == 0 for n in splits.values()):
            if name == "default":
                raise PublishError(f"{folder}: the default configuration has no rows")
            continue
        try:
            loaded = load_dataset(str(folder), name, streaming=True)
            if set(loaded) != set(splits):
                raise PublishError(
                    f"{folder}: load_dataset(folder, {name!r}) gives splits {sorted(loaded)}, "
                    f"the card lists {sorted(splits)}"
                )
            for split, n in splits.items():
                if n != 0:
                    next(iter(loaded[split]))
        except PublishError:
            raise
        except Exception as e:  # datasets raises many types; the message is what matters
            raise PublishError(
                f"{folder}: datasets.load_dataset cannot read configuration {name!r} "
                f"({type(e).__name__}: {e})"
            ) from e
    return rows


# ----------------------------------------------------------------------------------------------
# Staging: the exact files to send
# ----------------------------------------------------------------------------------------------


LINKED = (".parquet", ".safetensors", ".bin")  # data never edited in place: hard-linked, not copied


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.suffix in LINKED:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def _empty_target(path: Path, what: str) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise PublishError(f"{what} {path} exists and is not empty; choose a new folder")
    path.mkdir(parents=True, exist_ok=True)


def _inside(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def stage_dataset(
    folder: str | os.PathLike,
    target: str | os.PathLike,
    repo_id: str | None = None,
    license: str | None = None,
) -> list[str]:
    """Write the files a dataset folder publishes into ``target`` (empty or new): every file of
    :func:`dataset_files`, the card with ``license`` applied and the loading example naming
    ``repo_id``. Returns the relative paths written."""
    folder, target = Path(folder), Path(target)
    if _inside(target, folder):
        raise PublishError(f"{target} is inside the dataset folder {folder}; choose a folder outside it")
    files = dataset_files(folder)
    _empty_target(target, "--dry-run folder")
    for rel in files:
        if rel == "README.md":
            continue
        _link_or_copy(folder / rel, target / rel)
    meta, body = split_card((folder / "README.md").read_text(encoding="utf-8"))
    if license:
        meta["license"] = license
    meta.setdefault("license", "other")
    if repo_id:
        body = body.replace('"path/to/this/folder"', json.dumps(repo_id))
    (target / "README.md").write_text(join_card(meta, body), encoding="utf-8")
    return files


def model_files(model_dir: str | os.PathLike) -> list[str]:
    """The files a model folder publishes: its top-level files (weights, config, preprocessing, card,
    training arguments, logs, reports) and the evaluation reports in its subfolders; never the
    ``checkpoint-*`` folders (optimizer states)."""
    model_dir = Path(model_dir)
    files = set(_top_level_files(model_dir))
    for report in model_dir.rglob("report.json"):
        rel = report.relative_to(model_dir)
        if len(rel.parts) == 1 or any(p.startswith(("checkpoint-", ".")) for p in rel.parts):
            continue
        for p in report.parent.iterdir():
            if p.is_file() and p.name.startswith("report"):
                files.add(p.relative_to(model_dir).as_posix())
    return sorted(files)


def validate_model_folder(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Check a model folder written by scripts/train.py: ``config.json`` that transformers reads,
    weights, and a preprocessing file. Returns the parsed config."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise PublishError(f"--model {model_dir}: no such folder")
    if not (model_dir / "config.json").is_file():
        raise PublishError(
            f"--model {model_dir} has no config.json: not a model folder written by scripts/train.py "
            "(training saves the final model there when it finishes)"
        )
    if not any((model_dir / w).is_file() for w in MODEL_WEIGHTS):
        raise PublishError(f"--model {model_dir} has no weights ({' or '.join(MODEL_WEIGHTS)})")
    from transformers import AutoConfig

    import debias.models  # noqa: F401  (registers the small ResNet with the Auto classes)

    try:
        config = AutoConfig.from_pretrained(str(model_dir), **trust.code_kwargs())
    except Exception as e:  # transformers raises several types for a bad config
        raise PublishError(f"--model {model_dir}: transformers cannot read config.json ({e})") from e
    return config.to_dict()


def stage_model(
    model_dir: str | os.PathLike,
    target: str | os.PathLike,
    repo_id: str | None = None,
    license: str | None = None,
    dataset_id: str | None = None,
) -> list[str]:
    """Write the files a model folder publishes into ``target``; the card is re-rendered (latest
    evaluation report, ``license``, ``repo_id`` in the loading example) when it is the generated one
    and ``training_args.json`` is there, and written fresh when missing."""
    from debias.modelcard import CARD_MARKER, render_model_card

    model_dir, target = Path(model_dir), Path(target)
    if _inside(target, model_dir):
        raise PublishError(f"{target} is inside the model folder {model_dir}; choose a folder outside it")
    files = model_files(model_dir)
    _empty_target(target, "--dry-run folder")
    for rel in files:
        if rel != "README.md":
            _link_or_copy(model_dir / rel, target / rel)
    card = model_dir / "README.md"
    text = card.read_text(encoding="utf-8") if card.is_file() else None
    if text is None or CARD_MARKER in text:
        text = render_model_card(model_dir, license=license, repo_id=repo_id, dataset_id=dataset_id)
    elif license:
        meta, body = split_card(text)
        meta["license"] = license
        text = join_card(meta, body)
    (target / "README.md").write_text(text, encoding="utf-8")
    return sorted(set(files) | {"README.md"})


# ----------------------------------------------------------------------------------------------
# The Hub
# ----------------------------------------------------------------------------------------------


def resolve_token() -> str | None:
    """The Hub token huggingface_hub would use (``HF_TOKEN``, then the login cache), or None."""
    from huggingface_hub import get_token

    return get_token()


def hub_offline() -> bool:
    """True when huggingface_hub refuses network access (``HF_HUB_OFFLINE``)."""
    from huggingface_hub import is_offline_mode

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(is_offline_mode())


def _connect(api=None):
    """(api, token), or a PublishError saying how to get online or log in. Nothing is sent."""
    if hub_offline():
        raise PublishError(
            "offline mode is on (HF_HUB_OFFLINE=1), so nothing can be uploaded; unset HF_HUB_OFFLINE on a "
            "machine with network access, or use --dry-run FOLDER to write the files locally"
        )
    token = resolve_token()
    if not token:
        raise PublishError(f"no Hugging Face token found: {LOGIN_HELP}")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    return api, token


def _hub_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import HfHubHTTPError

    errors: list[type[BaseException]] = [HfHubHTTPError, OSError]
    try:
        import httpx

        errors.append(httpx.HTTPError)
    except ImportError:
        pass
    return tuple(errors)


def _push(
    api,
    token: str,
    staged: Path,
    repo_id: str,
    repo_type: str,
    private: bool,
    revision: str | None,
    commit_message: str,
    delete_patterns: list[str],
) -> dict[str, Any]:
    try:
        # private=None leaves an existing repository's visibility as it is
        url = api.create_repo(
            repo_id, token=token, repo_type=repo_type, private=private or None, exist_ok=True
        )
        if revision:
            api.create_branch(repo_id, branch=revision, token=token, repo_type=repo_type, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(staged),
            repo_type=repo_type,
            revision=revision,
            token=token,
            commit_message=commit_message,
            delete_patterns=delete_patterns,
        )
    except _hub_errors() as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise PublishError(
                f"the Hub refused the token for {repo_id} (HTTP {status}): {LOGIN_HELP}"
            ) from e
        # the client's message may quote the request; the token must not reach a log
        raise PublishError(
            trust.redact(f"uploading to {repo_id} failed: {type(e).__name__}: {e}", [token])
        ) from e
    return {
        "repo_id": repo_id,
        "repo_type": repo_type,
        "url": str(getattr(commit, "commit_url", None) or url),
        "revision": revision or "main",
        "private": private,
    }


def check_repo_id(repo_id: str) -> None:
    """A PublishError unless ``repo_id`` is a valid Hub repository id (``name`` or ``owner/name``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PublishError(f"--repo-id {repo_id!r} is not a Hub repository id (owner/name): {e}") from e


def _staging_dir(near: Path) -> Path:
    """A temporary folder beside ``near`` (same file system: hard links), else in the system's."""
    try:
        return Path(tempfile.mkdtemp(prefix=".publish-", dir=near.resolve().parent))
    except OSError:
        return Path(tempfile.mkdtemp(prefix="publish-"))


def publish_dataset(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    dry_run: str | os.PathLike | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    license: str | None = None,
    api=None,
) -> dict[str, Any]:
    """Validate a dataset folder and push it to the Hub dataset ``repo_id`` (or, with ``dry_run``,
    write the exact files into that folder and send nothing). Returns what was done."""
    check_repo_id(repo_id)
    folder = Path(folder)
    rows = validate_dataset_folder(folder)
    if dry_run is not None:
        files = stage_dataset(folder, dry_run, repo_id, license)
        validate_dataset_folder(dry_run)
        return {"dry_run": str(dry_run), "repo_id": repo_id, "files": files, "rows": rows}
    api, token = _connect(api)
    staged = _staging_dir(folder)
    try:
        files = stage_dataset(folder, staged, repo_id, license)
        done = _push(
            api,
            token,
            staged,
            repo_id,
            "dataset",
            private,
            revision,
            commit_message or f"Upload counterfactual dataset {folder.name}",
            # shards of an earlier upload that this one does not have would otherwise still be read
            delete_patterns=["data/*", "rejected/*", "phrase_masks/*"],
        )
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return {**done, "files": files, "rows": rows}


def publish_model(
    model_dir: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    dry_run: str | os.PathLike | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    license: str | None = None,
    dataset_id: str | None = None,
    api=None,
) -> dict[str, Any]:
    """Validate a trained model folder and push it (weights, config, preprocessing, card, training
    arguments and logs, evaluation reports) to the Hub model ``repo_id``; ``dry_run`` as above."""
    check_repo_id(repo_id)
    model_dir = Path(model_dir)
    validate_model_folder(model_dir)
    if dry_run is not None:
        files = stage_model(model_dir, dry_run, repo_id, license, dataset_id)
        return {"dry_run": str(dry_run), "repo_id": repo_id, "files": files}
    api, token = _connect(api)
    staged = _staging_dir(model_dir)
    try:
        files = stage_model(model_dir, staged, repo_id, license, dataset_id)
        done = _push(
            api,
            token,
            staged,
            repo_id,
            "model",
            private,
            revision,
            commit_message or f"Upload {model_dir.name} (scripts/train.py)",
            delete_patterns=["*.safetensors", "*.bin", "*.index.json"],
        )
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return {**done, "files": files}


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="publish.py",
        description=(
            "Push a dataset folder (scripts/generate.py) or, with --model, a trained model folder "
            "(scripts/train.py) to the Hugging Face Hub, after checking that it is complete. The token "
            "comes from HF_TOKEN or `hf auth login`."
        ),
    )
    p.add_argument("folder", nargs="?", help="dataset folder written by scripts/generate.py")
    p.add_argument("--model", metavar="DIR", help="publish this model folder (scripts/train.py --output-dir)")
    p.add_argument("--repo-id", required=True, help="the Hub repository, e.g. me/my-counterfactuals")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument(
        "--dry-run",
        metavar="FOLDER",
        help="write exactly the files that would be uploaded into FOLDER (new or empty) and send nothing",
    )
    p.add_argument(
        "--revision", "--branch", dest="revision", help="branch to push to (created if missing; default main)"
    )
    p.add_argument("--commit-message", help="the commit message")
    p.add_argument(
        "--license",
        help="license id for the card's metadata, e.g. cc-by-4.0, apache-2.0 (default: the card's, else other)",
    )
    p.add_argument(
        "--dataset-id",
        help="--model: the Hub dataset the model was trained on (listed in the card's `datasets`)",
    )
    return p


def cli(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if bool(args.folder) == bool(args.model):
        p.error("give either a dataset FOLDER or --model DIR (one of them)")
    try:
        if args.model:
            result = publish_model(
                args.model,
                args.repo_id,
                private=args.private,
                dry_run=args.dry_run,
                revision=args.revision,
                commit_message=args.commit_message,
                license=args.license,
                dataset_id=args.dataset_id,
            )
        else:
            result = publish_dataset(
                args.folder,
                args.repo_id,
                private=args.private,
                dry_run=args.dry_run,
                revision=args.revision,
                commit_message=args.commit_message,
                license=args.license,
            )
    except (PublishError, FileNotFoundError, ValueError) as e:
        print(f"publish.py: error: {trust.redact(str(e))}", file=sys.stderr)
        return 2
    files = result.pop("files")
    print(json.dumps({**result, "num_files": len(files)}, indent=2))
    if args.dry_run:
        print(f"wrote {len(files)} files to {args.dry_run}; nothing was sent")
    else:
        print(f"pushed {len(files)} files to {result['url']}")
    return 0
