"""Names and links from files or command lines never reach outside their roots: benchmark
names (output directories), sweep grid values (run directories), the HF index's weight_map
and tokenizer files an export copies."""

from __future__ import annotations

import json

import pytest

from remix_megatron.config import ConfigError
from remix_megatron.convert.export import _confined_file
from remix_megatron.convert.hf import ConversionError, HFWeights
from remix_megatron.evaluation import resolve_benchmarks
from remix_megatron.sweep import SweepSpec, expand

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".hidden", ""])
def test_benchmark_names_are_one_directory_component(tmp_path, name):
    data = tmp_path / "mine.jsonl"
    data.write_text('{"problem": "1+1", "answer": "2"}\n')
    with pytest.raises(ValueError, match="use letters, digits and _ . \\+ - only"):
        resolve_benchmarks([f"{name}={data}"], tmp_path)
    assert [b.name for b in resolve_benchmarks([f"my.bench-2={data}"], tmp_path)] == ["my.bench-2"]


def test_sweep_values_stay_inside_the_sweep_directory(tmp_path):
    spec = SweepSpec(name="s", config="configs/tiny_cpu.yaml", out_dir=str(tmp_path / "sweep"),
                     grid={"trainer.wandb_project": ["../../escape", "a b/c"], "trainer.seed": [1]})
    points = expand(spec)
    assert [p.name for p in points] == ["wandb_project-.._.._escape_seed-1", "wandb_project-a_b_c_seed-1"]
    assert all(p.run_dir.parent == tmp_path / "sweep" for p in points)
    assert points[0].config.trainer.wandb_project == "../../escape"  # the value itself is unchanged
    with pytest.raises(ConfigError, match="share the run directory"):
        expand(SweepSpec(name="s", config="configs/tiny_cpu.yaml", out_dir=str(tmp_path / "sweep"),
                         grid={"trainer.wandb_project": ["a/b", "a b"]}))
    with pytest.raises(ConfigError, match="sweep name '../up': use letters"):
        SweepSpec(name="../up", config="configs/tiny_cpu.yaml", grid={"trainer.seed": [1]})


def test_hf_index_files_must_be_names_in_the_directory(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "../../outside.safetensors"}}))
    with pytest.raises(ConversionError, match="weight_map sends 'model.embed_tokens.weight' to "
                                              "'../../outside.safetensors', which is not a file name"):
        HFWeights(tmp_path)


def test_exported_tokenizer_files_must_not_link_outside(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not a tokenizer")
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer.json").symlink_to(secret)
    with pytest.raises(ConversionError, match="tokenizer.json links to .*secret.txt, outside"):
        _confined_file(model, "tokenizer.json")
    (model / "vocab.json").write_text("{}")
    (model / "merges.txt").symlink_to(model / "vocab.json")  # a link inside the directory is fine
    assert _confined_file(model, "merges.txt") == (model / "vocab.json").resolve()
    assert _confined_file(model, "special_tokens_map.json") is None
    # the HF hub cache: snapshots/<rev>/file -> ../../blobs/<hash>
    repo = tmp_path / "models--org--m"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc123").write_text("{}")
    snapshot = repo / "snapshots" / "rev1"
    snapshot.mkdir(parents=True)
    (snapshot / "tokenizer.json").symlink_to("../../blobs/abc123")
    assert _confined_file(snapshot, "tokenizer.json") == (repo / "blobs" / "abc123").resolve()
