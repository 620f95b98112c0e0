"""Embedded, generated tasks with exact checkers, and the dataset formats that become conversations.

- :mod:`llmkit.tasks.arithmetic`: multi-step arithmetic word problems (GSM8K style) whose worked
  solutions call the calculator tool; exact-answer checker; preference pairs.
- :mod:`llmkit.tasks.functions`: docstring -> function tasks mined from the standard library; a
  parse, signature and execution checker; preference pairs.
- :mod:`llmkit.tasks.datasets`: JSON/JSONL files in TRL, Alpaca, ShareGPT and HH-RLHF formats as
  :class:`~llmkit.chat.Conversation`, :class:`~llmkit.chat.Preference` and :class:`~llmkit.chat.Ranking`
  rows; Super-NaturalInstructions-style instances from task descriptions.

Every generator is a pure function of its seed, and the train and held-out splits are disjoint by
construction, so runs are offline, repeatable and checkable.
"""
