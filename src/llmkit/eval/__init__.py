"""``llmkit eval``: perplexity, multiple choice, generative exact match, code pass@k and BLEU/ROUGE of a
checkpoint, with a decontamination check and a report card (docs/eval.md).

The command is :func:`llmkit.eval.run.run_eval` (task specs, dispatch); :mod:`~llmkit.eval.kinds` says
how each kind of task is read, checked and scored, :mod:`~llmkit.eval.contamination` finds evaluated
examples in the training data, :mod:`~llmkit.eval.report` writes the files. The evaluations themselves:
:mod:`~llmkit.eval.perplexity`, :mod:`~llmkit.eval.choice` (with :mod:`~llmkit.eval.choice_tasks` and
:mod:`~llmkit.eval.loglikelihood`), :mod:`~llmkit.eval.generative`, :mod:`~llmkit.eval.code` and
:mod:`~llmkit.eval.text_metrics`, the generative ones through :mod:`~llmkit.eval.generation`;
:mod:`~llmkit.eval.harness` is the lm-evaluation-harness adapter. This package module imports none of
them, so importing one does not pull in the rest.
"""
