"""Log-likelihood evaluation against naive references: continuation log-likelihoods and the greedy flag
against full forward passes, rolling windows against per-token scoring, perplexity and raw/normalised
accuracy against a uniform model worked by hand, accuracy against hand-computed per-choice scores, and
the task loaders on tiny hand-written files."""

import json
import math
import random

import helpers
import pytest
import torch
from helpers import tiny_config

from llmkit.errors import ConfigError, InputError
from llmkit.eval.choice import evaluate_choice
from llmkit.eval.choice_tasks import ChoiceExample, load_choice_task
from llmkit.eval.loglikelihood import loglikelihoods, rolling_loglikelihood, rolling_loglikelihoods, rolling_windows
from llmkit.eval.perplexity import evaluate_perplexity, load_texts
from llmkit.model import Transformer
from llmkit.tokenizer import Tokenizer

FACTS = {"sky": "blue", "grass": "green", "snow": "white", "sun": "yellow", "coal": "black"}


def fact_text(seed: int, sentences: int) -> str:
    """Sentences "the X is C." in random order."""
    generator = random.Random(seed)
    return " ".join(f"the {noun} is {FACTS[noun]}." for noun in generator.choices(sorted(FACTS), k=sentences))


def char_tokenizer(folder) -> Tokenizer:
    return helpers.char_tokenizer(folder, fact_text(0, 50) + " Question: Answer:\né0123456789\n", 200)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return char_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def model(tokenizer) -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config(vocab_size=tokenizer.vocab_size, context_length=16)).eval()


@pytest.fixture(scope="module")
def uniform(tokenizer) -> Transformer:
    """Every logit 0, so every token has probability 1/V whatever came before: scores worked by hand."""
    model = Transformer(tiny_config(vocab_size=tokenizer.vocab_size + 3, context_length=16)).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


