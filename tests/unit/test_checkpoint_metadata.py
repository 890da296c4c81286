"""A dist checkpoint's ``.metadata`` is a pickle: opened through the restricted unpickler, a
hostile one is refused before it can run code, and real metadata (from torch's own writer)
still loads."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from remix_megatron.checkpoint import CHECKPOINT_VERSION, CheckpointError, check_dist_metadata, load_checkpoint

pytestmark = pytest.mark.unit


class Payload:
    """Unpickling this writes ``marker``: what a checkpoint from an untrusted source could do."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def real_checkpoint(directory):
    """torch.distributed.checkpoint's own writer (no process group): tensors and a bytes item."""
    import torch.distributed.checkpoint as dcp

    state = {"weight": torch.arange(12, dtype=torch.bfloat16).reshape(3, 4), "step": torch.tensor(7),
             "extra": {"note": "bytes item"}}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(directory)), no_dist=True)
    return directory


def test_real_metadata_passes_and_reads_the_same(tmp_path):
    directory = real_checkpoint(tmp_path / "dist")
    check_dist_metadata(directory)
    import torch.distributed.checkpoint as dcp

    expected = dcp.FileSystemReader(str(directory)).read_metadata()
    from remix_megatron.checkpoint import _MetadataUnpickler

    with open(directory / ".metadata", "rb") as handle:
        ours = _MetadataUnpickler(handle).load()
    assert ours.state_dict_metadata == expected.state_dict_metadata
    assert ours.state_dict_metadata["weight"].properties.dtype == torch.bfloat16


@pytest.mark.parametrize("embedded", [False, True], ids=["bare", "inside-real-metadata"])
def test_hostile_metadata_runs_code_in_torch_and_is_refused_here(tmp_path, embedded):
    directory = real_checkpoint(tmp_path / "dist")
    marker = tmp_path / "ran"
    if embedded:  # a genuine Metadata object carrying the payload in one of its fields
        with open(directory / ".metadata", "rb") as handle:
            metadata = pickle.load(handle)
        metadata.planner_data = Payload(marker)
        hostile = metadata
    else:
        hostile = Payload(marker)
    (directory / ".metadata").write_bytes(pickle.dumps(hostile))
    import torch.distributed.checkpoint as dcp

    try:  # what megatron's load does with it: torch's FileSystemReader unpickles it as is
        dcp.FileSystemReader(str(directory)).read_metadata()
    except Exception:  # the bare payload is no Metadata; it ran all the same
        pass
    assert marker.read_text() == "ran"
    marker.unlink()
    with pytest.raises(CheckpointError, match=r"\.metadata: unsafe or corrupted checkpoint metadata.*builtins\.exec"):
        check_dist_metadata(directory)
    assert not marker.exists()


def test_load_checkpoint_refuses_before_megatron_reads(tmp_path):
    """Resume, ``convert to-hf`` and ``evaluate --checkpoint`` all load through load_checkpoint."""
    root = tmp_path / "checkpoints"
    checkpoint = root / "iter_0000003"
    (checkpoint / "dist").mkdir(parents=True)
    marker = tmp_path / "ran"
    (checkpoint / "dist" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    (checkpoint / "trainer_state.json").write_text(json.dumps(
        {"version": CHECKPOINT_VERSION, "iteration": 3, "layout": {}, "models": ["actor"], "trainer_state": {}}))
    (root / "latest").write_text("iter_0000003")
    with pytest.raises(CheckpointError, match="unsafe or corrupted"):
        load_checkpoint(root, {}, state=None)
    assert not marker.exists()


def test_missing_metadata_is_an_incomplete_checkpoint(tmp_path):
    (tmp_path / "dist").mkdir()
    with pytest.raises(CheckpointError, match="no .metadata"):
        check_dist_metadata(tmp_path / "dist")
