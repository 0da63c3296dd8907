"""`data_tools upload` to a moto S3 server (manifest.json last, resumable) and verify/inspect on URLs."""

import json
import re
import shutil

import pytest

from data_tools.__main__ import main
from data_tools.synth import synth
from data_tools.upload import download, upload
from data_tools.verify import verify
from tests.data.remote_servers import BUCKET, http_server, s3_server
from vla_scale.data.format import FormatError, Manifest
from vla_scale.data.locations import FetchOptions, Unreachable


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("upload") / "synth"
    synth(out, episodes=6, vl_samples=4, image_size=16, episodes_per_shard=2, vl_per_shard=2, progress=False)
    return out


def test_upload_sends_manifest_last_then_verify_and_inspect_read_the_url(data, tmp_path, capsys):
    with s3_server() as (_, faults):
        url = f"s3://{BUCKET}/datasets/robot"
        assert main(["upload", str(data / "robot"), url]) == 0
        assert "5 file(s)" in capsys.readouterr().out  # 3 shards, stats.json, manifest.json
        names = [p.rsplit("/", 1)[-1] for p in faults.puts if "/datasets/" in p]
        assert names[-1] == "manifest.json"
        assert sorted(names[:-1]) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "stats.json"]
        assert Manifest.load(url).num_samples == 6

        report = verify(url)
        assert report.ok and report.folder == url and sum(s.samples for s in report.shards) == 6
        assert main(["verify", url]) == 0
        assert f"{url} (robot): 3 shards, 6 samples" in capsys.readouterr().out
        assert main(["inspect", url, "--out", str(tmp_path / "png")]) == 0
        assert (tmp_path / "png" / "frames.png").is_file()
        assert main(["inspect", url]) == 2
        assert "pass --out" in capsys.readouterr().err

        faults.puts.clear()  # a second upload sends only what is missing or changed, and the manifest again
        sent, _ = upload(data / "robot", url)
        assert sent == 1 and [p.rsplit("/", 1)[-1] for p in faults.puts] == ["manifest.json"]
        assert Manifest.load(url).num_samples == 6


def test_upload_refuses_unfinished_datasets_and_read_only_locations(data, tmp_path):
    unfinished = tmp_path / "half"
    shutil.copytree(data / "vl", unfinished)
    (unfinished / "manifest.json").unlink()
    with pytest.raises(FormatError, match="manifest.json not found"):
        upload(unfinished, str(tmp_path / "copy"))
    with pytest.raises(ValueError, match="read-only"):
        upload(data / "vl", "http://127.0.0.1:1/vl")
    sent, size = upload(data / "vl", str(tmp_path / "copy"))  # a local folder works too, manifest last
    assert sent == 3 and size > 0  # 2 shards + manifest.json (VL has no stats.json)
    assert verify(tmp_path / "copy").ok


def test_verify_names_the_url_of_a_missing_shard(data, tmp_path):
    shutil.copytree(data, tmp_path / "served")
    (tmp_path / "served" / "robot" / "shard-000001.tar").unlink()
    with http_server(tmp_path / "served") as (base, _):
        report = verify(f"{base}/robot")
    assert not report.ok
    assert f"{base}/robot/shard-000001.tar does not exist" in str(report.problems[0])


@pytest.mark.parametrize("bad", ["../../evil.tar", "/tmp/evil.tar", "sub/../../evil.tar"])
def test_manifest_with_a_shard_path_outside_the_dataset_is_refused(data, tmp_path, bad):
    served = tmp_path / "served"
    shutil.copytree(data / "robot", served / "robot")
    manifest = json.loads((served / "robot" / "manifest.json").read_text())
    manifest["shards"][0]["path"] = bad
    (served / "robot" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match=re.escape(f"shard path {bad!r} is absolute or has a '..'")):
        Manifest.load(served / "robot")
    with http_server(served) as (base, faults):
        with pytest.raises(FormatError, match=re.escape(f"{base}/robot/manifest.json: shard path {bad!r}")):
            download(f"{base}/robot", tmp_path / "a" / "b" / "copy")
        assert faults.requests[bad.rsplit("/", 1)[-1]] == 0
    assert not (tmp_path / "evil.tar").exists() and not (tmp_path / "a" / "evil.tar").exists()


def test_download_raises_when_stats_json_is_unreachable_and_skips_it_only_when_absent(data, tmp_path):
    with http_server(data) as (base, faults):
        faults.errors["stats.json"] = 10  # still failing after the retries: not taken for "no stats.json"
        with pytest.raises(Unreachable, match=re.escape(f"cannot fetch {base}/robot/stats.json: still failing")):
            download(f"{base}/robot", tmp_path / "robot", options=FetchOptions(retries=1, backoff_s=0.01))
        faults.errors.clear()
        download(f"{base}/robot", tmp_path / "robot2")
        assert (tmp_path / "robot2" / "stats.json").is_file()
        download(f"{base}/vl", tmp_path / "vl")  # VL datasets have none: genuinely absent, skipped
        assert not (tmp_path / "vl" / "stats.json").exists() and verify(tmp_path / "vl").ok
