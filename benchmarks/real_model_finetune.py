"""Fine-tuning throughput on a real model: SmolLM2-135M-Instruct trained by llmkit's Trainer and by TRL's
``SFTTrainer`` on the same batches, full fine-tuning and LoRA.

The model is ../shared/data/models/SmolLM2-135M-Instruct.Q4_1.gguf imported with ``llmkit import`` (float32
weights; the script skips with a reason when the file is absent); transformers loads the same weights from
``llmkit export --format hf``. The data are the 200 Alpaca samples of ../shared/data/alpaca in the model's own
chat format (ChatML), each conversation rendered once by ``llmkit.chat.render_ids`` with its assistant mask,
concatenated and cut into rows of ``--length`` tokens. Both systems get these rows in the same order,
``--batch`` rows a step, with the loss on assistant tokens only (llmkit: next-token targets, ``IGNORE_INDEX``
elsewhere, through ``sft_loss``, the SFT stage's loss; TRL: a pre-tokenised dataset with ``labels``, -100
elsewhere, which its collator keeps), plain causal attention over each row, AdamW, gradient clipping at 1.0,
no activation checkpointing, the same precision (float32, or bfloat16 autocast for both), the same threads.

* ``full``: every weight trained. ``lora``: rank 8, alpha 16, on every block projection — llmkit's fused
  ``qkv``/``out``/``up``/``down`` (:mod:`llmkit.model.lora`), PEFT's ``q/k/v/o/gate/up/down_proj`` (the same
  weights, cut in more pieces: PEFT's adapters hold more parameters, both counts are reported).
* ``finetune_tokens_per_s``: ``batch × length`` over the median wall time of a step (from one step's end to
  the next, data loading and the optimizer included), the first step of each run left out (warm-up); systems
  alternate run by run (``--repeats`` runs of ``--steps`` steps each, fresh weights every run).
* Three TRL systems: ``trl``, its defaults (its collator gives every batch an all-ones ``attention_mask``);
  ``trl_no_mask``, the same with ``position_ids`` in place of that mask, so transformers' attention takes its
  causal fast path (rows here have no padding, so the loss is the same): TRL as a user tuning it for speed
  would run it; ``trl_kept_memory``, the defaults in a process with the allocator settings llmkit's trainer
  makes (``llmkit.train.allocator``: freed memory kept for the next step, which any process can get from
  glibc's environment variables), so the table shows what that setting alone is worth.
* Every run is a process of its own (forked from a server that has imported torch and TRL but run nothing):
  the allocator setting is process-wide, and a TRL run must not inherit it from an llmkit run before it.
* ``finetune_speedup_vs_trl``: llmkit's rate over each TRL system's (goal >= 1.5 against ``trl``).
* ``step0_loss``: each system's loss on the first batch, before any update (the same computation: they
  must agree to float32 rounding, or to bfloat16 autocast's).

It takes about 16 minutes on 2 cores with the defaults. Timings taken while other jobs share the CPU are void.

Usage: python benchmarks/real_model_finetune.py [--modes full lora] [--dtypes float32 bfloat16] [--batch 4]
    [--length 256] [--steps 4] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import SHARED_DATA, SMOLLM2, emit, require  # noqa: E402

from llmkit.align.sft import sft_loss, sft_training  # noqa: E402
from llmkit.chat import render_ids  # noqa: E402
from llmkit.model.checkpoint import load_checkpoint  # noqa: E402
from llmkit.model.lora import LoRAConfig, apply_lora  # noqa: E402
from llmkit.tokenizer import Tokenizer  # noqa: E402
from llmkit.train.allocator import keep_freed_memory  # noqa: E402
from llmkit.train.objectives import IGNORE_INDEX  # noqa: E402
from llmkit.train.trainer import Trainer, TrainingHooks  # noqa: E402

MODEL = SMOLLM2
ALPACA = SHARED_DATA / "alpaca" / "alpaca_200.json"
LEARNING_RATES = {"full": 2e-5, "lora": 2e-4}
LORA_RANK, LORA_ALPHA = 8, 16.0
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def alpaca_conversations(path: Path) -> list[list[dict]]:
    conversations = []
    for sample in json.loads(path.read_text()):
        question = sample["instruction"] + (f"\n\n{sample['input']}" if sample["input"] else "")
        conversations.append(
            [
                {"role": "user", "content": question},
                {"role": "assistant", "content": sample["output"]},
            ]
        )
    return conversations


def rows_of(tokenizer, conversations: list[list[dict]], rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` windows of ``length`` tokens over the rendered conversations, one after another (cycled when
    too few): ids and the assistant mask (True on tokens the assistant wrote)."""
    ids, mask = [], []
    while len(ids) < rows * length:
        for messages in conversations:
            piece, piece_mask = render_ids(tokenizer, messages)
            ids += piece
            mask += piece_mask
    shape = (rows, length)
    return torch.tensor(ids[: rows * length]).view(shape), torch.tensor(mask[: rows * length]).view(shape)


