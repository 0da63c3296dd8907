"""`vla-scale plot`: one PNG per loss/metric term of a metrics.jsonl, without pyplot."""

import json

import pytest
from PIL import Image

from vla_scale.cli import main as cli_main
from vla_scale.train.plot import plot_run, plot_terms

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_metrics(run_dir, records) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_one_png_per_term(tmp_path):
    run_dir = tmp_path / "run"
    records = []
    for step in range(1, 6):
        rec = {"step": step, "loss": 1.0 / step, "loss_arm": 0.5 / step, "acc_gripper": 0.1 * step, "lr": 1e-3}
        rec.update(grad_norm=2.0 - 0.1 * step, samples_per_s=10.0 + step, tokens_per_s=400.0, data_wait_frac=0.1)
        rec.update({"mix/synth": 0.75, "peak_mem_gb": 1.2})
        if step % 2 == 0:
            rec["loss_vl"] = 3.0 / step  # logged only on some steps
        records.append(rec)
    write_metrics(run_dir, records)
    expected = ["acc_gripper", "grad_norm", "loss", "loss_arm", "loss_vl", "lr", "samples_per_s", "tokens_per_s"]
    assert plot_terms(records) == expected
    files = plot_run(run_dir)
    assert sorted(p.name for p in files) == sorted(f"{t}.png" for t in expected)
    assert {p.parent for p in files} == {run_dir / "plots"}
    for path in files:
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, path
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert img.size == (600, 350)


def test_cli_out_folder_and_empty_metrics(tmp_path, capsys):
    run_dir = tmp_path / "run"
    write_metrics(run_dir, [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}])
    assert cli_main(["plot", str(run_dir), "--out", str(tmp_path / "png")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "png" / "loss.png")
    assert (tmp_path / "png" / "loss.png").stat().st_size > 0
    write_metrics(tmp_path / "empty", [{"step": 1, "data_wait_frac": 0.2}])
    with pytest.raises(ValueError, match="nothing|no loss"):
        plot_run(tmp_path / "empty")
