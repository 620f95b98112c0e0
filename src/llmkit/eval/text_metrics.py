"""Conditional generation scored against references: corpus BLEU and ROUGE-1/2/L.

* BLEU (Papineni et al. 2002) through ``sacrebleu`` (Post 2018) with its defaults (13a tokenisation,
  4-grams, brevity penalty, no smoothing needed at corpus level), so the number is comparable with
  published ones. It is a *corpus* statistic: n-gram matches and lengths are summed over all sentences
  before the precisions are taken, which is not the mean of sentence BLEU.
* ROUGE (Lin 2004) through Google's ``rouge-score`` with the Porter stemmer on (as the summarisation
  papers report): the F1 of unigram, bigram and longest-common-subsequence overlap per example,
  averaged over examples.

Data: JSONL with ``prompt`` and the reference as ``reference`` or ``completion`` (the TRL column name);
the model completes each prompt greedily.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmkit.errors import InputError, LlmkitError
from llmkit.eval.choice import mean_stderr
from llmkit.eval.generation import EvaluationGenerator
from llmkit.infer import Engine, GenerationConfig
from llmkit.io import iter_jsonl

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
REFERENCE_FIELDS = ("reference", "completion")


@dataclass
class ReferenceExample:
    id: str
    prompt: str
    reference: str


def load_reference_pairs(path: str | Path) -> list[ReferenceExample]:
    """Prompt/reference pairs of a JSONL file; a record without them raises naming the line."""
    path = Path(path)
    examples = []
    for line, record in iter_jsonl(path):
        reference_field = next((name for name in REFERENCE_FIELDS if isinstance(record.get(name), str)), None)
        if not isinstance(record.get("prompt"), str) or reference_field is None:
            raise InputError(f"{path}:{line}: needs a string 'prompt' and a string 'reference' (or 'completion')")
        examples.append(ReferenceExample(f"{path.name}:{line}", record["prompt"], record[reference_field]))
    if not examples:
        raise InputError(f"{path}: no prompt/reference pairs")
    return examples


def corpus_bleu(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU (0-100) with its n-gram precisions (percent) and brevity penalty, as sacrebleu computes them."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    try:
        import sacrebleu
    except ImportError:
        raise LlmkitError("BLEU needs sacrebleu (pip install 'llmkit[eval]')") from None
    score = sacrebleu.corpus_bleu(hypotheses, [references])
    return {
        "bleu": score.score,
        "precisions": list(score.precisions),
        "brevity_penalty": score.bp,
        "hypothesis_length": score.sys_len,
        "reference_length": score.ref_len,
    }


def rouge_scores(hypotheses: list[str], references: list[str]) -> list[dict[str, float]]:
    """ROUGE-1/2/L F1 of every hypothesis against its reference (Porter stemming on)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    # Imported on use: rouge-score pulls in nltk and scipy (seconds), and the CLI imports this module for
    # every command when it builds its parser.
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise LlmkitError("ROUGE needs rouge-score (pip install 'llmkit[eval]')") from None

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    # rouge-score's argument order is (target, prediction).
    return [
        {name: score.fmeasure for name, score in scorer.score(reference, hypothesis).items()}
        for hypothesis, reference in zip(hypotheses, references)
    ]


def score_texts(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU plus the mean (and standard error) of each ROUGE F1 over examples."""
    per_example = rouge_scores(hypotheses, references)
    result = corpus_bleu(hypotheses, references)
    for name in ROUGE_TYPES:
        values = [scores[name] for scores in per_example]
        result[name], result[f"{name}_stderr"] = sum(values) / len(values), mean_stderr(values)
    result["count"] = len(hypotheses)
    result["per_example_rouge"] = per_example
    return result


def evaluate_bleu_rouge(
    engine: Engine,
    examples: list[ReferenceExample],
    max_new_tokens: int = 128,
    single_line: bool = True,
    batch_size: int = 16,
) -> dict:
    """Greedy completions of every prompt scored against the references. ``single_line`` stops each
    completion at its first newline (one-line references: translation, headlines)."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0, stop=["\n"] if single_line else [])
    generator = EvaluationGenerator(engine, batch_size=batch_size, description="bleu/rouge")
    hypotheses = [
        completion.text.strip() for completion in generator.generate([example.prompt for example in examples], config)
    ]
    result = score_texts(hypotheses, [example.reference for example in examples])
    per_example_rouge = result.pop("per_example_rouge")
    result["truncated_prompts"] = generator.truncated_prompts
    result["per_example"] = [
        {"id": example.id, "prompt": example.prompt, "output": hypothesis, "reference": example.reference, **scores}
        for example, hypothesis, scores in zip(examples, hypotheses, per_example_rouge)
    ]
    return result
