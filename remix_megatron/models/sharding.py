"""Move tensors between one full (TP=1, PP=1) Megatron state dict and TP/PP-sharded chunks.

Names in a full state dict are the ones a single-process GPTModel uses
(``decoder.layers.{global index}.…``); a chunk's local names count layers from 0, shifted by
the chunk's pipeline offset. A TP-sharded parameter carries Megatron's
``tensor_model_parallel`` and ``partition_dim`` attributes; the SwiGLU ``linear_fc1`` holds
``[gate; up]`` and each rank holds ``[gate shard; up shard]``.
"""

from __future__ import annotations

import re
from typing import Callable, Iterator, Mapping

import torch
import torch.distributed as dist

from remix_megatron.parallel import ParallelState

_LAYER = re.compile(r"^(decoder\.layers\.)(\d+)(\..*)$")
_EMBEDDING = "embedding.word_embeddings.weight"


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    return getattr(chunk, "module", chunk)


def layer_offset(chunk: torch.nn.Module, state: ParallelState) -> int:
    """Global index of the chunk's first transformer layer."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    model = _unwrap(chunk)
    return get_transformer_layer_offset(model.config, vp_stage=model.vp_stage, pp_rank=state.pp_rank)


def global_name(local_name: str, offset: int) -> str:
    match = _LAYER.match(local_name)
    if match is None:
        return local_name
    return f"{match.group(1)}{int(match.group(2)) + offset}{match.group(3)}"


def _is_glu_fc1(name: str, model: torch.nn.Module) -> bool:
    return model.config.gated_linear_unit and ".mlp.linear_fc1." in name


def _split_for_rank(name: str, full: torch.Tensor, param: torch.Tensor, model: torch.nn.Module,
                    state: ParallelState) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False) or state.tensor_parallel == 1:
        return full
    dim, tp, rank = param.partition_dim, state.tensor_parallel, state.tp_rank
    if _is_glu_fc1(name, model):
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp, dim=dim)[rank], up.chunk(tp, dim=dim)[rank]], dim=dim)
    return full.chunk(tp, dim=dim)[rank]


def _join_from_ranks(name: str, shards: list[torch.Tensor], param: torch.Tensor,
                     model: torch.nn.Module) -> torch.Tensor:
    dim = param.partition_dim
    if _is_glu_fc1(name, model):
        halves = [shard.chunk(2, dim=dim) for shard in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(shards, dim=dim)


def load_full_state_dict(chunks: list[torch.nn.Module], full: Mapping[str, torch.Tensor], state: ParallelState, *,
                         keep: tuple[str, ...] = ()) -> None:
    """Copy this rank's slices of the full state dict ``full`` into ``chunks``.

    Every parameter must be in ``full`` except those whose name starts with a ``keep``
    prefix, which keep their current values (e.g. the critic's value head).
    """
    for chunk in chunks:
        model = _unwrap(chunk)
        offset = layer_offset(model, state)
        params = dict(model.named_parameters())
        local = {}
        for name, own in model.state_dict().items():
            if name.endswith("_extra_state") or name.startswith(keep):
                local[name] = own
                continue
            source = global_name(name, offset)
            if source not in full and source == "output_layer.weight" and model.share_embeddings_and_output_weights:
                source = _EMBEDDING  # tied output layer on the last stage mirrors the embedding
            if source not in full:
                raise KeyError(f"full state dict has no {source!r} (needed by local {name!r})")
            tensor = _split_for_rank(name, full[source], params.get(name, own), model, state)
            if tensor.shape != own.shape:
                raise ValueError(f"{source}: slice {tuple(tensor.shape)} does not fit local {name} {tuple(own.shape)}")
            local[name] = tensor.to(own.dtype).clone()
        model.load_state_dict(local, strict=True)


def _param_tensor(name: str, param: torch.nn.Parameter) -> torch.Tensor:
    return param.detach()


def param_grad(name: str, param: torch.nn.Parameter) -> torch.Tensor:
    """A parameter's gradient: Megatron DDP's ``main_grad`` when present, else ``.grad``."""
    grad = getattr(param, "main_grad", None)
    grad = param.grad if grad is None else grad
    if grad is None:
        raise RuntimeError(f"{name} has no gradient")
    return grad


def iter_full_tensors(chunks: list[torch.nn.Module], state: ParallelState,
                      select: Callable[[str, torch.nn.Parameter], torch.Tensor] = _param_tensor,
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(full name, full tensor)`` for every parameter of this pipeline stage.

    ``select`` picks what to gather for each parameter (default: the parameter itself; e.g.
    ``param_grad`` or an optimizer moment, which share the parameter's sharding). Collective
    over the TP group: every TP rank of the stage must iterate.
    """
    for chunk in chunks:
        model = _unwrap(chunk)
        offset = layer_offset(model, state)
        for name, param in model.named_parameters():
            tensor = select(name, param)
            if getattr(param, "tensor_model_parallel", False) and state.tensor_parallel > 1:
                shards = [torch.empty_like(tensor) for _ in range(state.tensor_parallel)]
                dist.all_gather(shards, tensor.contiguous(), group=state.tp_group)
                tensor = _join_from_ranks(name, shards, param, model)
            yield global_name(name, offset), tensor
