"""`data_tools verify` passes a fresh dataset and names every kind of corruption."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_tools.__main__ import main
from data_tools.synth import synth
from data_tools.verify import verify
from vla_scale.data.format import encode_npy

SMALL = {"episodes": 6, "vl_samples": 4, "image_size": 32, "episodes_per_shard": 3, "vl_per_shard": 2}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("verify_src")
    synth(out, progress=False, **SMALL)
    return out


@pytest.fixture
def robot(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy per test, so each one corrupts its own dataset."""
    return Path(shutil.copytree(pristine / "robot", tmp_path / "robot"))


def rewrite_member(shard: Path, name: str, change) -> None:
    """Rewrite one tar member's bytes in place (order and other members kept)."""
    members = []
    with tarfile.open(shard) as tar:
        for info in tar.getmembers():
            members.append((info, tar.extractfile(info).read()))
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            if info.name == name:
                data = change(data)
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def problems(folder: Path) -> list[str]:
    report = verify(folder)
    return [str(p) for p in report.problems]


def test_fresh_datasets_pass(pristine: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["verify", str(pristine / "robot")]) == 0
    out = capsys.readouterr().out
    assert "2 shards, 6 samples" in out and "OK" in out
    assert main(["verify", str(pristine / "vl"), "--workers", "2"]) == 0
    assert "2 shards, 4 samples" in capsys.readouterr().out


def test_truncated_shard(robot: Path, capsys: pytest.CaptureFixture) -> None:
    shard = robot / "shard-000001.tar"
    with tarfile.open(shard) as tar:  # cut inside the contents of the member in the middle of the shard
        members = tar.getmembers()
        middle = members[len(members) // 2]
    shard.write_bytes(shard.read_bytes()[: middle.offset_data + max(middle.size // 2, 1)])
    assert main(["verify", str(robot)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out
    assert "shard-000001.tar  -  tar read error" in out and "truncated" in out
    assert "shard-000000.tar" not in out


def test_garbage_image(robot: Path) -> None:
    rewrite_member(robot / "shard-000000.tar", "ep000001.rgb_static.0002.png", lambda _: b"garbage")
    (found,) = problems(robot)
    assert found.startswith("shard-000000.tar  ep000001")
    assert "rgb_static.0002.png" in found and "undecodable image" in found


def test_manifest_count_off_by_one(robot: Path) -> None:
    manifest = json.loads((robot / "manifest.json").read_text())
    manifest["shards"][1]["samples"] += 1
    (robot / "manifest.json").write_text(json.dumps(manifest))
    (found,) = problems(robot)
    assert found.startswith("shard-000001.tar  -") and "holds 3 samples but manifest.json says 4" in found


def test_stray_shard(robot: Path) -> None:
    shutil.copy(robot / "shard-000000.tar", robot / "shard-000007.tar")
    (found,) = problems(robot)
    assert found.startswith("shard-000007.tar  -") and "not listed in manifest.json" in found


def test_nan_action(robot: Path) -> None:
    def poison(data: bytes) -> bytes:
        action = np.load(io.BytesIO(data))
        action[1, 0] = np.nan
        return encode_npy(action)

    rewrite_member(robot / "shard-000001.tar", "ep000004.action.npy", poison)
    (found,) = problems(robot)
    assert found.startswith("shard-000001.tar  ep000004") and "NaN" in found


def test_missing_stats(robot: Path) -> None:
    (robot / "stats.json").unlink()
    (found,) = problems(robot)
    assert found.startswith("stats.json") and "data_tools stats" in found


def test_wrong_stats_dims_and_duplicate_key(robot: Path) -> None:
    stats = json.loads((robot / "stats.json").read_text())
    stats["action"]["mean"] = stats["action"]["mean"][:3]
    (robot / "stats.json").write_text(json.dumps(stats))
    manifest = json.loads((robot / "manifest.json").read_text())
    shutil.copy(robot / "shard-000000.tar", robot / "shard-000002.tar")
    manifest["shards"].append(dict(manifest["shards"][0], path="shard-000002.tar"))
    (robot / "manifest.json").write_text(json.dumps(manifest))
    found = problems(robot)
    assert sum("duplicate sample key" in p for p in found) == 3
    assert any("action.mean has shape [3], not [4]" in p for p in found)


def test_wrong_schema_version(robot: Path) -> None:
    manifest = json.loads((robot / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (robot / "manifest.json").write_text(json.dumps(manifest))
    (found,) = problems(robot)
    assert found.startswith("manifest.json") and "schema_version 99" in found
