"""A model with a chat format of its own keeps it: conversations render with its Jinja template (the ids
and assistant mask transformers computes), generation stops at its end-of-turn token, the server answers
in it (streaming equal to non-streaming) and reads its ``<tool_call>`` convention; bad templates and
tokenizers are one-line errors. With ../shared, the real SmolLM2 answers a question through the server."""

import json
import string

import httpx
import openai
import pytest
import torch
import torch.nn.functional as F
import transformers
from helpers import LiveServer, tiny_config
from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from llmkit.chat import render_ids, uses_own_template
from llmkit.errors import InputError
from llmkit.infer import Engine, EngineConfig, GenerationConfig
from llmkit.infer.scheduler import Event
from llmkit.model import Transformer
from llmkit.serve.app import create_app
from llmkit.serve.schemas import ToolDefinition
from llmkit.serve.server import ServeConfig
from llmkit.serve.tool_calls import TemplateTurn, client_tools
from llmkit.tokenizer import Tokenizer

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "See you."},
]


def chatml_tokenizer(template: str = CHATML, **config) -> Tokenizer:
    """A character-level tokenizer with ChatML's two special tokens and none of llmkit's."""
    vocabulary = {character: index for index, character in enumerate(string.printable)}
    backend = Backend(models.BPE(vocab=vocabulary, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    settings = {
        "kind": "char",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "chat_template": template,
        **config,
    }
    return Tokenizer(backend.to_str().encode(), settings)


def as_transformers(tokenizer: Tokenizer):
    peer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Backend.from_str(tokenizer.tokenizer_json.decode()),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
    )
    peer.chat_template = tokenizer.chat_template
    return peer


def test_a_conversation_renders_to_transformers_ids_and_assistant_mask():
    tokenizer = chatml_tokenizer()
    assert uses_own_template(tokenizer) and not tokenizer.llmkit_format and tokenizer.stop_ids == [tokenizer.eot_id]
    rendered = as_transformers(tokenizer).apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = render_ids(tokenizer, CONVERSATION)
    assert ids == rendered["input_ids"] and mask == [bool(value) for value in rendered["assistant_masks"]]
    assert tokenizer.decode([token for token, keep in zip(ids, mask) if keep]) == "Hello!<|im_end|>See you.<|im_end|>"
    prompt, _ = render_ids(tokenizer, CONVERSATION[:2], add_generation_prompt=True)
    assert (
        prompt
        == as_transformers(tokenizer).apply_chat_template(
            CONVERSATION[:2], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    )
    _, continuation = render_ids(tokenizer, CONVERSATION, mask_from=3)  # a preference pair scores its last turn only
    assert tokenizer.decode([token for token, keep in zip(ids, continuation) if keep]) == "See you.<|im_end|>"


@pytest.mark.parametrize(
    "template, message",
    [
        (
            "{% for m in messages %}{{ m['content'] if loop.last else 'x' }}{% endfor %}",
            "renders earlier turns differently",
        ),
        ("{{ raise_exception('no system messages') }}", "does not render this conversation"),
        ("{% for m in messages %}", "not a valid Jinja template"),
    ],
)
def test_templates_that_cannot_be_trained_on_are_one_line_errors(template, message):
    with pytest.raises(InputError, match=message):
        render_ids(chatml_tokenizer(template), CONVERSATION)


def test_special_token_text_and_a_model_without_an_end_token_are_refused():
    with pytest.raises(InputError, match=r"messages\[1\].content contains the special token '<\|im_start\|>'"):
        render_ids(chatml_tokenizer(), [CONVERSATION[0], {"role": "user", "content": "<|im_start|>system"}])
    with pytest.raises(InputError, match="names no eos_token"):
        chatml_tokenizer(eos_token=None)


@pytest.fixture(scope="module")
def chatml_engine() -> Engine:
    """A model that has memorised one ChatML exchange (a second of AdamW)."""
    tokenizer = chatml_tokenizer()
    ids = torch.tensor([render_ids(tokenizer, CONVERSATION[:3])[0]])
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=tokenizer.vocab_size, context_length=96, n_embd=48, n_head=4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0)
    for _ in range(60):
        loss = F.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return Engine(model.eval(), tokenizer)


def test_generation_stops_at_the_models_end_of_turn(chatml_engine):
    prompt, _ = render_ids(chatml_engine.tokenizer, CONVERSATION[:2], add_generation_prompt=True)
    completion = chatml_engine.generate_ids([prompt], GenerationConfig(max_new_tokens=30, temperature=0))[0]
    assert (completion.text, completion.finish_reason) == ("Hello!", "stop")


def test_the_server_answers_in_the_models_format_streaming_as_whole(chatml_engine):
    with LiveServer(create_app(chatml_engine, ServeConfig(model_name="chatml"))) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        messages = CONVERSATION[:2]
        whole = client.chat.completions.create(model="chatml", messages=messages, temperature=0, max_tokens=30)
        streamed = "".join(
            chunk.choices[0].delta.content or ""
            for chunk in client.chat.completions.create(
                model="chatml", messages=messages, temperature=0, max_tokens=30, stream=True
            )
            if chunk.choices
        )
        assert whole.choices[0].message.content == streamed == "Hello!" and whole.choices[0].finish_reason == "stop"
        info = httpx.get(f"{server.url}/tokenizer_info").json()
        assert (info["eos_token"], info["chat_template"]) == ("<|im_end|>", CHATML)


def events(texts: list[str]) -> list[Event]:
    return [Event(text=text, token_ids=[]) for text in texts]


def test_hermes_tool_calls_are_read_from_the_text_and_held_back_from_the_content():
    tools = client_tools(
        [
            ToolDefinition.model_validate(
                {
                    "type": "function",
                    "function": {
                        "name": "weather",
                        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                    },
                }
            )
        ]
    )
    turn = TemplateTurn(chatml_tokenizer(), tools, detect_calls=True)
    pieces = [
        "Let me check.",
        " <tool",
        '_call>\n{"name": "weather", ',
        '"arguments": {"city": "Paris"}}\n</tool_call>',
    ]
    shown = "".join(turn.feed(event)[0] for event in events(pieces))
    result = turn.finish(type("Done", (), {"finish_reason": "stop"})())
    assert shown == "Let me check. " and turn.content == "Let me check."
    assert result.finish_reason == "tool_calls" and json.loads(result.tool_calls[0]["function"]["arguments"]) == {
        "city": "Paris"
    }
    unknown = TemplateTurn(chatml_tokenizer(), tools, detect_calls=True)
    text = '<tool_call>{"name": "stocks", "arguments": {}}</tool_call>'
    shown = "".join(unknown.feed(event)[0] for event in events([text]))
    result = unknown.finish(type("Done", (), {"finish_reason": "stop"})())
    assert (shown + result.content_delta, result.tool_calls, result.finish_reason) == (text, None, "stop")


def test_smollm2_answers_through_the_server_in_its_own_format(smollm2_checkpoint):
    engine = Engine.from_config(EngineConfig(checkpoint=str(smollm2_checkpoint)))
    with LiveServer(create_app(engine, ServeConfig(model_name="smollm2"))) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        whole = client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=24)
        streamed = "".join(
            chunk.choices[0].delta.content or ""
            for chunk in client.chat.completions.create(
                model="smollm2", messages=messages, temperature=0, max_tokens=24, stream=True
            )
            if chunk.choices
        )
    assert "Paris" in whole.choices[0].message.content and streamed == whole.choices[0].message.content
    assert whole.choices[0].finish_reason == "stop"  # at <|im_end|>, not at the token limit
