"""``llmkit``: the command line. Thin by design: flags and YAML become a config dataclass, then one
public function of the package runs; its summary is printed. User errors print as one line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

from llmkit import __version__
from llmkit.config import add_dataclass_arguments, config_from_args
from llmkit.errors import LlmkitError
from llmkit.infer.engine import EngineConfig
from llmkit.infer.sampling import GenerationConfig
from llmkit.sandbox import allow_unisolated
from llmkit.train.distributed import shutdown


@dataclass
class GenerateCommand:
    """``llmkit generate``: complete a prompt with a trained checkpoint."""

    prompt: str = field(default="", metadata={"help": "text to continue"})
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(checkpoint="runs/base"))
    generation: GenerationConfig = field(default_factory=GenerationConfig)


def _generate(config: GenerateCommand) -> None:
    from llmkit.infer import Engine

    engine = Engine.from_config(config.engine)
    pieces = engine.stream(config.prompt, config.generation)
    first = next(pieces, "")  # a prompt that does not fit fails here, before anything is printed
    sys.stdout.write(config.prompt + first)
    for delta in pieces:
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")


def resume_hint(config_class: type, words: tuple[str, ...]) -> str:
    """How an interrupted command continues: its resume flag, wherever its config keeps it."""
    fields = {field.name: field for field in dataclasses.fields(config_class)}
    if "resume" in fields:
        return "resume with --resume"
    if "train" in fields:
        return "resume with --train.resume"
    return "run the same command again"


def _print_summary(summary: dict) -> None:
    print(json.dumps(summary, indent=2, default=str))


def _commands() -> dict[tuple[str, ...], tuple[type, Callable, Callable | None, str]]:
    """(command words) -> (config class, function, printer of its result, help)."""
    from llmkit.align.dpo import DPOConfig, dpo
    from llmkit.align.grpo import GRPOConfig, grpo
    from llmkit.align.posttrain import PosttrainConfig, posttrain
    from llmkit.align.ppo import PPOConfig, ppo
    from llmkit.align.reward import RewardConfig, train_reward
    from llmkit.align.self_improve import SelfImproveConfig, run_self_improvement
    from llmkit.align.sft import SFTConfig, sft
    from llmkit.data.pipeline import PipelineConfig, run_pipeline
    from llmkit.data.shards import PrepareConfig, prepare_data
    from llmkit.data.tokenizer_training import TokenizerConfig, train_tokenizer
    from llmkit.eval.run import EvalConfig, run_eval
    from llmkit.interop import ExportConfig, ImportConfig, export_checkpoint, import_checkpoint
    from llmkit.plan.ablate import AblateConfig, ablate, format_ablation
    from llmkit.plan.estimate import EstimateConfig, estimate, format_estimate
    from llmkit.plan.parallel import PlanConfig, format_plan, plan
    from llmkit.plan.sweep import ScalingConfig, run_scaling
    from llmkit.pretrain import PretrainConfig, pretrain
    from llmkit.serve.chat_repl import ChatConfig, run_chat
    from llmkit.serve.server import ServeConfig, serve
    from llmkit.speedrun import SpeedrunConfig, speedrun

    return {
        ("tokenizer", "train"): (
            TokenizerConfig,
            train_tokenizer,
            _print_summary,
            "train a BPE or character tokenizer",
        ),
        ("data", "prepare"): (PrepareConfig, prepare_data, _print_summary, "tokenize a corpus into memmap shards"),
        ("data", "run"): (
            PipelineConfig,
            run_pipeline,
            _print_summary,
            "clean, filter, de-duplicate, mask PII, decontaminate, mix and tokenize a corpus, with a data report",
        ),
        ("pretrain",): (PretrainConfig, pretrain, _print_summary, "train a model from scratch on token shards"),
        ("generate",): (GenerateCommand, _generate, None, "complete a prompt with a checkpoint"),
        ("sft",): (
            SFTConfig,
            sft,
            _print_summary,
            "supervised fine-tuning on conversations (files and embedded tasks), full or LoRA, packed, "
            "with task mixing",
        ),
        ("reward",): (
            RewardConfig,
            train_reward,
            _print_summary,
            "train a reward model (scalar head on the LM) from preference pairs or ranked responses; held-out pair "
            "accuracy",
        ),
        ("ppo",): (
            PPOConfig,
            ppo,
            _print_summary,
            "RLHF with PPO: engine rollouts, KL-penalised reward, value head, GAE, clipped losses",
        ),
        ("grpo",): (GRPOConfig, grpo, _print_summary, "group relative policy optimisation with verifiable rewards"),
        ("posttrain",): (
            PosttrainConfig,
            posttrain,
            _print_summary,
            "SFT -> reward model -> GRPO/PPO -> DPO on the embedded arithmetic from a pretrained checkpoint, "
            "with the before/after table",
        ),
        ("dpo",): (
            DPOConfig,
            dpo,
            _print_summary,
            "tune a policy on preference pairs with the DPO, IPO or hinge loss against a frozen reference",
        ),
        ("self-improve",): (
            SelfImproveConfig,
            run_self_improvement,
            _print_summary,
            "sample chain-of-thought paths on unlabeled questions; keep the majority-voted ones as an SFT dataset",
        ),
        ("eval",): (
            EvalConfig,
            run_eval,
            _print_summary,
            "perplexity, multiple choice, GSM8K exact match (CoT, self-consistency, tools), code pass@k and "
            "BLEU/ROUGE, with a decontamination check and a report card",
        ),
        ("serve",): (ServeConfig, serve, None, "OpenAI-compatible HTTP API and browser chat page for a checkpoint"),
        ("chat",): (
            ChatConfig,
            run_chat,
            None,
            "chat with a checkpoint in the terminal (/system, /reset, /save, /quit)",
        ),
        ("export",): (
            ExportConfig,
            export_checkpoint,
            _print_summary,
            "a checkpoint as a Hugging Face directory (--format hf), a GGUF file for llama.cpp (--format gguf) or "
            "one model.safetensors (--format llmkit: a sharded checkpoint consolidated)",
        ),
        ("import",): (
            ImportConfig,
            import_checkpoint,
            _print_summary,
            "a local Hugging Face directory (Llama, Qwen3, GPT-2) or GGUF file (llama, qwen2, qwen3, gpt2) as an "
            "llmkit checkpoint",
        ),
        ("estimate",): (
            EstimateConfig,
            estimate,
            lambda result: print(format_estimate(result)),
            "parameters, memory, FLOPs and time of a model",
        ),
        ("plan",): (
            PlanConfig,
            plan,
            lambda result: print(format_plan(result)),
            "the fastest tensor x pipeline x data parallel layouts (ZeRO stage, micro-batch, recomputation) that fit",
        ),
        ("ablate",): (
            AblateConfig,
            ablate,
            lambda result: print(format_ablation(result)),
            "train model variants on the same data, budget and seed; table and validation curves",
        ),
        ("scaling",): (
            ScalingConfig,
            run_scaling,
            _print_summary,
            "IsoFLOP sweep, Kaplan and Chinchilla fits, compute-optimal N and D, and a checked loss prediction",
        ),
        ("speedrun",): (
            SpeedrunConfig,
            speedrun,
            _print_summary,
            "every stage on the embedded default, with a report card",
        ),
    }


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="llmkit", description="The whole life of a GPT-style language model.")
    parser.add_argument("--version", action="version", version=f"llmkit {__version__}")
    parser.add_argument(
        "--allow-unisolated-code",
        action="store_true",
        help="where bubblewrap is missing, run model-written code without isolation (it can read your "
        "files and write where you can; a warning is printed on every run)",
    )
    groups = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = _commands()
    nested: dict[str, argparse._SubParsersAction] = {}
    for words, (config_class, _, _, help_text) in commands.items():
        if len(words) == 1:
            sub = groups.add_parser(words[0], help=help_text, description=help_text)
        else:
            if words[0] not in nested:
                holder = groups.add_parser(words[0], help=f"{words[0]} commands")
                nested[words[0]] = holder.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
            sub = nested[words[0]].add_parser(words[1], help=help_text, description=help_text)
        sub.add_argument(
            "config_file", nargs="?", metavar="YAML", help="YAML file of this command's fields (flags override it)"
        )
        sub.add_argument("--config", metavar="YAML", help="the same YAML file, as a flag")
        add_dataclass_arguments(sub, config_class)
        sub.set_defaults(words=words)
    return parser, commands


def main(argv: list[str] | None = None) -> int:
    parser, commands = build_parser()
    arguments = parser.parse_args(argv)
    config_class, function, printer, _ = commands[arguments.words]
    if arguments.allow_unisolated_code:
        allow_unisolated()
    try:
        if arguments.config and arguments.config_file:
            raise LlmkitError(f"give the YAML file once (got {arguments.config_file} and --config {arguments.config})")
        if (
            arguments.words == ("import",)
            and arguments.config_file
            and not arguments.config_file.endswith((".yaml", ".yml"))
        ):
            if hasattr(arguments, "source"):  # `llmkit import model.gguf --out DIR`: the positional is the source
                raise LlmkitError(f"give the source once (got {arguments.config_file} and --source {arguments.source})")
            arguments.source, arguments.config_file = arguments.config_file, None
        config = config_from_args(config_class, arguments, arguments.config or arguments.config_file)
        result = function(config)
        shutdown()
    except LlmkitError as error:
        print(f"llmkit: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = resume_hint(config_class, arguments.words)
        print(f"llmkit: interrupted; the work done so far is intact ({resume})", file=sys.stderr)
        return 130
    if printer is not None and os.environ.get("RANK", "0") == "0":  # under torchrun, one summary
        printer(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
