"""The lm-evaluation-harness adapter: lm-eval's own evaluator, on local task files, must reach the same
accuracy and bits per byte as ``llmkit eval``'s functions; its rolling windows are lm-eval's; its
``generate_until`` is greedy decoding cut at the stop strings; lm-eval finds it by name."""

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from helpers import tiny_config, write_choice_task, write_harness_task  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import get_rolling_token_windows  # noqa: E402
from test_eval_scoring import char_tokenizer, naive_greedy  # noqa: E402

from llmkit.errors import ConfigError, InputError  # noqa: E402
from llmkit.eval.choice import evaluate_choice  # noqa: E402
from llmkit.eval.choice_tasks import load_choice_task  # noqa: E402
from llmkit.eval.harness import LlmkitLM  # noqa: E402
from llmkit.eval.loglikelihood import rolling_windows  # noqa: E402
from llmkit.eval.perplexity import evaluate_perplexity  # noqa: E402
from llmkit.infer import Engine  # noqa: E402
from llmkit.model import Transformer  # noqa: E402
from llmkit.model.checkpoint import write_model  # noqa: E402

QUESTIONS = [
    ("the sky is", ["blue", "green", "a"], 0),
    ("the snow is", ["white", "yellow"], 1),
    ("coal is", ["black", "blue", "white", "no"], 2),
    ("the sun is", ["yellow", "hot"], 0),
    ("grass is", ["green", "grey"], 1),
    ("0123 is", ["4567", "89", "0"], 0),
    ("the sky", ["is blue", "is"], 1),
    ("é is", ["é", "e", "éé"], 2),
    ("the end", [".", "is near."], 1),
    ("snow", ["is white.", "is cold"], 0),
]
TEXTS = ["the sky is blue. the grass is green. the snow is white. " * 3, "coal is black.", "é0é the sun is yellow."]

