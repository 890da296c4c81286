"""Prompt sources: records from jsonl / parquet / HF datasets, templated and tokenised.

A record needs a problem and a reference answer (field names configurable) and may carry an
id. The problem goes through the template (the paper's by default) and then the tokenizer's
chat template as one user turn with the generation prompt appended. Prompts longer than the
limit are dropped or left-truncated by configuration and counted, never a crash. Batches
come in a deterministic order per (seed, epoch); the position is a small state dict saved in
checkpoints.
"""

from __future__ import annotations

import json
import logging
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from remix_megatron.config.schema import OVERLONG_POLICIES, PAPER_TEMPLATE

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    id: str
    problem: str  # the raw problem text
    answer: str  # the reference answer
    token_ids: np.ndarray  # int32, the templated, chat-formatted prompt


def load_records(source: str, *, split: str = "train") -> list[dict[str, Any]]:
    """Rows of a ``.jsonl`` / ``.parquet`` file, an HF ``datasets`` directory, or a hub dataset name."""
    path = Path(source)
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise ValueError(f"prompt file {source} does not exist")
        return _nonempty(source, [row for number, line in enumerate(path.read_bytes().splitlines(), start=1)
                                  if (row := _jsonl_record(source, number, line)) is not None])
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        if not path.is_file():
            raise ValueError(f"prompt file {source} does not exist")
        return _nonempty(source, pq.read_table(path).to_pylist())
    import datasets

    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{source} has splits {sorted(loaded)}, not {split!r}")
            loaded = loaded[split]
        return loaded.to_list()
    return datasets.load_dataset(source, split=split).to_list()  # a hub name (needs network access)


def _jsonl_record(source: str, number: int, line: bytes) -> dict | None:
    """Line ``number`` of a .jsonl file as a record (None for a blank line); a ValueError naming the line."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{source}:{number}: not UTF-8 text (byte 0x{line[error.start]:02x} at column "
                         f"{error.start + 1}); convert the file to UTF-8") from None
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{source}:{number}: not valid JSON ({error})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{source}:{number}: a JSON {type(record).__name__} where a record belongs (one JSON "
                         "object per line, e.g. {\"problem\": ..., \"answer\": ...})")
    return record


def _nonempty(source: str, rows: list[dict]) -> list[dict]:
    if not rows:
        raise ValueError(f"{source} holds no records (one JSON object per line with a problem and an answer)")
    return rows


def check_template(template: str) -> None:
    """A ValueError unless ``template`` is a ``str.format`` pattern whose only field is ``{problem}``."""
    doubled = "write literal braces doubled, e.g. \\boxed{{}}"
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:  # a lone { or }
        raise ValueError(f"data.template {template!r}: {error}; {doubled}") from None
    if fields != {"problem"}:
        shown = ", ".join("{" + name + "}" for name in sorted(fields)) or "none"
        raise ValueError(f"data.template {template!r} has the fields {shown}; it needs {{problem}} and no other "
                         f"({doubled})")


# What a tokenizer_config.json says when tokenizer.json alone is the tokenizer (4.x | 5.x names).
GENERIC_TOKENIZER_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


def load_tokenizer(path: str):
    """The tokenizer of an HF directory (or hub name), of the class its tokenizer_config.json declares.

    transformers 5's AutoTokenizer replaces a declared generic class by the model type's own for
    some model types (qwen2 -> Qwen2Tokenizer, whose pre-tokenizer splits the tiny model's
    ``<think>`` into characters), so a generic declared class is loaded as itself.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config = Path(path) / "tokenizer_config.json"
    declared = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    if declared in GENERIC_TOKENIZER_CLASSES:
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def chat_token_ids(tokenizer, content: str) -> list[int]:
    """Token ids of one user turn plus the generation prompt in the tokenizer's chat template
    (a plain list: transformers 5 returns a BatchEncoding unless told otherwise)."""
    return list(tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=True,
                                              add_generation_prompt=True, return_dict=False))


def render(problem: str, template: str, tokenizer) -> list[int]:
    """Token ids of ``template`` applied to ``problem`` in the tokenizer's chat format."""
    content = template.format(problem=problem)
    if getattr(tokenizer, "chat_template", None):
        return chat_token_ids(tokenizer, content)
    return list(tokenizer(content)["input_ids"])


class PromptSource:
    """Tokenised prompts served in seeded, epoch-wise shuffled batches."""

    def __init__(self, records: Sequence[dict], tokenizer, *, template: str = PAPER_TEMPLATE,
                 max_prompt_tokens: int = 766, overlong: str = "drop", problem_key: str = "problem",
                 answer_key: str = "answer", id_key: str = "id", seed: int = 0, name: str = "prompts") -> None:
        if overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong={overlong!r} is not one of {', '.join(OVERLONG_POLICIES)}")
        check_template(template)
        self.seed, self.name = seed, name
        self.dropped = self.truncated = 0
        self.prompts: list[Prompt] = []
        for index, record in enumerate(records):
            missing = [key for key in (problem_key, answer_key)
                       if record.get(key) is None or not str(record[key]).strip()]
            if missing:
                raise ValueError(f"{name} row {index} lacks {', '.join(repr(k) for k in missing)} (absent, empty or "
                                 f"whitespace only; fields present: {sorted(record)}): fix the row, or set the field "
                                 "names in the data config")
            ids = render(str(record[problem_key]), template, tokenizer)
            if len(ids) > max_prompt_tokens:
                if overlong == "drop":
                    self.dropped += 1
                    continue
                ids, self.truncated = ids[-max_prompt_tokens:], self.truncated + 1
            self.prompts.append(Prompt(id=str(record.get(id_key, f"{name}-{index}")), problem=str(record[problem_key]),
                                       answer=str(record[answer_key]), token_ids=np.asarray(ids, dtype=np.int32)))
        if self.dropped or self.truncated:
            logger.warning("%s: %d prompts longer than %d tokens dropped, %d truncated", name, self.dropped,
                           max_prompt_tokens, self.truncated)
        if not self.prompts:
            raise ValueError(f"{name}: no prompt fits in {max_prompt_tokens} tokens ({self.dropped} dropped)")
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        return len(self.prompts)

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))

    def next_batch(self, size: int) -> list[Prompt]:
        """The next ``size`` prompts; an epoch boundary reshuffles and continues."""
        batch = []
        while len(batch) < size:
            order = self._order(self.epoch)
            take = min(size - len(batch), len(order) - self.position)
            batch += [self.prompts[i] for i in order[self.position:self.position + take]]
            self.position += take
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "size": len(self.prompts)}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["size"] != len(self.prompts):
            raise ValueError(f"{self.name}: saved position is for seed {state['seed']} and {state['size']} prompts, "
                             f"this source has seed {self.seed} and {len(self.prompts)}")
        self.epoch, self.position = state["epoch"], state["position"]
