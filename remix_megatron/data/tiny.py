"""A synthetic verifiable task and a tiny model for CPU runs.

Task: add two 2-digit numbers. The prompt is ``"a+b="``; a correct response is
``"<think>D</think> \\boxed{S}"`` where ``S`` is the sum and ``D`` its digits least
significant first (a scratchpad a small transformer can learn: carries flow forward), so
the real math grader scores it. The tokenizer (an HF fast tokenizer with a chat template) is
character level except that ``<think>``, ``</think>`` and ``\\boxed{`` are one ordinary
vocabulary word each, as in the R1-distilled models' vocabularies: a response is ~12 tokens
(the issue's ~13-token completions), and decoding never strips them.

``build_tiny_model`` makes a ~0.8M-parameter Qwen2 model and SFT-trains it on CPU just
until greedy held-out accuracy reaches ``target_accuracy`` (default 20%: RL has headroom),
then saves an ordinary HF directory (config, safetensors, tokenizer, BUILD.json with the
accuracy reached) plus ``train.jsonl`` / ``heldout.jsonl`` prompt files (fields id, problem,
answer). It is seeded and cached by its settings (under ``$REMIX_MEGATRON_CACHE`` or
``~/.cache/remix_megatron``), so it is built once per machine.

The build runs in a subprocess with pinned kernels (``PINNED_KERNELS``): ATen's portable kernels
instead of the AVX2/AVX-512 ones this CPU would pick, MKL's conditional numerical reproducibility
mode ``COMPATIBLE`` and one thread. Unpinned, the SFT's float rounding follows the CPU's vector
width, the threshold stop lands on another step, and the model (and every accuracy measured from
it) depends on the machine that built it: an AVX-512 Intel build started RL at 0.242 held-out
accuracy, an AVX2 EPYC build at 0.178. BUILD.json records the weights' SHA-256; a build equal to
``REFERENCE_WEIGHTS_SHA256`` is the model the README's numbers were measured on. The pinning removes
the caller's environment from the build, not the CPU model: a pinned build on an Intel Xeon
(AVX-512, AMX) gave other weights (192 SFT steps) than the reference EPYC build (235).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from remix_megatron.data.prompts import chat_token_ids

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<|pad|>", "<|user|>", "<|assistant|>", "<|end|>")
CHARACTERS = "0123456789+= <>/thinkbox\\ed{}"
WORDS = ("<think>", "</think>", "\\boxed{")  # one token each
CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TEMPLATE = "{problem}"  # the tiny task's prompt template (the paper's would swamp a 64-token context)
# Kernels the build runs with, whatever the caller's environment (see the module doc: not the CPU model).
# ONEDNN_MAX_CPU_ISA only matters if an op reaches oneDNN in fp32 (none measured does).
PINNED_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41",
                  "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# The default settings' build under PINNED_KERNELS on an x86-64 CPU (measured on an AMD EPYC, AVX2):
# the model behind the README's numbers. Another value means other kernels (another CPU model, even an
# x86-64 one, BLAS or torch), not a corrupt file: the numbers then describe a different model.
REFERENCE_WEIGHTS_SHA256 = "3be08763e42d4df19615360ebb6a793c5af2413f6ec7fb51d3048459bbf179a0"


@dataclass(frozen=True)
class TinySettings:
    seed: int = 0
    min_operand: int = 10
    max_operand: int = 99
    hidden_size: int = 128
    num_layers: int = 4
    target_accuracy: float = 0.20
    max_steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    eval_every: int = 5  # accuracy climbs from 0 to ~0.5 within ~20 steps: often, then every step
    eval_size: int = 128
    version: int = 5  # 3: <think>, </think>, \\boxed{ single tokens; 4: no token_type_ids; 5: pinned kernels

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def problem(a: int, b: int) -> str:
    return f"{a}+{b}="


def solution(a: int, b: int) -> str:
    total = str(a + b)
    return f"<think>{total[::-1]}</think> \\boxed{{{total}}}"


def split_problems(settings: TinySettings, split: str, count: int) -> list[dict]:
    """Deterministic problems; the held-out split never shares a pair with the train split."""
    rng = random.Random(f"{settings.seed}-{split}")
    rows = []
    while len(rows) < count:
        a, b = rng.randint(settings.min_operand, settings.max_operand), rng.randint(settings.min_operand,
                                                                                     settings.max_operand)
        held_out = (a * 7919 + b) % 10 == 0  # 10% of all pairs are reserved for evaluation
        if held_out == (split == "heldout"):
            rows.append({"id": f"add-{split}-{len(rows)}", "problem": problem(a, b), "answer": str(a + b)})
    return rows


def make_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({piece: len(SPECIAL_TOKENS) + i for i, piece in enumerate((*CHARACTERS, *WORDS))})
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<|pad|>"))
    words = "|".join(re.escape(word) for word in WORDS)  # a word where one starts, else a single character
    inner.pre_tokenizer = pre_tokenizers.Split(Regex(f"{words}|."), "isolated")
    inner.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<|pad|>", eos_token="<|end|>",
                                        unk_token="<|pad|>", additional_special_tokens=list(SPECIAL_TOKENS[1:3]),
                                        model_input_names=["input_ids", "attention_mask"])  # Qwen2 takes no token types
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def default_cache_dir() -> Path:
    return Path(os.environ.get("REMIX_MEGATRON_CACHE", Path.home() / ".cache" / "remix_megatron"))


def _model_config(settings: TinySettings, vocab_size: int):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab_size, hidden_size=settings.hidden_size,
                       intermediate_size=settings.hidden_size * 11 // 4, num_hidden_layers=settings.num_layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0,
                       rms_norm_eps=1e-6, tie_word_embeddings=False, pad_token_id=0, eos_token_id=3, bos_token_id=1)


def _encode(tokenizer, rows: list[dict], with_answers: bool):
    prompts = [chat_token_ids(tokenizer, TEMPLATE.format(problem=r["problem"])) for r in rows]
    if not with_answers:
        return prompts
    answers = [tokenizer(solution(*map(int, r["problem"][:-1].split("+"))))["input_ids"] + [tokenizer.eos_token_id]
               for r in rows]
    return prompts, answers


def greedy_accuracy(model, tokenizer, rows: list[dict], *, batch_size: int = 128, max_new_tokens: int = 40) -> float:
    """Share of ``rows`` whose greedy response the math grader scores 1."""
    import torch

    from remix_megatron.rewards import MathGrader

    grader, correct = MathGrader(timeout_s=2.0), 0
    model.eval()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        prompts = _encode(tokenizer, chunk, with_answers=False)
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        scores, _ = grader(texts, [r["answer"] for r in chunk])
        correct += int(sum(scores))
    model.train()
    return correct / len(rows)


def _train(settings: TinySettings, model, tokenizer, heldout: list[dict]) -> tuple[float, int]:
    import torch

    torch.manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 100))
    rows = split_problems(settings, "train", settings.batch_size * settings.max_steps)
    accuracy, step = 0.0, 0
    model.train()
    for step in range(1, settings.max_steps + 1):
        batch = rows[(step - 1) * settings.batch_size: step * settings.batch_size]
        prompts, answers = _encode(tokenizer, batch, with_answers=True)
        sequences = [p + a for p, a in zip(prompts, answers)]
        width = max(map(len, sequences))
        ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences])
        labels = torch.full_like(ids, -100)
        for row, (p, a) in enumerate(zip(prompts, answers)):
            labels[row, len(p):len(p) + len(a)] = torch.tensor(a)
        loss = model(input_ids=ids, attention_mask=(ids != 0).long() | (labels != -100).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % settings.eval_every == 0 or accuracy >= settings.target_accuracy / 4:  # near: every step
            accuracy = greedy_accuracy(model, tokenizer, heldout)
            logger.info("tiny model SFT step %d: loss %.4f, held-out accuracy %.3f", step, loss.item(), accuracy)
            if accuracy >= settings.target_accuracy:
                break
    return accuracy, step


def tiny_model_dir(out_dir: str | os.PathLike | None = None, settings: TinySettings = TinySettings()) -> Path:
    """Where ``build_tiny_model`` keeps (or finds) the model: ``out_dir``, else the cache by settings."""
    return Path(out_dir) if out_dir else default_cache_dir() / f"tiny-arith-{settings.key()}"


def weights_sha256(model) -> str:
    """SHA-256 over the parameters' bytes in name order: equal only for bitwise-equal weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def build_tiny_model(out_dir: str | os.PathLike | None = None, settings: TinySettings = TinySettings(), *,
                     force: bool = False) -> Path:
    """Build (or reuse from the cache) the SFT-ed tiny arithmetic model; returns its HF directory.

    The build itself runs in a fresh interpreter under ``PINNED_KERNELS`` (they must be set before
    torch loads), inheriting this process's stderr for its progress lines."""
    out = tiny_model_dir(out_dir, settings)
    if (out / "BUILD.json").is_file() and not force:
        return out
    root = str(Path(__file__).resolve().parents[2])  # this package's tree, however the caller imported it
    env = {**os.environ, **PINNED_KERNELS,
           "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
    level = logging.getLogger().getEffectiveLevel()
    result = subprocess.run([sys.executable, "-m", "remix_megatron.data.tiny", str(out),
                             json.dumps(asdict(settings)), str(level)], env=env)
    if result.returncode != 0 or not (out / "BUILD.json").is_file():
        raise RuntimeError(f"building the tiny model into {out} failed (exit {result.returncode}); "
                           "its output is above")
    return out


def _build_pinned(out: Path, settings: TinySettings) -> None:
    """The build proper; runs under ``PINNED_KERNELS`` (``python -m remix_megatron.data.tiny``)."""
    import torch
    from transformers import Qwen2ForCausalLM

    unpinned = {k: os.environ.get(k) for k, v in PINNED_KERNELS.items() if os.environ.get(k) != v}
    if unpinned or torch.backends.cpu.get_cpu_capability() != "DEFAULT":
        raise RuntimeError(f"the tiny model must be built under {PINNED_KERNELS}; differs: {unpinned}, "
                           f"ATen capability {torch.backends.cpu.get_cpu_capability()}")
    torch.set_num_threads(1)
    start = time.monotonic()
    tokenizer = make_tokenizer()
    torch.manual_seed(settings.seed)
    model = Qwen2ForCausalLM(_model_config(settings, vocab_size=64))
    heldout = split_problems(settings, "heldout", settings.eval_size)
    accuracy, steps = _train(settings, model, tokenizer, heldout)
    staging = out.with_name(out.name + f".tmp{os.getpid()}")  # concurrent builders never share a staging dir
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    build = {"settings": asdict(settings), "heldout_accuracy": accuracy, "sft_steps": steps,
             "parameters": sum(p.numel() for p in model.parameters()), "build_s": round(time.monotonic() - start, 1),
             "weights_sha256": weights_sha256(model), "kernels": PINNED_KERNELS, "torch": torch.__version__,
             "task": "a+b= (2 digits) -> <think>reversed sum</think> \\boxed{sum}"}
    (staging / "BUILD.json").write_text(json.dumps(build, indent=1))
    for split, count in (("train", 4096), ("heldout", 512)):  # SFT evaluated on the first eval_size
        rows = split_problems(settings, split, count)
        (staging / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, out)


def is_reference_build(model_dir: str | os.PathLike) -> bool:
    """Whether ``model_dir`` holds the model the README's numbers were measured on."""
    build_file = Path(model_dir) / "BUILD.json"
    build = json.loads(build_file.read_text()) if build_file.is_file() else {}
    return build.get("weights_sha256") == REFERENCE_WEIGHTS_SHA256


if __name__ == "__main__":  # the pinned build's subprocess: OUT SETTINGS_JSON LOG_LEVEL
    logging.basicConfig(level=int(sys.argv[3]), format="%(message)s")
    _build_pinned(Path(sys.argv[1]), TinySettings(**json.loads(sys.argv[2])))
