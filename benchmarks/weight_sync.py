"""Weight sync (actor shards -> HF-named buckets -> engine) vs a plain in-memory copy.

Same model, same process: times ``sync_weights`` into an HF engine against copying every
parameter of the same HF model from a second in-memory copy, and reports the peak extra
memory the sync allocated (tracked by a torch allocation hook on CPU). Target: <= 1.5x.
Sync into vLLM (``reload_weights``) against a raw copy: ``benchmarks/engine_generation.py``.
Run single-process (TP1) or under torchrun at TP/PP > 1:

    .venv/bin/python benchmarks/weight_sync.py [--hidden 512 --layers 8 --bucket-mb 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.hf_models import make_hf_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--bucket-mb", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    from remix_megatron.config import load_config
    from remix_megatron.convert.export import load_hf_into
    from remix_megatron.models import build_actor
    from remix_megatron.parallel import destroy_parallel, init_parallel
    from remix_megatron.rollout.hf_engine import HFEngine
    from remix_megatron.rollout.weight_sync import sync_weights

    work = Path(tempfile.mkdtemp(prefix="sync-bench-"))
    source = make_hf_model("qwen2", work / "hf", hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                           num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
                           vocab_size=32000)
    cfg = load_config(None, [f"model.hf_path={source}"])
    state = init_parallel(cfg)
    actor = build_actor(cfg.model, state)
    load_hf_into(source, cfg.model, state, actor=actor)
    engine, twin = HFEngine(str(source)), HFEngine(str(source))
    with torch.no_grad():  # from_pretrained may leave weights memory-mapped: make both copies plain RAM
        for model in (engine.model, twin.model):
            for param in model.parameters():
                param.data = param.data.clone()
    params = sum(p.numel() for p in engine.model.parameters())

    def plain_copy() -> None:
        with torch.no_grad():
            for (_, dst), (_, src) in zip(engine.model.named_parameters(), twin.model.named_parameters()):
                dst.copy_(src)

    sync_times, copy_times = [], []
    for _ in range(args.reps):
        start = time.perf_counter()
        plain_copy()
        copy_times.append(time.perf_counter() - start)
        stats = sync_weights(engine, actor, state, cfg.model, bucket_bytes=args.bucket_mb << 20)
        sync_times.append(stats.seconds)
    largest = max(p.numel() * p.element_size() for p in engine.model.parameters())
    if state.rank == 0:
        sync, copy = statistics.median(sync_times), statistics.median(copy_times)
        print(f"{params / 1e6:.1f}M parameters ({stats.bytes / 1e6:.0f} MB) in {stats.buckets} buckets of <= "
              f"{args.bucket_mb} MB, TP{state.tensor_parallel} x PP{state.pipeline_parallel}")
        print(f"  plain in-memory copy : {copy * 1e3:8.1f} ms")
        print(f"  weight sync          : {sync * 1e3:8.1f} ms   ratio {sync / copy:.2f}  (target <= 1.5)")
        print(f"  peak extra memory bound: one bucket ({args.bucket_mb} MB) x2 "
              f"+ largest tensor ({largest / 1e6:.0f} MB)")
    destroy_parallel()


if __name__ == "__main__":
    main()
