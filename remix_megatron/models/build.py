"""Actor and critic construction: Megatron GPTModel chunks from a ``ModelConfig``.

The actor is a plain GPTModel (logits over the TP-sharded vocabulary). The critic is the
same trunk whose output layer is a scalar value head. Layer specs come from Megatron: the
TransformerEngine spec on GPU, the local (pure torch) spec on CPU. One chunk per virtual
pipeline stage is returned, as Megatron's schedules expect a list of model chunks.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from remix_megatron.compat import transformer_config_adaptations
from remix_megatron.config import ModelConfig
from remix_megatron.parallel import ParallelState


def transformer_config(model: ModelConfig, state: ParallelState):
    """The Megatron ``TransformerConfig`` for ``model`` on this layout and hardware.

    Dropout is 0 (RL fine-tuning recomputes log-probs that must match the sampled policy).
    Hardware-specific settings (CPU, gloo) come from ``compat``.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    runtime = state.runtime
    adaptations = transformer_config_adaptations(device_type=runtime.device.type, backend=runtime.backend)
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        layernorm_epsilon=model.norm_epsilon,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=state.tensor_parallel,
        pipeline_model_parallel_size=state.pipeline_parallel,
        virtual_pipeline_model_parallel_size=state.virtual_pipeline if state.virtual_pipeline > 1 else None,
        sequence_parallel=state.sequence_parallel,
        params_dtype=runtime.params_dtype,
        # under autocast the residual stream between layers (and so between stages) is bf16: Megatron's
        # bias-dropout-add casts the residual to the bf16 branch output
        pipeline_dtype=runtime.autocast_dtype or runtime.params_dtype,
        bf16=runtime.params_dtype == torch.bfloat16,
        # Losses return (sum, denominator); gradients are divided by the denominator summed
        # over micro-batches and DP ranks (see algorithms/megatron_adapter.py).
        calculate_per_token_loss=True,
        gradient_accumulation_fusion=False,  # needs apex
        apply_rope_fusion=False,
        persist_layer_norm=False,
        **adaptations,
    )


def layer_spec(state: ParallelState):
    """Megatron's layer spec for the resolved transformer implementation."""
    from megatron.core.models.gpt import gpt_layer_specs

    if state.runtime.transformer_impl == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")


class ValueHead(torch.nn.Module):
    """Scalar head standing in for GPTModel's ``output_layer`` in the critic.

    Same call signature as the output layer; returns ``(values [s, b, 1], None)``. Exposes
    ``weight`` directly because Megatron's checkpoint code looks up ``output_layer.weight``.
    Replicated on every TP rank, on a replicated input: with sequence parallelism its input
    arrives split along the sequence, so it first gathers the whole sequence, as Megatron's
    output layer does (``sequence_parallel``, also read by GPTModel's inference path), over
    ``tp_group``. Every TP rank then computes identical values and weight gradients, and the
    gradient of its input is split back (each rank's part of the sequence, not a sum over ranks).
    """

    def __init__(self, hidden_size: int, dtype: torch.dtype, *, init_std: float, seed: int,
                 tp_group: torch.distributed.ProcessGroup, sequence_parallel: bool = False) -> None:
        super().__init__()
        # A rank-independent generator: every TP rank must start from the same head, since
        # nothing synchronises replicated parameters across TP ranks.
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(1, hidden_size, generator=generator) * init_std
        self.weight = torch.nn.Parameter(weight.to(dtype))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=dtype))
        self.sequence_parallel = sequence_parallel
        self.tp_group = tp_group

    def forward(self, hidden_states: torch.Tensor, weight=None, runtime_gather_output=None):
        if self.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False,
                                                                 group=self.tp_group)
        return F.linear(hidden_states, self.weight, self.bias), None


def _outside_autocast(forward, device_type: str):
    """``forward`` (the output layer's) in fp32 under autocast: bf16 logits are rounded to 2^-8 of their
    size (0.03 at a logit of 10). On the tiny task's answers the mean |log-prob - fp32's| was 0.022
    with a bf16 output layer, 0.016 with this one (tests/distributed/test_precision.py)."""

    @functools.wraps(forward)
    def run(hidden_states: torch.Tensor, *args, **kwargs):
        with torch.autocast(device_type, enabled=False):
            return forward(hidden_states.float(), *args, **kwargs)

    return run


def _build_chunks(model: ModelConfig, state: ParallelState, *, critic: bool, seed: int = 0) -> list[torch.nn.Module]:
    from megatron.core.models.gpt.gpt_model import GPTModel

    chunks = []
    for vp_stage in range(state.virtual_pipeline):
        config = transformer_config(model, state)  # one per chunk: the optimizer setup writes to it
        pre, post = state.chunk_is_first(vp_stage), state.chunk_is_last(vp_stage)
        gpt = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec(state),
            vocab_size=model.vocab_size,
            max_sequence_length=model.max_position_embeddings,
            pre_process=pre,
            post_process=post,
            share_embeddings_and_output_weights=model.tie_word_embeddings and not critic,
            position_embedding_type="rope",
            rotary_base=int(model.rotary_base),
            vp_stage=vp_stage if state.virtual_pipeline > 1 else None,
            pg_collection=state.pg_collection,
        )
        if critic and post:
            gpt.output_layer = ValueHead(model.hidden_size, state.runtime.params_dtype,
                                         init_std=config.init_method_std, seed=seed, tp_group=state.tp_group,
                                         sequence_parallel=config.sequence_parallel)
        if post and state.runtime.autocast_dtype is not None:
            gpt.output_layer.forward = _outside_autocast(gpt.output_layer.forward, state.runtime.device.type)
        chunks.append(gpt.to(state.runtime.device))
    return chunks


def build_actor(model: ModelConfig, state: ParallelState) -> list[torch.nn.Module]:
    """Actor (policy) chunks for this rank: forward returns logits ``[b, s, vocab/tp]``."""
    return _build_chunks(model, state, critic=False)


def build_critic(model: ModelConfig, state: ParallelState, *, seed: int) -> list[torch.nn.Module]:
    """Critic chunks for this rank: forward returns values ``[b, s, 1]`` on the last stage.

    ``seed`` initialises the value head identically on every rank.
    """
    return _build_chunks(model, state, critic=True, seed=seed)
