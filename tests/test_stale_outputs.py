"""What a writer killed with SIGKILL leaves beside an output, and how the next writer repairs it
(output_dir.sweep_stale). The instant between the two renames of an --overwrite is too short for
a random kill to hit (tests/test_kill_soak_slow.py), so its state is built here: the folders a
real process (killed with SIGKILL, reaped) would have left, named as atomic_output_dir names them."""

from __future__ import annotations


from qalora_cli.output_dir import atomic_output_dir, check_writable
from helpers import dead_owner
from qalora_cli.process_owner import owner_tag


def mine() -> str:
    return owner_tag()


def make(folder, files: dict[str, bytes]):
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)


def test_an_output_taken_away_mid_replacement_is_put_back(tmp_path):
    out = tmp_path / "out"
    dead = dead_owner()
    make(tmp_path / f".out.old-{dead}", {"config.json": b"{}", "model.safetensors": b"old"})
    make(tmp_path / f".out.partial-{dead}-x1", {"model.safetensors": b"new, whole"})  # never renamed in
    check_writable(out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_stale_temporaries_go_and_a_live_writers_stay(tmp_path):
    out = tmp_path / "out"
    make(out, {"model.safetensors": b"current"})
    dead = dead_owner()
    make(tmp_path / f".out.old-{dead}", {"model.safetensors": b"replaced"})  # the new one did arrive
    make(tmp_path / f".out.trash-{dead}", {"half": b"deleted"})
    make(tmp_path / f".out.partial-{dead}-x2", {"half": b"built"})
    live = tmp_path / f".out.partial-{mine()}-x3"  # this process's own: another writer at work
    make(live, {})
    make(tmp_path / f".other.partial-{dead}-x4", {})  # another output's: not this writer's business
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "model.safetensors").write_bytes(b"newest")
    assert (out / "model.safetensors").read_bytes() == b"newest"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name, f".other.partial-{dead}-x4"])
