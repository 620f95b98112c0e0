"""The ICL / chain-of-thought table made real: accuracy of a small base model, pretrained here from
scratch, with and without few-shot demonstrations, chain of thought, self-consistency and the calculator.

What is measured. ``llmkit eval``'s generative exact match (:mod:`llmkit.eval.generative`) with
``ablations: true``, i.e. every combination of {0, 4}-shot x {direct, CoT} x {no tools, calculator} x
{1 greedy path, self-consistency over 5 sampled paths (temperature 0.7)}, on

(a) ``arithmetic``: held-out embedded arithmetic problems (:mod:`llmkit.tasks.arithmetic`, 2 to 4 steps),
    written as GSM8K records by :func:`llmkit.tasks.arithmetic.gsm8k_record`; the few-shot pool is train
    problems;
(b) ``gsm8k``: the last 100 problems of ``../shared/data/gsm8k/train.jsonl`` (the shared folder holds
    only GSM8K's train split); the few-shot pool is the other 7,373. Skipped, with the reason, when the
    file is absent.

The model. A byte-level BPE tokenizer, token shards and a model are trained through llmkit's Python API
(``train_tokenizer`` -> ``prepare_data`` -> ``pretrain``, as ``llmkit speedrun`` chains them) on a corpus
of embedded-arithmetic TRAIN problems rendered in the prompt formats the evaluation itself uses: the
items are made by :class:`llmkit.infer.prompting.PromptBuilder` from the demonstrations of
:func:`llmkit.eval.generative.demonstrations` read back by ``load_gsm8k``, so training text and
evaluation prompts cannot drift apart. The corpus mixes these forms of Q/A items (their shares in
``STYLES``):

- ``direct``: ``Q: ...\\nA: 72``;
- ``cot``: ``Q: ...\\nA: <worked solution, arithmetic inline> The answer is 72.``;
- ``cot_calculator``: the same with every step's arithmetic as a calculator call and its result,
  ``<|tool_call|>calculator(4*3)<|end|><|tool_result|>12<|end|>``, the stream the engine produces;
- ``zero_shot_cot`` and ``zero_shot_cot_calculator``: ``Q: ...\\nA: Let's think step by step. <worked
  solution> Therefore, the answer is 72.`` (the two prompts of zero-shot CoT, Kojima et al. 2022).

A document is 2 to 6 consecutive items joined by the prompt separator, all in one form, as a web page
keeps one format: so the demonstrations in a prompt say which form the answer takes, which is what
in-context learning can pick up. (With forms mixed inside documents, a first try, the model learned
that the context does not predict the form: given four direct demonstrations its greedy reply was
still a calculator-style solution, whose first word, the step's label, is likelier than any single
number.)

The tool tokens must be the tokenizer's special tokens in the shards, not characters: the number of
``<|tool_call|>`` ids in the shards is checked against the number of calls in the corpus (it fails
loudly otherwise). The trained model is kept in ``--out``; a second run with the same folder and recipe
skips the corpus, tokenizer and pretraining.

Output: one JSON object per line. ``accuracy`` for every (dataset, setting), with ``stderr``, ``count``,
the setting's axes and context (parameters, pretraining tokens/steps/seconds, validation bits/byte,
how many evaluated problems the 13-gram decontamination check flagged: the arithmetic problems share
their templates' wording with the training problems, so most are flagged although no held-out problem
is a training problem); then ``eval_report`` (the folder with eval.md, eval.json, the plots and the
per-example samples) and ``wall_seconds``. With ``--quick``: a few training steps, a few problems, short
generations; it shows the benchmark runs (about a minute), not what prompting does.

Usage:
    python benchmarks/icl_cot_table.py                        # about 15-20 minutes on 2 CPU cores
    python benchmarks/icl_cot_table.py --out runs/icl_cot      # the model is cached in --out
    python benchmarks/icl_cot_table.py --quick
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import emit  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
STYLES = {"direct": 0.3, "cot": 0.25, "cot_calculator": 0.3, "zero_shot_cot": 0.075, "zero_shot_cot_calculator": 0.075}

FULL = dict(
    train_problems=40_000,
    pool_problems=1_000,
    eval_problems=100,
    vocab_size=2048,
    preset="cpu-small",
    n_layer=4,
    n_embd=192,
    n_head=4,
    context_length=768,
    batch_size=8,
    steps=400,
    warmup_steps=50,
    max_new_tokens=160,
    eval_batch_size=32,
)
QUICK = dict(
    FULL,
    train_problems=2_000,
    pool_problems=100,
    eval_problems=4,
    n_layer=2,
    n_embd=64,
    context_length=256,
    batch_size=8,
    steps=20,
    warmup_steps=5,
    max_new_tokens=24,
)


# ----------------------------------------------------------------------------------- corpus
def write_jsonl(path: Path, records: list[dict]) -> Path:
    from llmkit.io import atomic_write_jsonl

    atomic_write_jsonl(path, records)
    return path


def render(example, style: str) -> str:
    """One Q/A item exactly as the evaluation's PromptBuilder writes a demonstration (or, for zero-shot
    CoT, its query, the reasoning and its answer prompt followed by the answer)."""
    from llmkit.eval.generative import demonstrations
    from llmkit.infer.prompting import PromptBuilder, PromptConfig

    if style == "direct":
        return PromptBuilder(PromptConfig()).demonstration(demonstrations([example], calculator=False)[0])
    if style in ("cot", "cot_calculator"):
        (demonstration,) = demonstrations([example], calculator=style == "cot_calculator")
        return PromptBuilder(PromptConfig(chain_of_thought="few_shot")).demonstration(demonstration)
    (demonstration,) = demonstrations([example], calculator=style == "zero_shot_cot_calculator")
    builder = PromptBuilder(PromptConfig(chain_of_thought="zero_shot"))
    return f"{builder.answer_prompt(builder.query(example.question), demonstration.rationale)} {demonstration.answer}."


def build_corpus(out: Path, train_problems: int, seed: int = 0) -> dict:
    """Train problems as GSM8K records (``arithmetic_train.jsonl``), and the pretraining documents
    (``corpus.jsonl``) made of them."""
    from llmkit.eval.generative import load_gsm8k
    from llmkit.infer.prompting import PromptConfig
    from llmkit.tasks import arithmetic
    from llmkit.tokenizer import TOOL_CALL

    problems = arithmetic.generate_problems(train_problems, seed=seed, split="train")
    examples = load_gsm8k(
        write_jsonl(out / "arithmetic_train.jsonl", [arithmetic.gsm8k_record(problem) for problem in problems])
    )
    rng = random.Random(seed)
    separator = PromptConfig().separator
    styles, weights = list(STYLES), list(STYLES.values())
    documents, position, counts = [], 0, dict.fromkeys(STYLES, 0)
    while position < len(examples):
        size = rng.randint(2, 6)
        style = rng.choices(styles, weights)[0]
        items = [render(example, style) for example in examples[position : position + size]]
        counts[style] += len(items)
        documents.append({"text": separator.join(items)})
        position += size
    write_jsonl(out / "corpus.jsonl", documents)
    return {
        "documents": len(documents),
        "items": counts,
        "tool_calls": sum(document["text"].count(TOOL_CALL) for document in documents),
        "bytes": sum(len(document["text"].encode("utf-8")) for document in documents),
    }


def special_token_counts(data: Path) -> dict:
    """How often each tool-protocol token id occurs in the shards of both splits."""
    import numpy as np

    from llmkit.token_data import load_tokenizer, open_split
    from llmkit.tokenizer import END, TOOL_CALL, TOOL_RESULT

    tokenizer = load_tokenizer(data)
    counts = {}
    for token in (TOOL_CALL, TOOL_RESULT, END):
        token_id = tokenizer.special_ids[token]
        counts[token] = int(
            sum(np.count_nonzero(shard == token_id) for split in ("train", "val") for shard in open_split(data, split))
        )
    return counts


# ----------------------------------------------------------------------------------- pretraining
def pretrained_model(out: Path, recipe: dict, log) -> dict:
    """Corpus -> tokenizer -> token shards -> pretraining, or the cached result of an earlier run with the
    same recipe in ``out``."""
    from llmkit.data.shards import PrepareConfig, prepare_data
    from llmkit.data.tokenizer_training import TokenizerConfig, train_tokenizer
    from llmkit.pretrain import ModelOverrides, PretrainConfig, pretrain
    from llmkit.tokenizer import END, TOOL_CALL, TOOL_RESULT
    from llmkit.train.config import TrainConfig

    summary_path = out / "pretrain.json"
    if summary_path.is_file():
        cached = json.loads(summary_path.read_text())
        if cached["recipe"] != recipe:
            sys.exit(f"{out} holds a model trained with another recipe ({summary_path}); use another --out")
        log(f"reusing the model in {out / 'base'}")
        return {**cached, "reused": True}
    if (out / "base").exists():
        sys.exit(f"{out / 'base'} exists but no {summary_path} says it finished; remove it or use another --out")
    started = time.perf_counter()
    corpus = build_corpus(out, recipe["train_problems"])
    log(f"corpus: {corpus}")
    tokenizer = train_tokenizer(
        TokenizerConfig(
            source=str(out / "corpus.jsonl"),
            out=str(out / "tokenizer"),
            vocab_size=recipe["vocab_size"],
            held_out_fraction=0.02,
        )
    )
    data = prepare_data(
        PrepareConfig(
            source=str(out / "corpus.jsonl"),
            tokenizer=str(out / "tokenizer"),
            out=str(out / "data"),
            val_fraction=0.02,
            workers=1,
        )
    )
    specials = special_token_counts(out / "data")
    calls = corpus["tool_calls"]
    if not (specials[TOOL_CALL] == specials[TOOL_RESULT] == calls and specials[END] == 2 * calls):
        sys.exit(
            f"the tool tokens are not single special tokens in the shards: {specials} for {calls} calls in the corpus"
        )
    preparation_seconds = time.perf_counter() - started
    model = ModelOverrides(
        n_layer=recipe["n_layer"],
        n_embd=recipe["n_embd"],
        n_head=recipe["n_head"],
        n_kv_head=recipe["n_head"],
        context_length=recipe["context_length"],
    )
    # The speedrun's recipe (Muon for the hidden matrices, AdamW for the rest), with a step budget.
    train = TrainConfig(
        out=str(out / "base"),
        batch_size=recipe["batch_size"],
        lr=3e-3,
        optimizer="muon",
        muon_lr=0.02,
        warmup_steps=recipe["warmup_steps"],
        max_steps=recipe["steps"],
        dtype="bfloat16",
        eval_interval=0,
        checkpoint_interval=10**9,
        progress=False,
    )
    result = pretrain(PretrainConfig(data=str(out / "data"), preset=recipe["preset"], model=model, train=train))
    summary = {
        "recipe": recipe,
        "corpus": corpus,
        "special_token_counts": specials,
        "preparation_seconds": round(preparation_seconds, 1),
        "tokenizer": {key: tokenizer[key] for key in ("vocab_size", "bytes_per_token")},
        "data": {
            split: {key: data["splits"][split][key] for key in ("documents", "tokens", "bytes")}
            for split in ("train", "val")
        },
        "pretrain": {key: value for key, value in result.items() if key not in ("model", "train_metrics")},
        "model": result["model"],
    }
    summary_path.write_text(json.dumps(summary, indent=2))
    return {**summary, "reused": False}


# ----------------------------------------------------------------------------------- evaluation
def evaluation_sets(out: Path, shared: Path, count: int, pool_problems: int, log) -> dict[str, tuple[Path, Path]]:
    """Dataset name -> (evaluated file, few-shot pool file)."""
    from llmkit.tasks import arithmetic

    heldout = arithmetic.generate_problems(count, seed=1, split="heldout")
    sets = {
        "arithmetic": (
            write_jsonl(out / "arithmetic_heldout.jsonl", [arithmetic.gsm8k_record(problem) for problem in heldout]),
            write_jsonl(
                out / "arithmetic_pool.jsonl",
                [
                    arithmetic.gsm8k_record(problem)
                    for problem in arithmetic.generate_problems(pool_problems, seed=0, split="train")
                ],
            ),
        )
    }
    gsm8k = shared / "data" / "gsm8k" / "train.jsonl"
    if not gsm8k.is_file():
        reason = f"{gsm8k} not found (the shared datasets live beside the repository; --shared names the folder)"
        emit("skipped", 0, "", dataset="gsm8k", reason=reason)
        log(f"skipping gsm8k: {reason}")
        return sets
    lines = [line for line in gsm8k.read_text(encoding="utf-8").splitlines() if line.strip()]
    # Only GSM8K's train split is shared: its last 100 problems are the test set, the rest the few-shot pool.
    test, pool = lines[-100:][:count], lines[:-100]
    (out / "gsm8k_heldout.jsonl").write_text("\n".join(test) + "\n", encoding="utf-8")
    (out / "gsm8k_pool.jsonl").write_text("\n".join(pool) + "\n", encoding="utf-8")
    sets["gsm8k"] = (out / "gsm8k_heldout.jsonl", out / "gsm8k_pool.jsonl")
    return sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", help="working folder; the trained model is kept there (default runs/icl_cot_table[_quick])"
    )
    parser.add_argument("--shared", type=Path, default=SHARED, help="the shared folder (holds data/gsm8k/train.jsonl)")
    parser.add_argument(
        "--quick", action="store_true", help="a few steps and problems: shows the benchmark runs, not the quality"
    )
    parser.add_argument("--steps", type=int, help="pretraining steps (default 900; quick 20)")
    parser.add_argument("--problems", type=int, help="evaluated problems per dataset (default 100; quick 4)")
    arguments = parser.parse_args()
    started = time.perf_counter()
    recipe = dict(QUICK if arguments.quick else FULL, styles=STYLES)  # what the cached model was trained with
    if arguments.steps:
        recipe["steps"] = arguments.steps
    if arguments.problems:
        recipe["eval_problems"] = arguments.problems
    out = Path(arguments.out or ("runs/icl_cot_table_quick" if arguments.quick else "runs/icl_cot_table"))
    out.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(f"[icl_cot_table {time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    evaluation = {key: recipe.pop(key) for key in ("eval_problems", "max_new_tokens", "eval_batch_size")}
    model = pretrained_model(out, recipe, log)
    pretraining = model["pretrain"]
    log(
        f"model: {pretraining['parameters']:,} parameters, {pretraining['steps']} steps, {pretraining['tokens']:,} "
        f"tokens, {pretraining['seconds']} s, validation {pretraining['val_bpb']} bits/byte"
    )

    from llmkit.eval.run import EvalConfig, run_eval
    from llmkit.infer import EngineConfig

    sets = evaluation_sets(out, arguments.shared, evaluation["eval_problems"], recipe["pool_problems"], log)
    tasks = [
        {
            "kind": "generative",
            "name": name,
            "path": str(path),
            "fewshot_file": str(pool),
            "num_fewshot": 4,
            "chain_of_thought": True,
            "self_consistency": 5,
            "tools": "calculator",
            "ablations": True,
        }
        for name, (path, pool) in sets.items()
    ]
    config = EvalConfig(
        engine=EngineConfig(checkpoint=str(out / "base")),
        tasks=tasks,
        out=str(out / "eval"),
        max_new_tokens=evaluation["max_new_tokens"],
        batch_size=evaluation["eval_batch_size"],
        seed=0,
    )
    evaluation_started = time.perf_counter()
    run_eval(config)
    evaluation_seconds = time.perf_counter() - evaluation_started
    report = json.loads((out / "eval" / "eval.json").read_text())

    context = {
        "parameters": pretraining["parameters"],
        "n_layer": recipe["n_layer"],
        "n_embd": recipe["n_embd"],
        "context_length": recipe["context_length"],
        "vocab_size": model["tokenizer"]["vocab_size"],
        "pretrain_tokens": pretraining["tokens"],
        "pretrain_steps": pretraining["steps"],
        "pretrain_seconds": pretraining["seconds"],
        "val_bpb": pretraining["val_bpb"],
    }
    for name, task in report["tasks"].items():
        contamination = task.get("contamination", {})
        for row in task["ablations"]:
            emit(
                "accuracy",
                round(row["accuracy"], 4),
                "fraction",
                dataset=name,
                setting=row["setting"],
                shots=row["num_fewshot"],
                chain_of_thought=row["chain_of_thought"],
                tools=row["tools"],
                self_consistency=row["self_consistency"],
                stderr=round(row["stderr"], 4) if row["stderr"] is not None else None,
                count=row["count"],
                contaminated=contamination.get("contaminated"),
                **context,
            )
        # Only the task's own setting (one point of the grid) keeps its prompt statistics.
        own = task["settings"]
        emit(
            "truncated_prompts",
            task["metrics"]["truncated_prompts"],
            "prompts",
            dataset=name,
            setting=f"{own['num_fewshot']}-shot, CoT, SC@{own['self_consistency']}, tools={own['tools']}",
            prompts=task["metrics"]["count"] * own["self_consistency"],
            context_length=recipe["context_length"],
            max_new_tokens=evaluation["max_new_tokens"],
            note="prompts cut from the left to fit the context",
        )
    emit(
        "eval_report",
        str((out / "eval").resolve()),
        "folder",
        eval_seconds=round(evaluation_seconds, 1),
        quick=arguments.quick,
    )
    emit(
        "wall_seconds",
        round(time.perf_counter() - started, 1),
        "s",
        pretraining_reused=model["reused"],
        quick=arguments.quick,
    )


if __name__ == "__main__":
    main()
