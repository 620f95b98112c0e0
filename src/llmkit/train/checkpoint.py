"""Training checkpoints: the model files plus optimizer and trainer state, written atomically and durably.

Layout of a run directory::

    latest                     -> "checkpoints/step_00000500"
    checkpoints/step_00000500/ config.json model.safetensors tokenizer files
                               optimizer.pt trainer_state.json manifest.json
                               [extra_weights.safetensors]
    metrics.csv loss.png

``model.safetensors`` is the language model alone, loadable as it is by every later stage; weights
trained with it that are not part of it (PPO's value head) go to ``extra_weights.safetensors``. That
full format gathers the whole state to rank 0; the sharded one (``--train.checkpoint-format sharded``,
:mod:`llmkit.train.sharded_checkpoint`) has every rank write its own pieces to ``shards/`` instead of
``model.safetensors``, ``extra_weights.safetensors`` and ``optimizer.pt``, with the optimizer's
hyperparameters in ``optimizer.json``. Both resume on any layout and load in every later stage.

A checkpoint is built in a temporary folder; ``manifest.json`` (size and sha256 of every other file)
is written last, every file and the folder are fsynced, the folder is renamed into place, and only
then does ``latest`` move and are older checkpoints pruned. Resuming verifies the manifest and, when
the newest checkpoint is damaged anyway (a disk error, a copy cut short), falls back to the newest
intact one before it.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import pickle
import shutil
from pathlib import Path, PurePosixPath

import torch
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from llmkit.errors import InputError, MismatchError
from llmkit.io import atomic_directory, atomic_write_json, atomic_write_text, read_json, sha256_file
from llmkit.model.checkpoint import (
    EXTRA_WEIGHTS,
    LATEST,
    model_config_of,
    read_config,
    read_extra_weights,
    read_latest,
    read_weights,
    write_config,
    write_model,
)
from llmkit.model.config import ModelConfig
from llmkit.model.sharded import SHARDS
from llmkit.train.parallel import canonical_state, layout_state
from llmkit.train.sharded_checkpoint import OPTIMIZER_GROUPS, load_sharded, rank_zero_folder, write_shards

logger = logging.getLogger(__name__)

# Full (unsharded) state on the CPU: a checkpoint written by 4 FSDP ranks loads in 1 process and back.
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)
MANIFEST = "manifest.json"
RESUME_FILES = {"config.json", "model.safetensors", "optimizer.pt", "trainer_state.json"}
SHARDED_RESUME_FILES = {"config.json", OPTIMIZER_GROUPS, "trainer_state.json"}


def encode_rng(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def decode_rng(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def gather_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Model and optimizer state dicts with plain parameter names, whatever the wrapping (DDP, FSDP2).
    Every rank must call this: under FSDP it gathers the shards."""
    # Under pipeline parallelism every rank keeps its stage's full state, for the first stage to gather.
    options = FULL_STATE if getattr(model, "pipeline_stages", 1) == 1 else StateDictOptions(full_state_dict=True)
    model_state = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    canonical_state(model, model_state, optimizer_state)  # tensor-parallel row order -> one process's
    return model_state, optimizer_state


def split_weights(state: dict, language_model: str) -> tuple[dict, dict]:
    """(the language model's weights under their own names, the other weights) of a trained module's
    state dict; ``language_model`` is the language model's attribute path in the module ("" : all of it)."""
    if not language_model:
        return state, {}
    prefix = language_model + "."
    inside = {name[len(prefix) :]: tensor for name, tensor in state.items() if name.startswith(prefix)}
    return inside, {name: tensor for name, tensor in state.items() if not name.startswith(prefix)}


def join_weights(model_state: dict, extra: dict, language_model: str) -> dict:
    """The trained module's state dict from the two parts :func:`split_weights` made."""
    prefix = language_model + "." if language_model else ""
    return {**{prefix + name: tensor for name, tensor in model_state.items()}, **extra}