def naive_logprobs(model, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1 from one plain forward pass."""
    with torch.no_grad():
        logprobs = model(torch.tensor([ids]))[0].double().log_softmax(-1)
    return [float(logprobs[position - 1, ids[position]]) for position in range(1, len(ids))]


def naive_greedy(model, ids: list[int], steps: int) -> list[int]:
    ids = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-steps:]


# ------------------------------------------------------------------ loglikelihood
def test_loglikelihoods_equal_a_naive_forward_sum(model, tokenizer):
    requests = [("the sky", " is blue"), ("snow is ", "white."), ("", "the sun"), ("coal is black. " * 3, " the sky")]
    results = loglikelihoods(model, tokenizer, requests, batch_size=2)
    eot = tokenizer.eot_id
    # By hand: trailing spaces of the context belong to the continuation; an empty context is end-of-text;
    # a pair longer than the window keeps its last context_length tokens.
    expected_pairs = [
        (tokenizer.encode("the sky"), tokenizer.encode(" is blue")),
        (tokenizer.encode("snow is"), tokenizer.encode(" white.")),
        ([eot], tokenizer.encode("the sun")),
        (tokenizer.encode("coal is black. " * 3)[:-1], tokenizer.encode("  the sky")),
    ]
    for (logprob, _), (context_ids, continuation_ids) in zip(results, expected_pairs):
        ids = (context_ids + continuation_ids)[-model.config.context_length :]
        assert logprob == pytest.approx(sum(naive_logprobs(model, ids)[-len(continuation_ids) :]), abs=1e-4)


def test_greedy_flag_is_true_exactly_for_the_greedy_continuation(model, tokenizer):
    context = tokenizer.encode("the grass")
    greedy_ids = naive_greedy(model, context, 4)
    greedy_text = tokenizer.decode(greedy_ids)
    assert tokenizer.encode(greedy_text) == greedy_ids
    other = next(token for token in tokenizer.encode("abcdefghij") if token != greedy_ids[-1])
    other_text = tokenizer.decode(greedy_ids[:-1] + [other])
    (_, greedy), (_, not_greedy) = loglikelihoods(
        model, tokenizer, [("the grass", greedy_text), ("the grass", other_text)]
    )
    assert greedy and not not_greedy


def test_a_continuation_that_fills_the_window_is_refused(model, tokenizer):
    with pytest.raises(InputError, match="request 0"):
        loglikelihoods(model, tokenizer, [("a", "x" * model.config.context_length)])


# -------------------------------------------------------------- rolling windows
@pytest.mark.parametrize(
    "token_count,context_length,stride", [(1, 4, None), (3, 4, None), (10, 4, None), (37, 8, 3), (20, 5, 1)]
)
def test_rolling_windows_score_every_token_exactly_once(token_count, context_length, stride):
    windows = rolling_windows(token_count, context_length, stride)
    scored = [position for window in windows for position in range(window.end - window.scored, window.end)]
    assert scored == list(range(1, token_count + 1))
    for window in windows:
        assert window.end - window.start <= context_length and 1 <= window.scored <= window.end - window.start - 1
    if token_count + 1 >= context_length:  # enough text: every window is full, the last one included
        assert all(window.end - window.start == context_length for window in windows)


def test_rolling_equals_one_window_when_the_text_fits(model, tokenizer):
    text = "the sun is"  # 10 tokens + end-of-text fit in 16
    total, count = rolling_loglikelihood(model, tokenizer, text)
    assert count == len(text)
    assert total == pytest.approx(sum(naive_logprobs(model, [tokenizer.eot_id] + tokenizer.encode(text))), abs=1e-4)


def test_stride_one_gives_every_token_the_full_window_of_context(model, tokenizer):
    text = "the snow is white. the coal is black."
    ids = [tokenizer.eot_id] + tokenizer.encode(text)
    window = model.config.context_length
    # Independent spec: token p is predicted from the (at most window - 1) tokens right before it.
    expected = sum(
        naive_logprobs(model, ids[max(0, position - window + 1) : position + 1])[-1] for position in range(1, len(ids))
    )
    total, count = rolling_loglikelihood(model, tokenizer, text, stride=1)
    assert count == len(text)
    assert total == pytest.approx(expected, abs=1e-4)


def test_documents_are_scored_independently_in_shared_batches(model, tokenizer):
    texts = ["the sky is blue. the grass is green.", "", "coal", "the sun is yellow. the snow is white. the end"]
    together = rolling_loglikelihoods(model, tokenizer, texts, stride=5, batch_size=3)
    alone = [rolling_loglikelihood(model, tokenizer, text, stride=5) for text in texts]
    assert [count for _, count in together] == [count for _, count in alone] == [len(text) for text in texts]
    assert [total for total, _ in together] == pytest.approx([total for total, _ in alone], abs=1e-4)


def test_stride_out_of_range_is_a_config_error(model, tokenizer):
    with pytest.raises(ConfigError, match="stride"):
        rolling_loglikelihood(model, tokenizer, "the sky", stride=model.config.context_length)


# ------------------------------------------------------------------ perplexity
def test_perplexity_of_a_uniform_model_worked_by_hand(uniform, tokenizer):
    texts = ["the sky is blue. the snow is white.", "é0é"]  # 35 + 3 characters, 35 + 5 bytes
    result = evaluate_perplexity(uniform, tokenizer, texts, stride=6)
    vocab = uniform.config.vocab_size
    assert (result["tokens"], result["bytes"], result["documents"]) == (38, 40, 2)
    assert result["nats_per_token"] == pytest.approx(math.log(vocab), rel=1e-6)
    assert result["perplexity"] == pytest.approx(vocab, rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(38 * math.log(vocab) / (math.log(2) * 40), rel=1e-6)


def test_bits_per_byte_is_nats_times_tokens_over_bytes(model, tokenizer):
    texts = [fact_text(7, 6), "é" * 20]
    result = evaluate_perplexity(model, tokenizer, texts)
    total = sum(rolling_loglikelihood(model, tokenizer, text)[0] for text in texts)
    assert result["nats_per_token"] == pytest.approx(-total / result["tokens"], rel=1e-6)
    expected = result["nats_per_token"] * result["tokens"] / (math.log(2) * result["bytes"])
    assert result["bits_per_byte"] == pytest.approx(expected, rel=1e-9)
    assert result["bytes"] == len(texts[0]) + 40


def test_load_texts_reads_jsonl_records_and_whole_text_files(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    (tmp_path / "b.txt").write_text("line 1\nline 2\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "one"}\n{"body": "two"}\n')
    assert load_texts(tmp_path / "a.jsonl") == ["one", "two"]
    assert load_texts(tmp_path / "b.txt") == ["line 1\nline 2\n"]
    with pytest.raises(InputError, match=r"bad.jsonl:2: field 'text'"):
        load_texts(tmp_path / "bad.jsonl")


# -------------------------------------------------------------- multiple choice
def test_raw_and_length_normalised_accuracy_worked_by_hand(uniform, tokenizer):
    # Under the uniform model a choice of n characters scores -(n + 1) log V (its leading space is a token):
    # the raw score prefers the shortest choice, the per-character score the longest, ties the first.
    examples = [
        ChoiceExample("a", "sky", ["blue", "green", "white", "re"], 1, "jsonl"),
        ChoiceExample("b", "sun", ["ab", "cd"], 0, "jsonl"),
        ChoiceExample("c", "coal", ["black", "bk"], 1, "jsonl"),
    ]
    result = evaluate_choice(uniform, tokenizer, examples, template="{context}")
    log_vocab = math.log(uniform.config.vocab_size)
    assert result["per_example"][0]["logprobs"] == pytest.approx(
        [-5 * log_vocab, -6 * log_vocab, -6 * log_vocab, -3 * log_vocab]
    )
    assert [(r["prediction"], r["prediction_norm"]) for r in result["per_example"]] == [(3, 1), (0, 0), (1, 0)]
    assert (result["accuracy"], result["accuracy_norm"]) == (2 / 3, 2 / 3)


def test_accuracy_is_the_argmax_of_hand_computed_choice_loglikelihoods(model, tokenizer):
    examples = [
        ChoiceExample(str(index), context, choices, answer, "jsonl")
        for index, (context, choices, answer) in enumerate(
            [
                ("sky", ["blue", "green sea"], 0),
                ("coal", ["black", "white", "a"], 2),
                ("sun", ["yellow", "ye"], 1),
                ("the", ["snow", "grass is"], 0),
                ("is", ["b", "blue.", "black"], 1),
                ("0", ["12", "3456789"], 1),
            ]
        )
    ]
    result = evaluate_choice(model, tokenizer, examples, template="{context}")
    hits = hits_norm = 0
    for example, record in zip(examples, result["per_example"]):
        context_ids = tokenizer.encode(example.context)
        scores = [
            sum(naive_logprobs(model, context_ids + tokenizer.encode(" " + choice))[len(context_ids) - 1 :])
            for choice in example.choices
        ]
        assert record["logprobs"] == pytest.approx(scores, abs=1e-4)
        normalised = [score / len(choice) for score, choice in zip(scores, example.choices)]
        hits += scores.index(max(scores)) == example.answer
        hits_norm += normalised.index(max(normalised)) == example.answer
    assert result["accuracy"] == hits / len(examples)
    assert result["accuracy_norm"] == hits_norm / len(examples)
    # Standard error of a mean of 0/1 values: sqrt(p (1 - p) / (n - 1)).
    p = result["accuracy"]
    assert result["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (len(examples) - 1)))


def fact_examples() -> list[ChoiceExample]:
    colours = sorted(set(FACTS.values()))
    return [
        ChoiceExample(noun, f"the {noun} is", colours, colours.index(colour), "jsonl") for noun, colour in FACTS.items()
    ]


def test_fewshot_prompts_put_demonstrations_with_their_answers_first(model, tokenizer):
    examples = fact_examples()[:2]
    demos = [ChoiceExample(f"d{index}", f"q{index}", ["x", "y"], index % 2, "arc") for index in range(4)]
    result = evaluate_choice(model, tokenizer, examples, num_fewshot=2, fewshot_examples=demos, seed=3)
    for record, example in zip(result["per_example"], examples):
        blocks = record["prompt"].split("\n\n")
        assert blocks[-1] == f"Question: {example.context}\nAnswer:"
        shown = blocks[:-1]
        assert len(shown) == 2 and len(set(shown)) == 2
        assert set(shown) <= {f"Question: {demo.context}\nAnswer: {demo.choices[demo.answer]}" for demo in demos}
    again = evaluate_choice(model, tokenizer, examples, num_fewshot=2, fewshot_examples=demos, seed=3)
    assert [r["prompt"] for r in again["per_example"]] == [r["prompt"] for r in result["per_example"]]


def test_fewshot_from_the_evaluated_set_never_shows_the_question_itself(model, tokenizer):
    examples = fact_examples()
    result = evaluate_choice(model, tokenizer, examples, num_fewshot=len(examples) - 1, template="{context}")
    for record, example in zip(result["per_example"], examples):
        demonstrations = record["prompt"].split("\n\n")[:-1]
        assert len(demonstrations) == len(examples) - 1
        assert all(not block.startswith(example.context + " ") for block in demonstrations)
    with pytest.raises(ConfigError, match="num_fewshot"):
        evaluate_choice(model, tokenizer, examples, num_fewshot=len(examples))


# ------------------------------------------------------------------- loaders
def write_lines(path, records) -> str:
    path.write_text("".join((record if isinstance(record, str) else json.dumps(record)) + "\n" for record in records))
    return str(path)


def test_hellaswag_both_layouts_cleaned_as_lm_eval(tmp_path):
    path = write_lines(
        tmp_path / "hs.jsonl",
        [
            {
                "ind": 4,
                "activity_label": "Removing ice",
                "ctx_a": "A man scrapes ice.",
                "ctx_b": "then he",
                "endings": ["stops.", "sings [title] loudly.", "runs.", "sits."],
                "label": 1,
            },
            {"ctx": "A cat sits", "endings": ["down.", "up."], "label": "0"},
        ],
    )
    first, second = load_choice_task(path)
    assert first == ChoiceExample(
        "4", "Removing ice: A man scrapes ice. Then he", ["stops.", "sings. loudly.", "runs.", "sits."], 1, "hellaswag"
    )
    assert (second.context, second.answer, second.id) == ("A cat sits", 0, "hs/2")


def test_arc_labels_letters_and_digits(tmp_path):
    path = write_lines(
        tmp_path / "arc.jsonl",
        [
            {
                "id": "q1",
                "question": {
                    "stem": "Which?",
                    "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "B"}, {"text": "c", "label": "C"}],
                },
                "answerKey": "C",
            },
            {
                "id": "q2",
                "question": {"stem": "Num?", "choices": [{"text": "x", "label": "1"}, {"text": "y", "label": "2"}]},
                "answerKey": "2",
            },
        ],
    )
    assert load_choice_task(path) == [
        ChoiceExample("q1", "Which?", ["a", "b", "c"], 2, "arc"),
        ChoiceExample("q2", "Num?", ["x", "y"], 1, "arc"),
    ]


def test_mmlu_with_and_without_header_and_multiline_fields(tmp_path):
    body = 'What is 2+2?,3,4,5,6,B\n"A long\nquestion",w,x,y,z,3\n'
    (tmp_path / "math_test.csv").write_text(body)
    (tmp_path / "math_dev.csv").write_text(
        "question,choice0,choice1,choice2,choice3,answer\n" + body.replace(",B\n", ",1\n")
    )
    for name in ("math_test.csv", "math_dev.csv"):
        examples = load_choice_task(tmp_path / name)
        assert examples == [
            ChoiceExample("math/0", "What is 2+2?", ["3", "4", "5", "6"], 1, "mmlu"),
            ChoiceExample("math/1", "A long\nquestion", ["w", "x", "y", "z"], 3, "mmlu"),
        ]
    (tmp_path / "bad.csv").write_text(body + "Q,a,b,c,d,E\n")
    with pytest.raises(InputError, match=r"bad.csv:4: field 'answer' = 'E'"):
        load_choice_task(tmp_path / "bad.csv")
    (tmp_path / "short.csv").write_text("Q,a,b,c,A\n")
    with pytest.raises(InputError, match=r"short.csv:1: expected 6 columns"):
        load_choice_task(tmp_path / "short.csv")


def test_plain_jsonl_answer_as_index_or_letter(tmp_path):
    path = write_lines(
        tmp_path / "plain.jsonl",
        [
            {"question": "q", "choices": ["a", "b"], "answer": "b"},
            {"id": 7, "question": "r", "choices": ["c", "d", "e"], "answer": 2},
        ],
    )
    assert load_choice_task(path) == [
        ChoiceExample("plain/1", "q", ["a", "b"], 1, "jsonl"),
        ChoiceExample("7", "r", ["c", "d", "e"], 2, "jsonl"),
    ]


@pytest.mark.parametrize(
    "bad_line,message",
    [
        ('{"question": "q", "choices": ["a", "b"], "answer": 2}', "out of range for 2 choices"),
        ('{"question": "q", "choices": ["a", "b"]}', "missing field 'answer'"),
        ('{"question": "q", "choices": "ab", "answer": 0}', "'choices' should be a list"),
        ('{"question": "q", "choices": ["a", "b"], "answer": "Z"}', "neither a choice index nor a letter"),
        ('{"question": "q", "choices": ["a", "b"], "answer": 0', "not valid JSON"),
    ],
)
def test_malformed_rows_name_the_file_and_line(tmp_path, bad_line, message):
    path = write_lines(tmp_path / "task.jsonl", [{"question": "ok", "choices": ["a", "b"], "answer": 0}, "", bad_line])
    with pytest.raises(InputError, match=rf"task.jsonl:3: .*{message}"):
        load_choice_task(path)


def test_arc_row_with_an_unknown_answer_key_and_undetectable_files(tmp_path):
    arc = write_lines(
        tmp_path / "arc.jsonl",
        [
            {
                "question": {"stem": "s", "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "B"}]},
                "answerKey": "D",
            }
        ],
    )
    with pytest.raises(InputError, match=r"arc.jsonl:1: answerKey 'D' is not one of"):
        load_choice_task(arc)
    other = write_lines(tmp_path / "other.jsonl", [{"text": "hello"}])
    with pytest.raises(InputError, match=r"other.jsonl:1: cannot tell the format"):
        load_choice_task(other)
    with pytest.raises(InputError, match="unknown multiple-choice format"):
        load_choice_task(other, format="piqa")


def test_real_arc_and_mmlu_files_load(shared_data):
    arc = load_choice_task(shared_data / "arc" / "ARC-Easy" / "ARC-Easy-Dev.jsonl")
    assert len(arc) == 570 and all(0 <= example.answer < len(example.choices) for example in arc)
    assert {len(example.choices) for example in arc} <= {3, 4, 5}
    mmlu = load_choice_task(shared_data / "mmlu" / "dev" / "anatomy_dev.csv")
    assert len(mmlu) == 5 and mmlu[0].id == "anatomy/0" and mmlu[0].answer == 3