ROLLING_FIELDS = """doc_to_text: ""
doc_to_target: text
"""


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return char_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def engine(tokenizer) -> Engine:
    torch.manual_seed(0)
    return Engine(Transformer(tiny_config(vocab_size=tokenizer.vocab_size, context_length=48)), tokenizer)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A folder of lm-eval task configs over local JSONL files (no hub access)."""
    folder = tmp_path_factory.mktemp("tasks")
    write_choice_task(folder, "llmkit_tiny_choice", QUESTIONS)
    write_harness_task(
        folder, "llmkit_tiny_rolling", [{"text": text} for text in TEXTS], "loglikelihood_rolling", ROLLING_FIELDS
    )
    return folder


@pytest.mark.parametrize(
    "token_count,context_length,stride", [(1, 4, None), (9, 4, None), (50, 8, None), (50, 8, 3), (23, 6, 1)]
)
def test_rolling_windows_are_lm_evals(token_count, context_length, stride):
    tokens, prefix = list(range(100, 100 + token_count)), 7
    stream = [prefix] + tokens
    # Our windows are sequences of at most context_length tokens whose first token is context only:
    # lm-eval's windows with max_seq_len = context_length - 1 and stride = predictions per window.
    reference = list(
        get_rolling_token_windows(
            tokens, prefix, max_seq_len=context_length - 1, context_len=context_length - (stride or context_length - 1)
        )
    )
    ours = rolling_windows(token_count, context_length, stride)
    assert [(stream[w.start : w.end - 1], stream[w.end - w.scored : w.end]) for w in ours] == reference


def reference_generation(engine, context: str, until: list[str], max_tokens: int, room: int) -> str:
    """Greedy tokens from a plain forward loop, cut at the first end token, then at the first stop string."""
    prompt = (engine.tokenizer.encode(context) or [engine.tokenizer.eot_id])[-room:]
    ids = naive_greedy(engine.model, prompt, max_tokens)
    ends = {engine.tokenizer.eot_id, engine.tokenizer.special_ids["<|end|>"]}
    ids = ids[: next((index for index, token in enumerate(ids) if token in ends), len(ids))]
    text = engine.tokenizer.decode(ids)
    for stop in until:
        text = text.split(stop)[0]
    return text


def test_generate_until_is_greedy_decoding_cut_at_the_stop_strings(engine):
    model = LlmkitLM(engine=engine, batch_size=2)
    long_context = "the grass is green. " * 4  # 80 characters: loses its start to leave room for 12 new tokens
    settings = [
        ({"until": ["."], "max_gen_toks": 12, "do_sample": False}, 12, ("the sky", long_context, "")),
        ({"until": ["e", "s"], "max_new_tokens": 6, "temperature": 0.0}, 6, ("the sky",)),
    ]
    requests, expected = [], []
    for gen_kwargs, max_tokens, contexts in settings:
        for context in contexts:
            requests.append(Instance("generate_until", {}, (context, dict(gen_kwargs)), len(requests)))
            expected.append(reference_generation(engine, context, gen_kwargs["until"], max_tokens, 48 - max_tokens))
    assert model.generate_until(requests) == expected


def test_generation_kwargs_without_an_equivalent_are_refused(engine):
    model = LlmkitLM(engine=engine)
    with pytest.raises(InputError, match="no_such_setting"):
        model.generate_until([Instance("generate_until", {}, ("x", {"until": ["."], "no_such_setting": 1}), 0)])
    with pytest.raises(InputError, match="max_gen_toks=48 leaves no room"):
        model.generate_until([Instance("generate_until", {}, ("x", {"until": ["."], "max_gen_toks": 48}), 0)])


def test_constructor_arguments_are_checked(engine):
    with pytest.raises(ConfigError, match="checkpoint"):
        LlmkitLM()
    with pytest.raises(ConfigError, match="batch_size"):
        LlmkitLM(engine=engine, batch_size="auto")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the default on a machine without CUDA")
def test_lm_evals_cuda_default_gives_way_to_the_cpu_without_cuda(engine, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    write_model(
        checkpoint, engine.model.state_dict(), engine.model.config, {"tokenizer_sha256": engine.tokenizer.sha256}
    )
    engine.tokenizer.save(checkpoint)
    # What `llmkit-lm-eval --model llmkit --model_args checkpoint=...` passes: its own cuda:0 default.
    model = LlmkitLM.create_from_arg_obj({"checkpoint": str(checkpoint)}, {"device": "cuda:0", "batch_size": 1})
    assert model._device == torch.device("cpu") and model.batch_size == 1
    with pytest.raises(ConfigError, match="CUDA is not available"):  # asked for in model_args: refused in one line
        LlmkitLM.create_from_arg_obj({"checkpoint": str(checkpoint), "device": "cuda"}, {})


def test_chat_prompts_use_llmkits_chat_format(engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert (
        LlmkitLM(engine=engine).apply_chat_template(messages)
        == "<|endoftext|><|system|>Be brief.<|end|><|user|>2+2?<|end|><|assistant|>"
    )


def test_lm_eval_on_a_checkpoint_scores_as_llmkit_eval(engine, tasks, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    write_model(
        checkpoint, engine.model.state_dict(), engine.model.config, {"tokenizer_sha256": engine.tokenizer.sha256}
    )
    engine.tokenizer.save(checkpoint)
    # As lm-eval's command line runs it (--model llmkit --model_args ...): the model found by name, and
    # lm-eval's own --device and --batch_size defaults sent along, which the model_args must override.
    results = lm_eval.simple_evaluate(
        model="llmkit",
        model_args=f"checkpoint={checkpoint},device=cpu,batch_size=3",
        device="cuda:0",
        batch_size=1,
        tasks=["llmkit_tiny_choice", "llmkit_tiny_rolling"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        bootstrap_iters=1,
    )
    choice, rolling = results["results"]["llmkit_tiny_choice"], results["results"]["llmkit_tiny_rolling"]
    ours = evaluate_choice(engine.model, engine.tokenizer, load_choice_task(tasks / "llmkit_tiny_choice.jsonl"))
    assert ours["accuracy"] != ours["accuracy_norm"]  # the data tells the two metrics apart
    assert (choice["acc,none"], choice["acc_norm,none"]) == (ours["accuracy"], ours["accuracy_norm"])
    assert choice["acc_stderr,none"] == pytest.approx(ours["stderr"], rel=1e-12)
    perplexity = evaluate_perplexity(engine.model, engine.tokenizer, TEXTS)
    assert rolling["bits_per_byte,none"] == pytest.approx(perplexity["bits_per_byte"], rel=1e-9)
    assert results["config"]["model_num_parameters"] == engine.model.num_parameters()


ASCII_QUESTIONS = [
    ("the sky is", ["blue", "green", "a"], 0),
    ("the snow is", ["white", "yellow"], 1),
    ("coal is", ["black", "blue", "white", "no"], 2),
    ("the sun is", ["yellow", "hot"], 0),
    ("0123 is", ["4567", "89", "0"], 0),
    ("the end", [".", "is near."], 1),
]
# Shorter than the context: lm-eval's hf model lets a window's predictions see context_length tokens, llmkit's
# windows one fewer (loglikelihood.py), so longer documents differ slightly between the two by design.
ASCII_TEXTS = ["the sky is blue. the grass is green.", "coal is black.", "0 the sun is yellow."]


def own_format_tokenizer(adds_bos: bool):
    """A character vocabulary with a model's own bos (<|im_start|>) and eos (<|im_end|>), none of llmkit's
    tokens; ``adds_bos``: its tokenizer.json prepends bos, as Llama's do."""
    import string

    from tokenizers import Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as Backend

    from llmkit.tokenizer import Tokenizer

    backend = Backend(
        models.BPE(vocab={character: index for index, character in enumerate(string.printable)}, merges=[])
    )
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    if adds_bos:
        bos = ("<|im_start|>", backend.token_to_id("<|im_start|>"))
        backend.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[bos])
    return Tokenizer(
        backend.to_str().encode(),
        {
            "kind": "char",
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "chat_template": "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}",
        },
    )