def save_training_checkpoint(
    run_directory: Path,
    step: int,
    model_state: dict,
    optimizer_state: dict,
    model_config: ModelConfig,
    trainer_state: dict,
    metadata: dict,
    tokenizer=None,
    keep_last: int = 3,
    extra_weights: dict | None = None,
    spare: Path | None = None,
) -> Path:
    """Write the checkpoint of ``step`` atomically, point ``latest`` at it and prune older ones beyond
    ``keep_last`` (except ``spare``, the run's best checkpoint)."""
    final = run_directory / "checkpoints" / f"step_{step:08d}"
    with atomic_directory(final) as directory:
        write_model(directory, model_state, model_config, metadata)
        if extra_weights:
            save_file(
                {key: tensor.detach().cpu().contiguous() for key, tensor in extra_weights.items()},
                str(directory / EXTRA_WEIGHTS),
            )
        torch.save(optimizer_state, directory / "optimizer.pt")
        _finish(directory, trainer_state, tokenizer)
    _publish(run_directory, final, keep_last, spare)
    return final


def save_sharded_checkpoint(
    run_directory: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_config: ModelConfig,
    trainer_state: dict,
    metadata: dict,
    tokenizer=None,
    keep_last: int = 3,
    language_model: str = "",
    spare: Path | None = None,
    is_main: bool = True,
) -> Path:
    """:func:`save_training_checkpoint` with every rank writing its own pieces of ``model`` and ``optimizer``
    (:mod:`llmkit.train.sharded_checkpoint`) into rank 0's temporary folder; every rank calls it."""
    final = run_directory / "checkpoints" / f"step_{step:08d}"
    with atomic_directory(final) if is_main else contextlib.nullcontext() as directory:
        directory = rank_zero_folder(directory)
        groups = write_shards(directory / SHARDS, model, optimizer, model_config, language_model)
        if is_main:
            write_config(directory, model_config, metadata)
            atomic_write_json(directory / OPTIMIZER_GROUPS, {"param_groups": groups})
            _finish(directory, trainer_state, tokenizer)
    if is_main:
        _publish(run_directory, final, keep_last, spare)
    return final


def _finish(directory: Path, trainer_state: dict, tokenizer) -> None:
    """The trainer state, the tokenizer and, last, the manifest of a checkpoint folder being built."""
    atomic_write_json(directory / "trainer_state.json", trainer_state)
    if tokenizer is not None:
        tokenizer.save(directory)
    write_manifest(directory)


def _publish(run_directory: Path, final: Path, keep_last: int, spare: Path | None) -> None:
    # The pointer moves only once the folder is complete and on disk: an interrupted save leaves the old one in force.
    atomic_write_text(run_directory / LATEST, f"checkpoints/{final.name}\n")
    _prune(run_directory / "checkpoints", keep_last, keep=final, spare=spare)


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name[len("step_") :])


def _checkpoints_before(directory: Path, newest: Path) -> list[Path]:
    """The checkpoint folders of ``directory`` older than ``newest``, newest first."""
    older = [
        path
        for path in directory.glob("step_*")
        if path.is_dir() and path.name[len("step_") :].isdigit() and _step_of(path) < _step_of(newest)
    ]
    return sorted(older, key=_step_of, reverse=True)


def _prune(directory: Path, keep_last: int, keep: Path, spare: Path | None = None) -> None:
    """Keep ``keep`` (just written, on disk and named by ``latest``: the newest intact checkpoint), the
    ``keep_last - 1`` before it and ``spare``. Later-numbered folders, left by a run that fell back past
    them, are kept until the run overwrites them; the temporaries of saves killed half-way go."""
    for old in _checkpoints_before(directory, keep)[keep_last - 1 :]:
        if spare is None or old.name != spare.name:
            shutil.rmtree(old, ignore_errors=True)
    for leftover in directory.glob(".step_*"):
        shutil.rmtree(leftover, ignore_errors=True)


