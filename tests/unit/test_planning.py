"""Dry-run planning: rank grids as Megatron builds them, parameter counts against published model
sizes, memory arithmetic by hand, and every shipped config fitting its stated hardware."""

from __future__ import annotations

import pytest

from remix_megatron.algorithms import rollout_cost
from remix_megatron.cli import main
from remix_megatron.config import ConfigError, load_config
from remix_megatron.planning import (
    Layout,
    chunks_in_flight,
    kv_bytes_per_token,
    layer_activation_bytes,
    plan_layout,
    plan_memory,
    stage_parameters,
    total_parameters,
)
from tests.conftest import REPO

pytestmark = pytest.mark.unit

CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml") if p.name != "reference.yaml")


def test_rank_grid_by_hand():
    layout = Layout(tensor_parallel=2, pipeline_parallel=2, data_parallel=2, virtual_pipeline=1, num_layers=4)
    assert layout.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.groups("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.groups("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.coordinates(5) == (1, 1, 0) and layout.coordinates(6) == (0, 1, 1)  # (tp, pp, dp)


@pytest.mark.parametrize("tp,pp,dp", [(2, 2, 2), (8, 4, 1), (4, 1, 2), (1, 2, 4), (2, 4, 3)])
def test_rank_grid_matches_megatron_rank_generator(tp, pp, dp):
    from megatron.core.parallel_state import RankGenerator

    layout = Layout(tensor_parallel=tp, pipeline_parallel=pp, data_parallel=dp, virtual_pipeline=1, num_layers=8)
    generator = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    for kind in ("tp", "pp", "dp"):
        assert sorted(layout.groups(kind)) == sorted(generator.get_ranks(kind)), kind


def test_stage_layers_interleave_virtual_chunks():
    layout = Layout(tensor_parallel=1, pipeline_parallel=2, data_parallel=1, virtual_pipeline=2, num_layers=8)
    assert layout.stage_layers(0) == [[0, 1], [4, 5]] and layout.stage_layers(1) == [[2, 3], [6, 7]]
    assert Layout(1, 4, 1, 1, 80).stage_layers(3) == [list(range(60, 80))]


# Published sizes: model.safetensors.index.json total_size / 2 bytes (bf16), and the qwen2-tiny by hand
@pytest.mark.parametrize("preset,expected", [
    ("llama3-8b", 16_060_522_496 // 2), ("r1-distill-llama-70b", 141_107_412_992 // 2),
    ("r1-distill-qwen-7b", 15_231_233_024 // 2),
    # 4 layers x (2*128 norms + 256*128 + 256 qkv + 128*128 proj + 3*352*128 mlp) + 2 * 1024*128 + 128
    ("qwen2-tiny", 4 * (256 + 32768 + 256 + 16384 + 135168) + 2 * 131072 + 128),
])
def test_total_parameters_match_published_sizes(preset, expected):
    assert total_parameters(load_config(None, [f"model.preset={preset}"]).model) == expected


def test_stage_parameters_split_over_tp_and_pp():
    model = load_config(None, ["model.preset=qwen2-tiny"]).model
    layout = Layout(tensor_parallel=2, pipeline_parallel=2, data_parallel=1, virtual_pipeline=1, num_layers=4)
    layer = 256 + 32768 // 2 + 256 // 2 + 16384 // 2 + 135168 // 2  # norms replicated, linears halved
    assert stage_parameters(model, layout, 0, critic=False) == 2 * layer + 1024 // 2 * 128
    assert stage_parameters(model, layout, 1, critic=False) == 2 * layer + 128 + 1024 // 2 * 128
    assert stage_parameters(model, layout, 1, critic=True) == 2 * layer + 128 + 128 + 1  # value head


def test_activation_kv_and_in_flight_arithmetic():
    model = load_config(None, ["model.preset=r1-distill-qwen-7b"]).model  # h 3584, 28 heads, 4 KV groups
    s, b = 1024, 2
    assert layer_activation_bytes(model, seq_length=s, micro_batch_size=b, tp=4, sequence_parallel=False,
                                  stores_attention_scores=False, dtype_bytes=2) == s * b * 3584 * (10 + 6)
    assert layer_activation_bytes(model, seq_length=s, micro_batch_size=b, tp=4, sequence_parallel=True,
                                  stores_attention_scores=True, dtype_bytes=4) == 2 * (
        34 * s * b * 3584 / 4 + 5 * 28 * s * s * b / 4)
    assert kv_bytes_per_token(model, tp=4, dtype_bytes=2) == 2 * 28 * 1 * 128 * 2
    assert kv_bytes_per_token(model, tp=8, dtype_bytes=2) == 2 * 28 * 1 * 128 * 2  # 4 KV heads: at least one per rank
    layout = Layout(1, 4, 1, 1, 8)
    assert [chunks_in_flight(p, layout, 100) for p in range(4)] == [4, 3, 2, 1]
    assert chunks_in_flight(0, layout, 2) == 2
    interleaved = Layout(1, 2, 1, 2, 8)  # warm-up (2-0-1)*2 + (2-1)*2 = 4 chunk micro-batches, + 1
    assert chunks_in_flight(0, interleaved, 100) == 5 and chunks_in_flight(1, interleaved, 100) == 3


def test_paper_1p5b_plan_by_hand():
    cfg = load_config(REPO / "configs" / "paper_1.5b_remix_ppo.yaml")
    plan = plan_memory(cfg)
    params = 1_777_088_000
    rows = plan.stages[0].rows
    assert plan.layout.data_parallel == 2 and plan.params_dtype == "bf16"
    assert rows["actor weights"] == 2 * params and rows["actor grads (fp32)"] == 4 * params
    assert rows["actor Adam states"] == 12 * params // 2  # fp32 master + 2 moments, sharded over DP2
    assert rows["reference + precedent weights"] == 2 * 2 * params
    kv = 2 * 28 * 2 * 128 * 2  # layers x KV heads x head_dim, K and V, bf16
    assert plan.engine.kv_bytes_per_token == kv and plan.engine.sequences == 128
    assert plan.engine.reserved_bytes == int(0.35 * 80 * 2**30)
    assert plan.engine.concurrent_sequences == (int(0.35 * 80 * 2**30) - 2 * params) // (8958 * kv)


def test_paper_configs_reproduce_the_papers_rollout_counts():
    """0.079M rollouts in 350 steps (1.5B) and 0.011M in 75 (7B): 100*152 + 250*256 and 75*152."""
    for name, steps, expected in (("paper_1.5b_remix_ppo", 350, 79_200), ("paper_7b_remix_ppo", 75, 11_400)):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        assert cfg.trainer.num_steps == steps
        assert rollout_cost(steps, cfg.algorithm, prompts_per_step=256, responses_per_prompt=1) == expected
        assert (cfg.actor_optimizer.lr, cfg.critic_optimizer.lr, cfg.rollout.max_prompt_tokens,
                cfg.rollout.max_new_tokens) == (1e-6, 1e-5, 766, 8192)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_fits_its_stated_hardware(path, capsys):
    assert main(["dryrun", str(path)]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "fits: peak" in out or "not checked" in out


def test_too_big_fails_with_a_table(capsys):
    assert main(["dryrun", "--gpu-memory-gib", "80", str(REPO / "configs" / "scale_32b_remix_ppo.yaml")]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "actor Adam states" in out and "stage 1" in out


def test_layout_errors_exit_2(capsys):
    assert main(["dryrun", "--world-size", "12", str(REPO / "configs" / "scale_32b_remix_ppo.yaml")]) == 2
    assert "not divisible by tensor_parallel*pipeline_parallel=16" in capsys.readouterr().err
    cfg = load_config(REPO / "configs" / "tiny_remix_ppo.yaml", ["rollout.prompts_per_step=16",
                                                                  "trainer.micro_batch_size=1",
                                                                  "algorithm.fresh_multiple_of=8"])
    with pytest.raises(ConfigError, match="8 fresh prompts per step cannot give each of the 16"):
        plan_layout(cfg, 16)  # floor(0.6 * 16 / 8) * 8 = 8 fresh prompts for 16 DP ranks
    with pytest.raises(ConfigError, match="leaves no fresh prompt"):
        plan_layout(load_config(REPO / "configs" / "tiny_remix_ppo.yaml", ["rollout.prompts_per_step=8",
                                                                           "algorithm.fresh_multiple_of=8"]), 1)


def test_token_budget_plans_the_budget_not_seq_length_times_micro_batch(capsys):
    """A budget of k full-length rows plans the activations of micro_batch_size k (every term is
    per token or, for the attention scores, largest at full width); the paper configs budget one
    full-length row, so their plans equal micro_batch_size 1's, and the dry run says so."""
    path = REPO / "configs" / "paper_7b_remix_ppo.yaml"
    base = load_config(path, ["trainer.max_tokens_per_micro_batch=0"])
    assert load_config(path).trainer.max_tokens_per_micro_batch == base.trainer.seq_length
    activations = lambda cfg: [s.rows["training activations (engine asleep)"] for s in plan_memory(cfg).stages]  # noqa: E731
    assert activations(load_config(path)) == activations(base)
    budget = load_config(path, [f"trainer.max_tokens_per_micro_batch={3 * base.trainer.seq_length}",
                                "trainer.micro_batch_size=1"])
    three = load_config(path, ["trainer.max_tokens_per_micro_batch=0", "trainer.micro_batch_size=3",
                               "trainer.global_batch_size=264"])  # a multiple of 3 x DP
    assert activations(budget) == activations(three) and activations(three) != activations(base)
    # a budget of 1.5 rows: the per-token terms are 1.5 x one row's (TE spec: no attention scores)
    half = load_config(path, [f"trainer.max_tokens_per_micro_batch={3 * base.trainer.seq_length // 2}"])
    plan = plan_memory(half)
    assert plan.num_microbatches == -(-plan.engine.sequences * 2 // 3)
    assert activations(half) == pytest.approx([1.5 * a for a in activations(base)], rel=1e-6)
    assert main(["dryrun", str(path)]) == 0
    assert "micro-batches per step per DP rank at full width" in capsys.readouterr().out


def test_cpu_bf16_plans_fp32_weights():
    """precision=bf16 on CPU autocasts over fp32 weights and optimizer: the plan counts 4 bytes a weight."""
    plans = {precision: plan_memory(load_config(REPO / "configs" / "tiny_remix_ppo.yaml",
                                                [f"parallel.precision={precision}"]))
             for precision in ("fp32", "bf16")}
    assert plans["bf16"].params_dtype == "fp32" and not plans["bf16"].gpu
    assert plans["bf16"].stages[0].rows == plans["fp32"].stages[0].rows
