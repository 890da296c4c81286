"""The transformers generation engine: the CPU engine, and a reference engine on GPU.

Batched sampling with left padding and the KV cache (``model.generate``), every
``SamplingParams`` field honoured, deterministic under a seed. Its sampling log-probs are
the log-softmax of the raw logits at each sampled token (before temperature/top-k/top-p),
the same quantity vLLM returns and the actor recomputes. ``sleep`` moves the weights to the
CPU (a no-op on a CPU run, where it only guards against generating while asleep).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from remix_megatron.rollout.engine import Generation, SamplingParams


class HFEngine:
    def __init__(self, hf_dir: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 batch_size: int = 256) -> None:
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.device, self.batch_size = torch.device(device), batch_size
        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(self.device).eval()
        self.pad_id = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else 0
        self._generation_config = GenerationConfig.from_model_config(self.model.config)
        self.awake = True

    # -- GenerationEngine -----------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Generation]]:
        if not self.awake:
            raise RuntimeError("the engine is asleep: call wake_up() (and update_weights) before generate()")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        results: list[list[Generation]] = [[] for _ in prompts]
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if params.seed is not None:
                torch.manual_seed(params.seed)
            for start in range(0, len(prompts), self.batch_size):
                chunk = list(range(start, min(start + self.batch_size, len(prompts))))
                for index, generations in zip(chunk, self._generate_batch([prompts[i] for i in chunk], params)):
                    results[index] = [Generation(prompt_index=index, token_ids=g.token_ids,
                                                 finish_reason=g.finish_reason, logprobs=g.logprobs)
                                      for g in generations]
        return results

    def _generate_batch(self, prompts: list[Sequence[int]], params: SamplingParams) -> list[list[Generation]]:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + list(p) for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        sample = params.temperature > 0
        stop = list(params.stop_token_ids) or None
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, generation_config=self._generation_config,
                do_sample=sample, temperature=params.temperature if sample else None,
                top_p=params.top_p if sample else None, top_k=(params.top_k if params.top_k > 0 else None) if sample
                else None, num_return_sequences=params.n, max_new_tokens=params.max_new_tokens,
                eos_token_id=stop, pad_token_id=self.pad_id, output_logits=params.return_logprobs,
                return_dict_in_generate=True)
        new = out.sequences[:, width:]
        logprobs = None
        if params.return_logprobs:
            logits = torch.stack(out.logits, dim=1).float()  # [b*n, new, vocab], raw
            logprobs = torch.log_softmax(logits, -1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        stops = set(params.stop_token_ids)
        grouped: list[list[Generation]] = []
        for row in range(new.size(0)):
            tokens = new[row].tolist()
            end = next((i + 1 for i, t in enumerate(tokens) if t in stops), None)
            reason = "stop" if end is not None else "length"
            length = end if end is not None else len(tokens)
            if end is None and len(tokens) < params.max_new_tokens:  # every row was padded after others stopped
                reason = "abort"
            row_lp = logprobs[row, :length].cpu().numpy().astype(np.float32) if logprobs is not None else None
            generation = Generation(prompt_index=row // params.n, token_ids=np.asarray(tokens[:length], np.int32),
                                    finish_reason=reason, logprobs=row_lp)
            if row % params.n == 0:
                grouped.append([])
            grouped[-1].append(generation)
        return grouped

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        seen = set()
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in params:
                    raise KeyError(f"the engine's model has no parameter {name!r}")
                if params[name].shape != tensor.shape:
                    raise ValueError(f"{name}: engine shape {tuple(params[name].shape)}, got {tuple(tensor.shape)}")
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))
                seen.add(name)
        tied = {"lm_head.weight"} if getattr(self.model.config, "tie_word_embeddings", False) else set()
        missing = set(params) - seen - tied
        if missing:
            raise ValueError(f"update_weights left {len(missing)} parameters stale, e.g. {sorted(missing)[:5]}")

    def sleep(self) -> None:
        if self.device.type == "cuda":
            self.model.to("cpu")
            torch.cuda.empty_cache()
        self.awake = False

    def wake_up(self) -> None:
        if self.device.type == "cuda":
            self.model.to(self.device)
        self.awake = True

    def shutdown(self) -> None:
        self.awake = False
        self.model = None


def make_hf_engine(rollout, model, state, hf_dir: str, *, seed: int = 0) -> HFEngine:
    """Factory for ``rollout.engine=hf`` (one engine per rank; no TP inside the engine)."""
    del model, seed
    return HFEngine(hf_dir, device=state.runtime.device, dtype=state.runtime.params_dtype,
                    batch_size=rollout.hf_batch_size)

