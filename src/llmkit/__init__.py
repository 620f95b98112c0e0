"""llmkit: the whole life of a GPT-style language model in one readable toolkit."""

__version__ = "0.1.0"
