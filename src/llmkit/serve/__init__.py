"""Serving: an OpenAI-compatible HTTP API and a browser chat page (``llmkit serve``:
:mod:`llmkit.serve.app`), and a terminal chat (``llmkit chat``: :mod:`llmkit.serve.chat_repl`), both on
the inference engine's continuous-batching scheduler. The modules are imported directly, so the
terminal chat does not need the web server's dependencies (FastAPI, uvicorn)."""
