"""Loading HF weights into TP/PP-sharded Megatron models, exporting them back, and checking
Megatron's logits against transformers' own model. All functions are collective over ranks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from remix_megatron.config import ModelConfig
from remix_megatron.convert.hf import (
    TOKENIZER_FILES,
    ConversionError,
    HFWeights,
    MegatronFromHF,
    SafetensorsShardWriter,
    check_model_matches_hf,
    hf_config_from_model,
    hf_tensors,
)
from remix_megatron.convert.model_card import model_card
from remix_megatron.models.sharding import iter_full_tensors, load_full_state_dict
from remix_megatron.parallel import ParallelState


def load_hf_into(hf_dir: str | Path, model: ModelConfig, state: ParallelState, *, actor: Sequence[torch.nn.Module],
                 critic: Sequence[torch.nn.Module] | None = None) -> None:
    """Initialise the actor (and the critic's trunk; its value head keeps its init) from HF weights."""
    check_model_matches_hf(model, hf_dir)
    weights = HFWeights(hf_dir)
    load_full_state_dict(list(actor), MegatronFromHF(weights, model), state)
    if critic is not None:
        load_full_state_dict(list(critic), MegatronFromHF(weights, model, critic_trunk=True), state,
                             keep=("output_layer.",))


def export_hf(chunks: Sequence[torch.nn.Module], state: ParallelState, model: ModelConfig, out_dir: str | Path, *,
              critic: bool = False, dtype: torch.dtype | None = None, source_hf_dir: str | Path | None = None,
              shard_bytes: int = 2 << 30) -> Path:
    """Write an HF checkpoint (``from_pretrained``-loadable) of ``chunks`` at any layout.

    Each pipeline stage's first TP/DP rank writes its own safetensors files while the TP group
    gathers one tensor at a time (peak extra memory: one full tensor plus a shard file's
    worth); rank 0 then writes the index, config.json, a README.md model card and (from
    ``source_hf_dir``) the tokenizer files.
    """
    out = Path(out_dir)
    if state.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    writes = state.tp_rank == 0 and state.dp_rank == 0
    target_dtype = dtype or state.runtime.params_dtype
    writer = SafetensorsShardWriter(out, f"model-pp{state.pp_rank:02d}", shard_bytes,
                                    transform=lambda t: t.to(target_dtype))
    for name, tensor in hf_tensors(iter_full_tensors(list(chunks), state), model, critic=critic):
        if writes:
            writer.add(name, tensor)
    if writes:
        writer.flush()
        (out / f".weight_map.pp{state.pp_rank:02d}.json").write_text(json.dumps(writer.weight_map))
    dist.barrier()
    if state.rank == 0:
        weight_map: dict[str, str] = {}
        for part in sorted(out.glob(".weight_map.pp*.json")):
            weight_map.update(json.loads(part.read_text()))
            part.unlink()
        total = sum((out / f).stat().st_size for f in set(weight_map.values()))
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=1))
        base = None
        if source_hf_dir is not None and (Path(source_hf_dir) / "config.json").is_file():
            base = json.loads((Path(source_hf_dir) / "config.json").read_text())
            for file in TOKENIZER_FILES:
                source = _confined_file(Path(source_hf_dir), file)
                if source is not None:
                    shutil.copyfile(source, out / file)
        config = hf_config_from_model(model, critic=critic, dtype=target_dtype, base=base)
        (out / "config.json").write_text(json.dumps(config, indent=1))
        (out / "README.md").write_text(model_card(out, critic=critic, architecture=config["architectures"][0],
                                                  dtype=config["dtype"], source=source_hf_dir and str(source_hf_dir)))
    dist.barrier()
    return out


def _confined_file(directory: Path, file: str) -> Path | None:
    """``directory/file`` resolved, if it is a file inside ``directory`` (or, in an HF hub cache snapshot, its
    repository's blobs/, where the snapshot's links point); None when absent; a ConversionError when a link
    leads anywhere else (an export must not copy an arbitrary file of this machine)."""
    path = directory / file
    if not path.is_file():
        return None
    real, roots = path.resolve(), [directory.resolve()]
    if directory.resolve().parent.name == "snapshots":
        roots.append(directory.resolve().parent.parent / "blobs")
    if not any(real.is_relative_to(root) for root in roots):
        raise ConversionError(f"{path} links to {real}, outside {directory}: not copied into the export (copy the "
                              "file into the model directory or fix the link)")
    return real


def megatron_logits(chunks: Sequence[torch.nn.Module], tokens: torch.Tensor, state: ParallelState
                    ) -> torch.Tensor | None:
    """Full-vocabulary logits ``[b, s, v]`` (gathered over TP) on the last stage, None elsewhere."""
    from remix_megatron.algorithms.megatron_adapter import MicroBatch, run_pipeline

    def build(batch):
        def loss_func(logits):
            parts = [torch.empty_like(logits) for _ in range(state.tensor_parallel)]
            dist.all_gather(parts, logits.contiguous(), group=state.tp_group)
            full = torch.cat(parts, dim=-1)
            return full.new_zeros(()), torch.zeros((), dtype=torch.int), {"logits": full}
        return loss_func

    batches = [MicroBatch(tokens=tokens, labels=tokens)]
    logs = run_pipeline(list(chunks), batches, build, state, forward_only=True)
    return logs[0]["logits"] if logs else None


def verify_against_hf(chunks: Sequence[torch.nn.Module], state: ParallelState, model: ModelConfig,
                      hf_dir: str | Path, *, seq_length: int = 32, batch: int = 2, seed: int = 0) -> float:
    """Max |Megatron - transformers| logit difference on random tokens, relative to the logit
    scale: divided by max(1, max |logit|), since fp32 rounding grows with the magnitude (a
    trained model's logits reach tens). The same value on every rank."""
    tokens = torch.randint(0, model.vocab_size, (batch, seq_length), generator=torch.Generator().manual_seed(seed))
    logits = megatron_logits(chunks, tokens.to(state.runtime.device), state)
    diff = torch.zeros((), dtype=torch.float64)
    if logits is not None and state.tp_rank == 0 and state.dp_rank == 0:
        from transformers import AutoModelForCausalLM

        reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
        with torch.no_grad():
            expected = reference(tokens).logits
        scale = max(1.0, expected.abs().max().item())
        diff = ((logits.float().cpu() - expected).abs().max() / scale).double()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()