def write_manifest(directory: Path) -> None:
    """``manifest.json``: the size and sha256 of every file of a checkpoint being built; written last."""
    files = {
        path.relative_to(directory).as_posix(): {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }
    atomic_write_json(directory / MANIFEST, {"files": files})


def verify_checkpoint(checkpoint: Path) -> None:
    """Raise naming the first file a resume needs that is missing, truncated or altered (or the manifest,
    when it is missing or malformed), or a shard file the manifest does not list (the reader would take
    every file in ``shards/``)."""
    if not checkpoint.is_dir():
        raise InputError(f"{checkpoint}: checkpoint folder not found")
    manifest_path = checkpoint / MANIFEST
    manifest = read_json(manifest_path)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    sharded = isinstance(files, dict) and any(str(name).startswith(f"{SHARDS}/") for name in files)
    needed = SHARDED_RESUME_FILES if sharded else RESUME_FILES
    if not isinstance(files, dict) or not needed <= set(files):
        raise InputError(
            f"{manifest_path}: malformed manifest (needs a 'files' table listing {', '.join(sorted(needed))})"
        )
    if (checkpoint / SHARDS).is_dir():
        for path in sorted((checkpoint / SHARDS).iterdir()):
            if f"{SHARDS}/{path.name}" not in files:
                raise InputError(f"{path}: not listed in {MANIFEST} (planted or left by another save?)")
    for name, expected in files.items():
        # Names stay inside the checkpoint: a crafted manifest cannot make a resume read elsewhere.
        if not isinstance(expected, dict) or PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
            raise InputError(f"{manifest_path}: malformed entry {name!r}")
        path = checkpoint / name
        if not path.is_file():
            raise InputError(f"{path}: missing (listed in {MANIFEST})")
        if path.stat().st_size != expected.get("bytes"):
            raise InputError(
                f"{path}: {path.stat().st_size} bytes, {MANIFEST} says {expected.get('bytes')} (truncated?)"
            )
        if sha256_file(path) != expected.get("sha256"):
            raise InputError(f"{path}: sha256 differs from {MANIFEST} (corrupted)")


def resumable_checkpoint(run_directory: Path) -> Path:
    """The checkpoint ``latest`` names when it is intact, else the newest intact one before it; each damaged
    one passed over is logged in one line naming its bad file."""
    newest = read_latest(run_directory)
    damaged = []
    for checkpoint in [newest, *_checkpoints_before(run_directory / "checkpoints", newest)]:
        try:
            verify_checkpoint(checkpoint)
        except InputError as error:
            damaged.append(str(error))
            continue
        for reason in damaged:
            logger.warning("%s; resuming from %s instead", reason, checkpoint.name)
        return checkpoint
    raise InputError(f"{run_directory}: no intact checkpoint to resume from ({damaged[0]})")


def read_training_state(checkpoint: Path, device: str | torch.device = "cpu"):
    """``optimizer.pt``, tensors and plain containers only (``weights_only``: a planted file cannot run code)."""
    path = checkpoint / "optimizer.pt"
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as error:
        reason = str(error).split("\n")[0]  # torch's refusals run to several paragraphs
        raise InputError(f"{path}: not a readable training state ({reason})") from None


def load_training_checkpoint(
    run_directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_config: ModelConfig,
    language_model: str = "",
    stage: str | None = None,
) -> dict:
    """Restore model and optimizer in place from the run's newest intact checkpoint; return its trainer state.
    ``language_model``: where the checkpoint's model sits in ``model`` (:func:`split_weights`); ``stage``:
    the stage resuming, refused when the checkpoint names another."""
    checkpoint = resumable_checkpoint(run_directory)
    config = read_config(checkpoint)
    if stage is not None and config.get("stage") != stage:
        raise MismatchError(f"{checkpoint / 'config.json'}: cannot resume a {config.get('stage')} run as {stage}")
    saved = model_config_of(checkpoint, config)
    for field_name, value in vars(saved).items():
        if getattr(model_config, field_name) != value:
            raise MismatchError(
                f"{checkpoint / 'config.json'}: cannot resume, model field '{field_name}' was "
                f"{value!r} in the checkpoint but is {getattr(model_config, field_name)!r} now"
            )
    if (checkpoint / SHARDS).is_dir():
        load_sharded(checkpoint, model, optimizer, model_config, language_model)
        return read_json(checkpoint / "trainer_state.json")
    model_state = read_weights(checkpoint / "model.safetensors")
    if model_config.tie_embeddings:
        model_state["lm_head.weight"] = model_state["token_embedding.weight"]
    extra = read_extra_weights(checkpoint)
    model_state, optimizer_state = join_weights(model_state, extra, language_model), read_training_state(checkpoint)
    layout_state(model, model_state, optimizer_state)  # saved on any layout, resumed on this one
    set_model_state_dict(model, model_state, options=FULL_STATE)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=FULL_STATE)
    return read_json(checkpoint / "trainer_state.json")
