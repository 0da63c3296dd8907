"""What a resumed run finds under <run_dir>/eval: logged, unlogged, interrupted and stale evaluations.

No training here: the run directory is laid out by hand as a job that died would leave it, and the
hook (rank 0 of a resumed run at step 6) is asked what it will log and what it will evaluate again.
"""

import json
from types import SimpleNamespace

import pytest

from tests.train.jobs import CONFIG
from vla_scale.config import load_config
from vla_scale.config.schema import WandbConfig
from vla_scale.train.eval_hook import EvalHook, eval_dir, eval_setup, eval_values
from vla_scale.train.metrics import MetricsWriter, read_metrics


def results(rates: dict[str, float]) -> dict:
    tasks = {t: {"success": {"rate": r}} for t, r in rates.items()}
    return {"tasks": tasks, "overall": {"success": {"rate": sum(rates.values()) / len(rates)}}}


def test_resume_logs_unlogged_results_redoes_interrupted_and_drops_stale(tmp_path):
    cfg = load_config(CONFIG, ["eval.suite=instruct", "eval.every_steps=2", "wandb.mode=disabled"])
    run_dir = tmp_path / "run"
    (run_dir / "eval").mkdir(parents=True)
    lines = [{"step": 1, "loss": 1.0}, {"step": 3, "loss": 1.0, **eval_values(results({"a": 1.0}), 2)}]
    lines.append({"step": 7, "loss": 1.0, **eval_values(results({"a": 0.0}), 4)})  # after the checkpoint: dropped
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    for step in (2, 4):  # evaluated; 4 was logged only after the checkpoint the run resumes from
        eval_dir(run_dir, step).mkdir()
        (eval_dir(run_dir, step) / "results.json").write_text(json.dumps(results({"a": 0.5, "b": 1.0})))
    (eval_dir(run_dir, 6) / "checkpoints" / "step_00000006").mkdir(parents=True)  # interrupted
    (eval_dir(run_dir, 8) / "checkpoints" / "step_00000008").mkdir(parents=True)  # past the resumed step
    (run_dir / "eval" / ".step_00000010.tmp").mkdir()  # a snapshot cut short

    writer = MetricsWriter(run_dir, "run", WandbConfig(mode="disabled"), {}, start_step=6)
    hook = EvalHook(SimpleNamespace(run_dir=run_dir, cfg=cfg, rank=0, step=6), writer)
    assert hook.ready == [4] and hook.pending == [6]
    assert sorted(p.name for p in (run_dir / "eval").iterdir()) == ["step_00000002", "step_00000004", "step_00000006"]
    assert [r.get("eval/step") for r in read_metrics(run_dir)] == [None, 2]

    other = EvalHook(SimpleNamespace(run_dir=run_dir, cfg=cfg, rank=1, step=6), writer)
    assert other.poll(7) == {} and other.ready == [] and other.pending == []  # only rank 0 evaluates


def test_eval_values():
    values = eval_values(results({"touch_red": 0.0, "touch_blue": 1.0}), 4)
    expected = {"eval/success/touch_red": 0.0, "eval/success/touch_blue": 1.0, "eval/success": 0.5, "eval/step": 4}
    assert values == expected
    chunked = results({"touch_red": 1.0})
    chunked["overall"].update(switch_jump=0.5, step_jump=0.25, chunk_switches=7)  # no departure: not logged
    values = eval_values(chunked, 6)
    assert values["eval/switch_jump"] == 0.5 and values["eval/step_jump"] == 0.25
    assert "eval/switch_departure" not in values and "eval/chunk_switches" not in values


@pytest.mark.parametrize(("delay", "overlap", "rtc"), [(0, 0, False), (2, 0, False), (2, 4, True)])
def test_eval_section_reaches_the_runner_and_the_policy_agent(tmp_path, delay, overlap, rtc):
    settings = [f"eval.delay={delay}", f"eval.overlap={overlap}", f"eval.rtc={str(rtc).lower()}"]
    cfg = load_config(CONFIG, ["eval.suite=instruct", "eval.every_steps=2", "eval.episodes=3", *settings])
    ecfg, factory = eval_setup(cfg.eval, tmp_path / "policy", tmp_path, 32)
    assert (ecfg.episodes, ecfg.image_size, ecfg.out_dir) == (3, 32, str(tmp_path))
    assert (ecfg.delay, ecfg.overlap, ecfg.rtc) == (delay or None, overlap or None, rtc)
    kwargs = factory.keywords
    assert (kwargs["delay"], kwargs["overlap"], kwargs["rtc"]) == (delay or None, overlap or None, rtc)
    assert kwargs["path"] == str(tmp_path / "policy") and kwargs["kind"] == "policy"
