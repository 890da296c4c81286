"""Prompt sources: formats, the paper's template through a chat template, truncation, order."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from remix_megatron.data import PAPER_TEMPLATE, PromptSource, load_records, render
from tests.unit.test_rewards import DATA

pytestmark = pytest.mark.unit


class CharTokenizer:
    """A stand-in tokenizer with a chat template: one id per character."""

    chat_template = "{user}"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt, return_dict):
        assert tokenize and add_generation_prompt and not return_dict and messages[0]["role"] == "user"
        return [1] + [ord(c) for c in messages[0]["content"]] + [2]

    def __call__(self, text):
        return {"input_ids": [ord(c) for c in text]}


def rows(n):
    return [{"id": f"r{i}", "problem": "x" * (i + 1), "answer": str(i)} for i in range(n)]


def test_paper_template_renders_like_the_paper():
    assert PAPER_TEMPLATE.format(problem="What is 1+1?") == (
        "What is 1+1? Let's think step by step and output the final answer within \\boxed{}.")


def test_template_goes_through_a_real_chat_template(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(set("<|user|>assistant:end " + PAPER_TEMPLATE + "12+?W hat is")), 3)}
    inner = Tokenizer(models.WordLevel({**vocab, "[UNK]": 0}, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="[UNK]")
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    ids = render("What is 1+1?", PAPER_TEMPLATE, loaded)
    assert loaded.decode(ids).replace(" ", "") == (
        "<|user|>What is 1+1? Let's think step by step and output the final answer within \\boxed{}."
        "<|assistant|>").replace(" ", "")


def test_formats_and_shared_data(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows(5)) + "\n")
    pq.write_table(pa.Table.from_pylist(rows(5)), tmp_path / "p.parquet")
    assert load_records(str(jsonl)) == load_records(str(tmp_path / "p.parquet")) == rows(5)
    import datasets

    datasets.Dataset.from_list(rows(5)).save_to_disk(str(tmp_path / "ds"))
    assert load_records(str(tmp_path / "ds")) == rows(5)
    if not (DATA / "math500.jsonl").is_file():
        pytest.skip(f"no data in {DATA}")
    math500 = load_records(str(DATA / "math500.jsonl"))
    assert len(math500) == 500 and {"id", "problem", "answer"} <= set(math500[0])
    with pytest.raises(ValueError, match="does not exist"):
        load_records(str(tmp_path / "missing.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"problem": 1}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        load_records(str(tmp_path / "bad.jsonl"))


def test_missing_fields_are_named():
    with pytest.raises(ValueError, match="row 1 lacks 'answer'.*fields present: \\['id', 'problem'\\]"):
        PromptSource([{"problem": "a", "answer": "1"}, {"id": "x", "problem": "b"}], CharTokenizer(),
                     template="{problem}")
    source = PromptSource([{"question": "a", "solution": "1"}], CharTokenizer(), template="{problem}",
                          problem_key="question", answer_key="solution")
    assert source.prompts[0].answer == "1" and source.prompts[0].id == "prompts-0"


def test_overlong_prompts_dropped_or_truncated_and_counted():
    # rendered length = len(problem) + 2 chat tokens; limit 6 keeps problems of <= 4 characters
    dropped = PromptSource(rows(10), CharTokenizer(), template="{problem}", max_prompt_tokens=6, overlong="drop")
    assert (len(dropped), dropped.dropped, dropped.truncated) == (4, 6, 0)
    cut = PromptSource(rows(10), CharTokenizer(), template="{problem}", max_prompt_tokens=6, overlong="truncate")
    assert (len(cut), cut.dropped, cut.truncated) == (10, 0, 6)
    assert all(len(p.token_ids) <= 6 for p in cut.prompts) and cut.prompts[-1].token_ids[-1] == 2
    with pytest.raises(ValueError, match="no prompt fits"):
        PromptSource(rows(3), CharTokenizer(), template="{problem}", max_prompt_tokens=1)


def test_deterministic_epochs_and_resume():
    source = PromptSource(rows(7), CharTokenizer(), template="{problem}", seed=3)
    first = [p.id for p in source.next_batch(5)] + [p.id for p in source.next_batch(5)]
    assert sorted(first[:7]) == sorted(f"r{i}" for i in range(7))  # epoch 0 covers every prompt once
    state = source.state_dict()
    assert state["epoch"] == 1 and state["position"] == 3
    upcoming = [p.id for p in source.next_batch(6)]
    again = PromptSource(rows(7), CharTokenizer(), template="{problem}", seed=3)
    again.load_state_dict(state)
    assert [p.id for p in again.next_batch(6)] == upcoming
    replay = PromptSource(rows(7), CharTokenizer(), template="{problem}", seed=3)
    assert [p.id for p in replay.next_batch(10)] == first
    with pytest.raises(ValueError, match="seed 3 and 7 prompts, this source has seed 4"):
        PromptSource(rows(7), CharTokenizer(), template="{problem}", seed=4).load_state_dict(state)


@pytest.mark.parametrize(("content", "message"), [
    (b'{"problem": "1+1", "answer": "2"}\n{"problem": "caf\xe9", "answer": "1"}\n',
     r"data.jsonl:2: not UTF-8 text \(byte 0xe9 at column 17\); convert the file to UTF-8"),
    (b'{"problem": "1+1", "answer": "2"}\n\n[1, 2]\n', r"data.jsonl:3: a JSON list where a record belongs"),
    (b'"just a string"\n', r"data.jsonl:1: a JSON str where a record belongs"),
    (b"\n  \n", r"data.jsonl holds no records"),
    (b"", r"data.jsonl holds no records"),
], ids=["latin-1", "array-line", "string-line", "blank-lines", "empty"])
def test_bad_data_files_name_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_records(str(path))


def test_empty_parquet_is_named(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"problem": pa.array([], pa.string()), "answer": pa.array([], pa.string())}), path)
    with pytest.raises(ValueError, match="data.parquet holds no records"):
        load_records(str(path))


def test_whitespace_only_answer_is_missing():
    records = rows(3)
    records[1]["answer"] = "  \t"
    with pytest.raises(ValueError, match=r"train row 1 lacks 'answer' \(absent, empty or whitespace only"):
        PromptSource(records, CharTokenizer(), template="{problem}", max_prompt_tokens=100, name="train")


@pytest.mark.parametrize(("template", "message"), [
    ("Q: {problem} \\boxed{}", r"has the fields \{\}, \{problem\}; it needs \{problem\} and no other"),
    ("{problem", r"expected '\}' before end of string; write literal braces doubled"),
    ("Solve it.", r"has the fields none; it needs \{problem\}"),
    ("{problem} {answer}", r"has the fields \{answer\}, \{problem\}"),
])
def test_templates_other_than_one_problem_field_are_refused(template, message):
    with pytest.raises(ValueError, match=message):
        PromptSource(rows(2), CharTokenizer(), template=template, max_prompt_tokens=100)


def test_doubled_braces_are_literal():
    source = PromptSource(rows(1), CharTokenizer(), template="{problem} \\boxed{{}}", max_prompt_tokens=100)
    assert "".join(chr(c) for c in source.prompts[0].token_ids[1:-1]) == "x \\boxed{}"


def test_tiny_tokenizer_round_trips_beside_a_qwen2_config(tmp_path):
    """Saved next to a qwen2 config.json (as in the tiny model), the tiny tokenizer loads back as
    itself: transformers 5's AutoTokenizer would make it a Qwen2Tokenizer that spells <think> out."""
    from transformers import Qwen2Config

    from remix_megatron.data import load_tokenizer
    from remix_megatron.data.tiny import WORDS, make_tokenizer

    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    Qwen2Config(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2).save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    text = "12+34=<think>64</think> \\boxed{46}"
    ids = tokenizer(text)["input_ids"]
    assert loaded(text)["input_ids"] == ids
    assert all(len(tokenizer(word)["input_ids"]) == 1 for word in WORDS) and len(ids) == 15  # 3 words, 12 chars
    message = [{"role": "user", "content": "1+2="}]
    assert render("1+2=", "{problem}", loaded) == render("1+2=", "{problem}", tokenizer) == list(
        tokenizer.apply_chat_template(message, tokenize=True, add_generation_prompt=True, return_dict=False))
