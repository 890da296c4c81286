"""The five math benchmarks of the paper's table and how each is scored.

A benchmark spec on the command line or in ``data.eval_benchmarks`` is one of
- a known name (``aime24``, ``amc23``, ``math500``, ``minerva``, ``olympiadbench``), read as
  ``<name>.jsonl`` from the benchmark directory, scored by the paper's protocol: avg@32 at
  temperature 0.1 for AIME and AMC, greedy pass@1 for the others;
- ``name=PATH`` or a bare ``PATH`` (.jsonl / .parquet / HF datasets directory), scored by
  greedy pass@1 unless the protocol is overridden.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from remix_megatron.config import DataConfig

PAPER_BENCHMARKS = ("aime24", "amc23", "math500", "minerva", "olympiadbench")


@dataclass(frozen=True)
class Protocol:
    samples: int = 1  # responses per problem (k)
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"samples={self.samples} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.samples > 1 and self.temperature == 0:
            raise ValueError(f"{self.samples} greedy samples would all be the same response: set a temperature > 0 "
                             "or samples = 1")

    @property
    def metric(self) -> str:
        return "pass@1" if self.samples == 1 and self.temperature == 0 else f"avg@{self.samples}"


#: the paper's protocol (REMIX.md section 5)
PAPER_PROTOCOLS = {"aime24": Protocol(samples=32, temperature=0.1), "amc23": Protocol(samples=32, temperature=0.1)}


@dataclass(frozen=True)
class Benchmark:
    name: str
    path: str
    protocol: Protocol


def resolve_benchmarks(specs: str | list[str], data_dir: str | Path, *, samples: int = 0,
                       temperature: float | None = None) -> list[Benchmark]:
    """Benchmarks from comma-separated specs; ``samples``/``temperature`` override every protocol."""
    if isinstance(specs, str):
        specs = [s for s in (part.strip() for part in specs.split(",")) if s]
    if not specs:
        raise ValueError("no benchmarks given (e.g. aime24,amc23,math500,minerva,olympiadbench or name=PATH)")
    out, seen = [], set()
    for spec in specs:
        if "=" in spec:
            name, path = (part.strip() for part in spec.split("=", 1))
        elif spec in PAPER_BENCHMARKS:
            name, path = spec, str(Path(data_dir) / f"{spec}.jsonl")
        elif Path(spec).suffix in (".jsonl", ".parquet") or Path(spec).is_dir():
            name, path = Path(spec).stem, spec
        else:
            raise ValueError(f"unknown benchmark {spec!r}: use one of {', '.join(PAPER_BENCHMARKS)}, a .jsonl/.parquet "
                             "path, or name=PATH")
        if not Path(path).exists():
            raise ValueError(f"benchmark {name}: {path} does not exist"
                             + (" (set the benchmark directory, e.g. --data-dir ../shared/data)"
                                if "=" not in spec else ""))
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name):  # it names the output directory
            raise ValueError(f"benchmark name {name!r} in {spec!r}: use letters, digits and _ . + - only (it becomes "
                             "a directory name), e.g. mybench=PATH")
        if name in seen:
            raise ValueError(f"benchmark {name} given twice")
        seen.add(name)
        protocol = PAPER_PROTOCOLS.get(name, Protocol())
        if samples or temperature is not None:
            k = samples or protocol.samples
            t = protocol.temperature if temperature is None else temperature
            protocol = replace(protocol, samples=k, temperature=t)
        out.append(Benchmark(name=name, path=str(path), protocol=protocol))
    return out


def config_benchmarks(data: DataConfig) -> list[Benchmark]:
    """The held-out set (greedy, ``data.eval_size`` problems) and ``data.eval_benchmarks``, if any."""
    out = []
    if data.eval_path:
        out += resolve_benchmarks([f"heldout={data.eval_path}"], data.benchmark_dir)
    if data.eval_benchmarks:
        samples = data.eval_samples
        out += resolve_benchmarks(data.eval_benchmarks, data.benchmark_dir, samples=samples,
                                  temperature=(data.eval_temperature if samples > 1 else 0.0) if samples else None)
    return out
