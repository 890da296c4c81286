"""The README.md (model card) of an exported HF directory: what it is and how to prompt it.

The policy was trained on prompts built by ``data.template`` and then the tokenizer's chat
template; prompted without them it sees text it was never trained on, so the card says so and
shows the call that applies the template.
"""

from __future__ import annotations

import json
from pathlib import Path

ACTOR_USAGE = '''```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("{path}")
model = AutoModelForCausalLM.from_pretrained("{path}", dtype="auto")
messages = [{{"role": "user", "content": "<your data.template with the problem filled in>"}}]
prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
inputs = tok(prompt, return_tensors="pt", add_special_tokens=False)
out = model.generate(**inputs, max_new_tokens=512)
print(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```'''


def has_chat_template(out_dir: Path) -> bool:
    """Whether the exported tokenizer brings a chat template (a chat_template.jinja or in tokenizer_config.json)."""
    if (out_dir / "chat_template.jinja").is_file():
        return True
    config = out_dir / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))


def model_card(out_dir: Path, *, critic: bool, architecture: str, dtype: str, source: str | None) -> str:
    """The card's markdown for an export in ``out_dir``."""
    lines = [f"# {out_dir.name}", "",
             f"A `{architecture}` ({dtype}) exported by remix-megatron (`convert to-hf` or the end of `train`)"
             + (f", fine-tuned from `{source}`." if source else "."), ""]
    if critic:
        lines += ["The critic: its per-token logits (one label) are the value estimates; load it with "
                  "`AutoModelForTokenClassification.from_pretrained`.", ""]
        return "\n".join(lines)
    template = ("The tokenizer's chat template is included (`chat_template.jinja` / `tokenizer_config.json`)."
                if has_chat_template(out_dir) else
                "**No chat template came with the source tokenizer**: add the one the prompts were built with "
                "before generating.")
    lines += ["## Prompting", "",
              "Training prompts were the run's `data.template` (in its `config.yaml`) passed through the tokenizer's "
              "chat template with the generation prompt; the model expects that format. Plain text without the chat "
              f"template gives responses it was never trained on. {template}", "",
              ACTOR_USAGE.format(path=out_dir), ""]
    return "\n".join(lines)