@pytest.mark.parametrize("adds_bos", [False, True])
def test_lm_evals_hf_model_on_an_exported_chat_model_scores_as_llmkit(tmp_path, adds_bos):
    """lm-eval's hf model conditions empty contexts (rolling documents) on the tokenizer's bos, not its eos,
    and encodes contexts with what tokenizer.json adds; llmkit does the same, so an exported model with its
    own vocabulary scores alike in both."""
    pytest.importorskip("accelerate", reason="lm-eval's hf model imports accelerate (pip install accelerate)")
    from llmkit.eval.loglikelihood import encode_pair, prefix_token_id
    from llmkit.interop import export_hf

    tokenizer = own_format_tokenizer(adds_bos)
    bos = tokenizer.backend.token_to_id("<|im_start|>")
    assert prefix_token_id(tokenizer) == bos != tokenizer.eot_id
    assert encode_pair(tokenizer, "", "ab")[0] == [bos]
    assert encode_pair(tokenizer, "x", " ab")[0] == [bos, tokenizer.encode("x")[0]][-1 - adds_bos :]
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=tokenizer.vocab_size, context_length=48)).eval()
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    write_model(checkpoint, model.state_dict(), model.config, {"tokenizer_sha256": tokenizer.sha256})
    tokenizer.save(checkpoint)
    export_hf(checkpoint, tmp_path / "hf")
    write_choice_task(tmp_path, "own_choice", ASCII_QUESTIONS)
    write_harness_task(
        tmp_path, "own_rolling", [{"text": text} for text in ASCII_TEXTS], "loglikelihood_rolling", ROLLING_FIELDS
    )
    # lm-eval's hf model scores a tokenizer-added bos of a rolling document as its first token; llmkit does not.
    names = ["own_choice"] + ([] if adds_bos else ["own_rolling"])
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tmp_path / 'hf'},dtype=float32,device=cpu",
        tasks=names,
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        bootstrap_iters=0,
    )["results"]
    ours = evaluate_choice(model, tokenizer, load_choice_task(tmp_path / "own_choice.jsonl"))
    assert (results["own_choice"]["acc,none"], results["own_choice"]["acc_norm,none"]) == (
        ours["accuracy"],
        ours["accuracy_norm"],
    )
    if not adds_bos:
        perplexity = evaluate_perplexity(model, tokenizer, ASCII_TEXTS)
        assert results["own_rolling"]["bits_per_byte,none"] == pytest.approx(perplexity["bits_per_byte"], rel=1e-5)