class FixedBatches:
    """The rows as llmkit's SFT batches: next-token targets on assistant tokens; a row is one document (the
    last position has no next token in the row, as in the transformers model's shifted loss)."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, batch_size: int):
        self.ids, self.batch_size = ids, batch_size
        self.targets = torch.full_like(ids, IGNORE_INDEX)
        self.targets[:, :-1] = torch.where(mask[:, 1:], ids[:, 1:], IGNORE_INDEX)

    def get_batch(self, index: int) -> dict[str, torch.Tensor]:
        rows = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return {
            "input_ids": self.ids[rows],
            "targets": self.targets[rows],
            "document_ids": torch.zeros_like(self.ids[rows]),
        }


def median_step(ends: list[float]) -> float:
    """The median time between consecutive step ends, the first step (warm-up) left out."""
    return statistics.median(b - a for a, b in zip(ends, ends[1:]))


# ---------------------------------------------------------------------------------------------- llmkit
class StepClock(TrainingHooks):
    def __init__(self):
        self.ends: list[float] = []

    def after_step(self, trainer) -> None:
        self.ends.append(time.perf_counter())


def llmkit_run(checkpoint: Path, batches: FixedBatches, mode: str, dtype: str, steps: int, out: Path) -> dict:
    model = load_checkpoint(checkpoint).model
    if mode == "lora":
        torch.manual_seed(0)
        apply_lora(model, LoRAConfig(rank=LORA_RANK, alpha=LORA_ALPHA))
    model.train()
    config = sft_training(
        out=str(out),
        batch_size=batches.batch_size,
        lr=LEARNING_RATES[mode],
        schedule="constant",
        warmup_steps=0,
        dtype=dtype,
        device="cpu",
        max_steps=steps,
        eval_interval=0,
        log_interval=1,
        checkpoint_interval=10**9,
        progress=False,
    )
    clock = StepClock()
    Trainer(
        model,
        batches,
        config,
        loss_fn=sft_loss,
        tokens_per_batch=batches.ids[: batches.batch_size].numel(),
        hooks=clock,
    ).run()
    with open(out / "metrics.csv") as file:
        first = next(row for row in csv.DictReader(file) if row.get("step") == "1" and row.get("loss"))
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    return {"step_s": median_step(clock.ends), "step0_loss": float(first["loss"]), "trainable": trainable}


# ------------------------------------------------------------------------------------------------- TRL
def trl_run(
    hf_directory: Path, attention_mask: bool, batches: FixedBatches, mode: str, dtype: str, steps: int, out: Path
) -> dict:
    import transformers
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from trl import SFTConfig, SFTTrainer

    class InOrder(SFTTrainer):
        """The batches in the dataset's order, as llmkit's run gets them (the loss of step 0 is compared)."""

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    class Clock(transformers.TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    rows = steps * batches.batch_size
    labels = torch.where(batches.targets[:rows, :-1] != IGNORE_INDEX, batches.ids[:rows, 1:], -100)
    labels = torch.cat([torch.full((rows, 1), -100), labels], dim=1)  # the label of position j is token j
    dataset = Dataset.from_dict({"input_ids": batches.ids[:rows].tolist(), "labels": labels.tolist()})
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_directory, dtype=torch.float32)
    peft_config = None
    if mode == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=PEFT_TARGETS, task_type="CAUSAL_LM"
        )
    args = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=batches.batch_size,
        max_steps=steps,
        learning_rate=LEARNING_RATES[mode],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.1,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        max_length=batches.ids.shape[1],
        packing=False,
        gradient_checkpointing=False,
        bf16=dtype == "bfloat16",
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    clock = Clock()
    trainer = InOrder(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=transformers.AutoTokenizer.from_pretrained(hf_directory),
        peft_config=peft_config,
        callbacks=[clock],
    )
    trainer.remove_callback(transformers.PrinterCallback)  # its log lines would break the JSON-lines output
    if not attention_mask:
        collate = trainer.data_collator

        def positions_instead_of_mask(examples):
            batch = collate(examples)
            del batch["attention_mask"]
            batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
            return batch

        trainer.data_collator = positions_instead_of_mask
    trainer.train()
    first = next(entry for entry in trainer.state.log_history if entry.get("step") == 1 and "loss" in entry)
    trainable = sum(parameter.numel() for parameter in trainer.model.parameters() if parameter.requires_grad)
    return {"step_s": median_step(clock.ends), "step0_loss": float(first["loss"]), "trainable": trainable}


SYSTEMS = ["llmkit", "trl", "trl_no_mask", "trl_kept_memory"]


def run_system(name: str, threads: int, directory: Path, *run) -> dict:
    """One run of system ``name`` (in a process of its own: see the module docstring)."""
    torch.set_num_threads(threads)
    if name == "llmkit":
        return llmkit_run(directory / "llmkit", *run)
    if name == "trl_kept_memory":
        keep_freed_memory()
    return trl_run(directory / "hf", name != "trl_no_mask", *run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=["full", "lora"], default=["full", "lora"])
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="steps per run (the first is left out)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per system, alternating")
    parser.add_argument("--threads", type=int, default=2)
    arguments = parser.parse_args()
    require(MODEL)
    require(ALPACA)
    if arguments.steps < 3:
        parser.error("--steps must be at least 3 (the first step is left out of the median)")
    torch.set_num_threads(arguments.threads)
    from llmkit.interop.gguf_import import import_gguf
    from llmkit.interop.hf import export_hf

    context = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF weights, float32)",
        "batch": arguments.batch,
        "length": arguments.length,
        "threads": arguments.threads,
        "torch": torch.__version__,
    }
    with tempfile.TemporaryDirectory() as directory:
        directory = Path(directory)
        checkpoint = directory / "llmkit"
        import_gguf(MODEL, checkpoint)
        export_hf(checkpoint, directory / "hf")
        tokenizer = Tokenizer.load(checkpoint)  # the tokenizer alone: the model is loaded by each run
        rows = arguments.batch * arguments.steps
        ids, mask = rows_of(tokenizer, alpaca_conversations(ALPACA), rows, arguments.length)
        batches = FixedBatches(ids, mask, arguments.batch)
        processes = multiprocessing.get_context("forkserver")
        processes.set_forkserver_preload(["torch", "transformers", "trl", "llmkit.train.trainer"])
        for mode in arguments.modes:
            for dtype in arguments.dtypes:
                results: dict[str, list[dict]] = {name: [] for name in SYSTEMS}
                for repeat in range(arguments.repeats):
                    for name in SYSTEMS:
                        out = directory / f"{name}_{mode}_{dtype}_{repeat}"
                        run = (name, arguments.threads, directory, batches, mode, dtype, arguments.steps, out)
                        with ProcessPoolExecutor(1, mp_context=processes) as pool:
                            results[name].append(pool.submit(run_system, *run).result())
                rates = {}
                for name, runs in results.items():
                    step_s = statistics.median(run["step_s"] for run in runs)
                    rates[name] = arguments.batch * arguments.length / step_s
                    emit(
                        "finetune_tokens_per_s",
                        round(rates[name], 1),
                        "tokens/s",
                        system=name,
                        mode=mode,
                        dtype=dtype,
                        trainable_parameters=runs[0]["trainable"],
                        per_run=[round(arguments.batch * arguments.length / run["step_s"], 1) for run in runs],
                        **context,
                    )
                    emit("step0_loss", round(runs[0]["step0_loss"], 5), "nats", system=name, mode=mode, dtype=dtype)
                for reference in SYSTEMS[1:]:
                    emit(
                        "finetune_speedup_vs_trl",
                        round(rates["llmkit"] / rates[reference], 3),
                        "x",
                        trl_system=reference,
                        mode=mode,
                        dtype=dtype,
                        goal=1.5,
                        trl=_version("trl"),
                        peft=_version("peft") if mode == "lora" else None,
                        transformers=_version("transformers"),
                    )


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
