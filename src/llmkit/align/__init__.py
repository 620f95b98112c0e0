"""Post-training stages: instruction tuning and alignment from preferences or rewards.

Every stage loads a checkpoint with :func:`llmkit.model.checkpoint.load_model`, trains with the one
:class:`llmkit.train.trainer.Trainer` (a batch in, a loss out) or drives its optimizer around rollouts,
and writes a checkpoint directory in the standard format with its ``stage`` in ``config.json``.

- :mod:`llmkit.align.sft`: supervised fine-tuning on conversations (``llmkit sft``), full or LoRA;
  batches and packing in :mod:`llmkit.align.conversation_batches`.
"""
