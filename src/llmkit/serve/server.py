"""``llmkit serve``'s settings and entry point, apart from the app so that the command line (and
``llmkit chat``) need no FastAPI: :class:`ServeConfig`, :func:`check_exposure` and :func:`serve`.

Without an API key the server is for this machine only: it refuses to listen on another address unless
told to (``--allow-public-without-key``), and the app answers only requests addressed to a loopback
name (a web page the user visits could otherwise reach it through DNS rebinding)."""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Literal

from llmkit.config import check
from llmkit.errors import ConfigError
from llmkit.infer.engine import Engine, EngineConfig


@dataclass
class ServeConfig:
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(checkpoint="runs/sft", max_batch_size=64))
    host: str = field(
        default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0 exposes the server to the network)"}
    )
    port: int = field(default=8000, metadata={"help": "TCP port"})
    api_key: str | None = field(
        default=None, metadata={"help": "require 'Authorization: Bearer KEY' (default: $LLMKIT_API_KEY if set)"}
    )
    model_name: str | None = field(
        default=None, metadata={"help": "model id clients send (default: the checkpoint folder's name)"}
    )
    max_messages: int = field(default=256, metadata={"help": "most messages in one chat request"})
    max_prompt_tokens: int | None = field(
        default=None, metadata={"help": "longest prompt in tokens (default and cap: the model's context - 1)"}
    )
    max_tokens: int = field(default=2048, metadata={"help": "largest max_tokens a request may ask for"})
    max_concurrent_requests: int = field(
        default=128,
        metadata={
            "help": "sequences (prompts x n) generating or queued at once; a request that would exceed it gets 429"
        },
    )
    max_choices: int = field(
        default=128,
        metadata={"help": "most sequences (prompts x n) one request may ask for (capped by max_concurrent_requests)"},
    )
    max_stop_strings: int = field(default=16, metadata={"help": "most stop strings in one request"})
    max_stop_length: int = field(default=256, metadata={"help": "longest stop string, in characters"})
    max_body_bytes: int = field(default=2_000_000, metadata={"help": "largest request body; larger get 413"})
    allow_public_without_key: bool = field(
        default=False,
        metadata={
            "help": "listen on a non-loopback host without an API key (anyone who can connect may use the model)"
        },
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = field(
        default="info", metadata={"help": "uvicorn's log level"}
    )

    def __post_init__(self) -> None:
        check(0 <= self.port <= 65535, "port", self.port, "must be in 0..65535 (0: any free port)")
        check(self.api_key is None or len(self.api_key) > 0, "api_key", self.api_key, "must not be empty")
        for name in (
            "max_messages",
            "max_tokens",
            "max_concurrent_requests",
            "max_choices",
            "max_stop_strings",
            "max_stop_length",
            "max_body_bytes",
        ):
            check(getattr(self, name) > 0, name, getattr(self, name), "must be positive")
        check(
            self.max_prompt_tokens is None or self.max_prompt_tokens > 0,
            "max_prompt_tokens",
            self.max_prompt_tokens,
            "must be positive",
        )


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` (an address or name to bind) is reachable from this machine only."""
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # another name: it may resolve to any address
        return False


def check_exposure(config: ServeConfig) -> None:
    """Refuse to serve the network without an API key unless the user asked for it, and then warn."""
    if config.api_key is not None or is_loopback(config.host):
        return
    if not config.allow_public_without_key:
        raise ConfigError(
            "host",
            config.host,
            "is reachable from other machines and no API key is set; set "
            "LLMKIT_API_KEY, or pass --allow-public-without-key to serve anyone who connects",
        )
    print(
        f"llmkit: warning: serving {config.host} without an API key: anyone who can connect may use the model",
        file=sys.stderr,
    )


def serve(config: ServeConfig) -> None:
    """Load the checkpoint and serve it until interrupted (Ctrl-C)."""
    import uvicorn

    if config.api_key is None and os.environ.get("LLMKIT_API_KEY"):
        config.api_key = os.environ["LLMKIT_API_KEY"]  # a key on the command line would show in `ps`
    check_exposure(config)
    from llmkit.serve.app import create_app  # FastAPI only when serving: the rest of llmkit runs without it

    app = create_app(Engine.from_config(config.engine), config)
    print(
        json.dumps(
            {
                "serving": app.state.service.model_name,
                "url": f"http://{config.host}:{config.port}/",
                "api_key": "required" if config.api_key else "none",
            }
        )
    )
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level)
