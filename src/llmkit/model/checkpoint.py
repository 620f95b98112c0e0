"""Checkpoint directories: ``config.json`` + ``model.safetensors`` (+ tokenizer files), or ``shards/`` in
place of ``model.safetensors`` for a checkpoint saved sharded (:mod:`llmkit.model.sharded`), which every
loader reads the same way (consolidated on read: the whole model must fit the loading process).

A run directory holds ``checkpoints/step_NNNNNNNN/`` folders and a ``latest`` file naming the newest
complete one; :func:`resolve_checkpoint` accepts either a run directory or a checkpoint folder.
A damaged file (truncated weights, bad JSON, an unknown config key) is a one-line error naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llmkit import __version__
from llmkit.config import build
from llmkit.errors import ConfigError, InputError, MismatchError
from llmkit.io import atomic_write_json, read_json, sha256_file
from llmkit.model.config import ModelConfig
from llmkit.model.sharded import EXTRA, MODEL, SHARDS
from llmkit.model.transformer import Transformer
from llmkit.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LATEST = "latest"
# Weights trained beside the language model that are not part of it (PPO's value head).
EXTRA_WEIGHTS = "extra_weights.safetensors"
BEST = "best"  # the checkpoint of the best evaluation (``TrainConfig.best_metric``), when one was kept
# What ``latest`` may hold: one folder directly inside checkpoints/, so a crafted pointer
# ("../../..", an absolute path) cannot lead a resume or a server out of the run directory.
LATEST_PATTERN = re.compile(r"checkpoints/step_[0-9]+")


def read_latest(run_directory: Path, name: str = LATEST) -> Path:
    """The checkpoint folder named by the run's ``latest`` (or ``best``) file (which may not exist any more)."""
    pointer = run_directory / name
    if not pointer.is_file():
        raise InputError(f"{pointer}: file not found")
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        raise InputError(f"{pointer}: not valid UTF-8") from None
    if not LATEST_PATTERN.fullmatch(name):
        raise InputError(
            f"{pointer}: must name a folder of checkpoints/ like checkpoints/step_00000100, not {name[:80]!r}"
        )
    return run_directory / name


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder that ``path`` names directly, through its run directory's ``latest`` pointer, or
    as a pointer file itself (``runs/grpo/best``: the run's best checkpoint)."""
    path = Path(path)
    if holds_model(path):
        return path
    pointer = path if path.name in (LATEST, BEST) and path.is_file() else path / LATEST
    if pointer.is_file():
        target = read_latest(pointer.parent, pointer.name)
        if holds_model(target):
            return target
        raise InputError(f"{pointer}: points at {target}, which holds no model.safetensors or {SHARDS}/")
    if not path.exists():
        raise InputError(f"{path}: checkpoint not found")
    raise InputError(f"{path}: not a checkpoint (no model.safetensors, no {SHARDS}/ and no '{LATEST}' pointer)")


def holds_model(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() or (folder / SHARDS).is_dir()


def write_model(directory: Path, state_dict: dict[str, torch.Tensor], config: ModelConfig, metadata: dict) -> None:
    """Write ``model.safetensors`` and ``config.json`` into ``directory`` (itself being built atomically)."""
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state_dict.items()}
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # stored once, as the embedding (safetensors forbids aliases)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    write_config(directory, config, metadata)


def write_config(directory: Path, config: ModelConfig, metadata: dict) -> None:
    """``config.json``: the model's config, llmkit's version and the stage's ``metadata``."""
    atomic_write_json(
        directory / "config.json", {"model": dataclasses.asdict(config), "llmkit_version": __version__, **metadata}
    )


def read_config(checkpoint: Path) -> dict:
    config = read_json(checkpoint / "config.json")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise InputError(f"{checkpoint / 'config.json'}: no 'model' section")
    return config


def model_config_of(checkpoint: Path, config: dict) -> ModelConfig:
    """The :class:`ModelConfig` of a checkpoint's ``config.json`` (read as ``config``); an unknown or invalid
    field is an error naming it and the file."""
    try:
        return build(ModelConfig, config["model"], source="its 'model' section")
    except ConfigError as error:
        raise InputError(f"{checkpoint / 'config.json'}: {error}") from None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file; a truncated or foreign file is an error naming it."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise InputError(f"{path}: not a readable safetensors file ({error})") from None


def read_model_weights(checkpoint: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The language model's weights of a checkpoint folder, either format, tied embeddings stored once."""
    if (checkpoint / "model.safetensors").is_file():
        return read_weights(checkpoint / "model.safetensors")
    from llmkit.model.shard_io import read_full  # imported on use (shard_io's docstring)

    return read_full(checkpoint / SHARDS, MODEL, config)


def weights_sha256(checkpoint: Path) -> str:
    """The sha256 naming a checkpoint folder's weights: of ``model.safetensors``, or of a sharded
    checkpoint's shard files' sha256s in name order."""
    if (checkpoint / SHARDS).is_dir():
        digests = "".join(sha256_file(path) for path in sorted((checkpoint / SHARDS).iterdir()))
        return hashlib.sha256(digests.encode("ascii")).hexdigest()
    return sha256_file(checkpoint / "model.safetensors")


def read_extra_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The weights trained beside the language model (:data:`EXTRA_WEIGHTS`), either format; {} if none."""
    if (checkpoint / SHARDS).is_dir():
        from llmkit.model.shard_io import read_full  # imported on use (shard_io's docstring)

        return read_full(checkpoint / SHARDS, EXTRA)
    return read_weights(checkpoint / EXTRA_WEIGHTS) if (checkpoint / EXTRA_WEIGHTS).is_file() else {}


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    model_class: type[Transformer] = Transformer,
) -> tuple[Transformer, dict]:
    """The model of a checkpoint (a run directory or a checkpoint folder) and its ``config.json``;
    ``model_class`` builds it: a subclass that adds heads to the Transformer, such as the reward model."""
    checkpoint = resolve_checkpoint(path)
    config = read_config(checkpoint)
    model_config = model_config_of(checkpoint, config)
    weights = checkpoint / ("model.safetensors" if (checkpoint / "model.safetensors").is_file() else SHARDS)
    state = read_model_weights(checkpoint, model_config)
    return model_of_weights(model_config, state, device, dtype, model_class, str(weights)), config


def model_of_weights(
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    model_class: type[Transformer] = Transformer,
    source: str = "the weights",
) -> Transformer:
    """A ``model_class`` of ``config`` holding ``state``'s tensors (not copies, unless moving them to ``device`` and
    ``dtype`` makes some), in evaluation mode; refuses weights that do not match the config, naming ``source``."""
    with torch.device("meta"):
        model = model_class(config)
    state = dict(state)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["token_embedding.weight"]
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise MismatchError(
            f"{source}: weights do not match config.json "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    model.load_state_dict(state, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.token_embedding.weight
    model.reset_position_tables(device)
    model.to(device=device, dtype=dtype)
    return model.eval()


def detached_copy(model: Transformer, dtype: torch.dtype | None = None) -> Transformer:
    """A copy of ``model`` (its class, config and weights, in ``dtype``) that shares no tensor with it, in evaluation
    mode: what may be re-laid out or quantized while ``model`` trains on."""
    tied = "lm_head.weight" if model.config.tie_embeddings else None  # model_of_weights ties it again: no second copy
    weights = {
        name: tensor.detach().to(dtype=dtype, copy=True) for name, tensor in model.state_dict().items() if name != tied
    }
    return model_of_weights(model.config, weights, model.token_embedding.weight.device, dtype, type(model))


@dataclasses.dataclass
class LoadedCheckpoint:
    model: Transformer
    tokenizer: Tokenizer
    path: Path  # the checkpoint folder (a run directory resolved through its latest pointer)
    config: dict  # its config.json


def load_checkpoint(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    model_class: type[Transformer] = Transformer,
    stage: str | None = None,
) -> LoadedCheckpoint:
    """The one loader every stage uses: a checkpoint's model (see :func:`load_model`) with the tokenizer it
    was trained with. Refuses another tokenizer (its sha256 is in config.json), one with more tokens than
    the model's vocabulary, and, when ``stage`` is given, a checkpoint another stage wrote."""
    checkpoint = resolve_checkpoint(path)
    if stage is not None and (written_by := read_config(checkpoint).get("stage")) != stage:
        raise InputError(f"{checkpoint}: config.json has stage {written_by!r}, not {stage!r} (from `llmkit {stage}`)")
    model, config = load_model(checkpoint, device, dtype, model_class)
    tokenizer = Tokenizer.load(checkpoint)
    expected = config.get("tokenizer_sha256")
    if expected and expected != tokenizer.sha256:
        raise MismatchError(
            f"{checkpoint}: tokenizer.json (sha256 {tokenizer.sha256[:12]}) is not the one the model was trained "
            f"with (sha256 {expected[:12]})"
        )
    if tokenizer.vocab_size > model.config.vocab_size:
        raise MismatchError(
            f"{checkpoint}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{model.config.vocab_size}"
        )
    return LoadedCheckpoint(model, tokenizer, checkpoint, config)
