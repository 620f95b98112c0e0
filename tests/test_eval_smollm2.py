"""A real model scored the way the field scores it (needs ../shared): SmolLM2-135M-Instruct (Q4_1, imported)
on 20 ARC-Easy dev questions and two WikiText paragraphs gets the same accuracy, length-normalised accuracy
and bits per byte through ``llmkit eval``, through lm-eval with llmkit's model class, and through lm-eval's
own ``hf`` model on the Hugging Face folder ``llmkit export`` writes. SmolLM2's bos (``<|im_start|>``) differs
from its eos (``<|im_end|>``): lm-eval conditions empty contexts and rolling windows on the bos, and so
does llmkit."""

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

from conftest import SHARED_DATA  # noqa: E402
from helpers import write_choice_task, write_harness_task  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import llmkit.eval.harness  # noqa: E402,F401  (registers the "llmkit" model class)
from llmkit.eval.choice_tasks import load_choice_task  # noqa: E402
from llmkit.eval.run import EvalConfig, run_eval  # noqa: E402
from llmkit.infer.engine import EngineConfig  # noqa: E402
from llmkit.interop import export_hf  # noqa: E402

QUESTIONS = 20
ROLLING_FIELDS = 'doc_to_text: ""\ndoc_to_target: text\n'
# Per choice, llmkit and transformers differ by at most 1.1e-5 nats (measured; the same float32 operations
# in another order); every prediction agrees.
LOGPROB_TOLERANCE = 1e-4
pytestmark = pytest.mark.usefixtures("all_cores")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory, all_cores, smollm2_checkpoint):
    """(checkpoint, Hugging Face export, task folder, ARC file, WikiText file) for SmolLM2, set up once for
    the module."""
    shared_data = SHARED_DATA
    root = tmp_path_factory.mktemp("smollm2")
    export_hf(smollm2_checkpoint, root / "hf")
    arc = shared_data / "arc" / "ARC-Easy" / "ARC-Easy-Dev.jsonl"
    examples = load_choice_task(arc)[:QUESTIONS]
    tasks = root / "tasks"
    tasks.mkdir()
    write_choice_task(
        tasks, "smollm2_arc", [(example.context, example.choices, example.answer) for example in examples]
    )
    paragraphs = [
        line.strip()
        for line in (shared_data / "wikitext2" / "test.txt").read_text().splitlines()
        if 150 < len(line) < 400
    ][:2]
    wiki = write_harness_task(
        tasks, "smollm2_wiki", [{"text": text} for text in paragraphs], "loglikelihood_rolling", ROLLING_FIELDS
    )
    return smollm2_checkpoint, root / "hf", tasks, arc, wiki


@pytest.fixture(scope="module")
def llmkit_eval(smollm2):
    """What `llmkit eval --tasks choice:ARC-Easy-Dev.jsonl,perplexity:wiki.jsonl --limit 20` reports."""
    checkpoint, _, _, arc, wiki = smollm2
    out = checkpoint.parent / "eval"
    run_eval(
        EvalConfig(
            engine=EngineConfig(checkpoint=str(checkpoint)),
            out=str(out),
            limit=QUESTIONS,
            decontamination=False,
            tasks=[f"choice:{arc}:name=arc", f"perplexity:{wiki}:name=wiki"],
        )
    )
    report = json.loads((out / "eval.json").read_text())["tasks"]
    records = [json.loads(line) for line in (out / "samples" / "arc.jsonl").read_text().splitlines()]
    return report["arc"]["metrics"], report["wiki"]["metrics"], [record["logprobs"] for record in records]


def harness(model: str, model_args: str, tasks) -> tuple[dict, dict, list[list[float]]]:
    results = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["smollm2_arc", "smollm2_wiki"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        bootstrap_iters=0,
        log_samples=True,
    )
    samples = sorted(results["samples"]["smollm2_arc"], key=lambda sample: int(sample["doc_id"]))
    return (
        results["results"]["smollm2_arc"],
        results["results"]["smollm2_wiki"],
        [[float(response[0]) for response in sample["filtered_resps"]] for sample in samples],
    )


def assert_same_scores(ours, theirs, tolerance: float) -> None:
    (choice, rolling, logprobs), (their_choice, their_rolling, their_logprobs) = ours, theirs
    assert choice["count"] == QUESTIONS and choice["accuracy"] != choice["accuracy_norm"]  # the sample tells them apart
    assert (their_choice["acc,none"], their_choice["acc_norm,none"]) == (choice["accuracy"], choice["accuracy_norm"])
    assert their_rolling["bits_per_byte,none"] == pytest.approx(rolling["bits_per_byte"], rel=tolerance)
    assert max(abs(a - b) for mine, yours in zip(logprobs, their_logprobs) for a, b in zip(mine, yours)) <= tolerance


def test_smollm2_scores_the_same_through_llmkit_eval_and_lm_evals_llmkit_model(smollm2, llmkit_eval):
    checkpoint, _, tasks, _, _ = smollm2
    assert_same_scores(llmkit_eval, harness("llmkit", f"checkpoint={checkpoint},batch_size=16", tasks), 0.0)


def test_smollm2_scores_the_same_through_lm_evals_hf_model_on_the_export(smollm2, llmkit_eval):
    pytest.importorskip("accelerate", reason="lm-eval's hf model imports accelerate (pip install accelerate)")
    _, hf, tasks, _, _ = smollm2
    theirs = harness("hf", f"pretrained={hf},dtype=float32,device=cpu,batch_size=16", tasks)
    assert_same_scores(llmkit_eval, theirs, LOGPROB_TOLERANCE)
