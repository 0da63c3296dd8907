"""Every action head on two backbone families under ZeRO-2 on 2 ranks, flow, parallel and FAST under ZeRO-3 with LoRA
and staged unfreezing, and each head's export loaded as a `Policy` in a fresh process (issue 13, Tests).

One 2-rank job trains all runs in turn (tests/train/heads_rank.py says why and how); this file prepares the run
directories with `prepare_run`, as `vla-scale train` does, and checks what the ranks recorded.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from data_tools.__main__ import main as data_tools
from tests.train.jobs import PG_TIMEOUT_S, ROOT, rank_logs, run_module_ranks
from tests.train.policy_check import first_episode
from vla_scale.train.prepare import prepare_run

pytestmark = pytest.mark.integration

FLOW_SMALL = ("model.flow.width=32", "model.flow.layers=1", "model.flow.heads=2", "model.flow.num_steps=3")
# head -> (config, overrides): the debug configs that ship each head.
HEADS: dict[str, tuple[str, tuple[str, ...]]] = {
    "mlp": ("debug.yaml", ()),
    "lstm": ("debug_history.yaml", ("model.head.type=lstm",)),
    "gpt": ("debug_history.yaml", ()),
    "discrete": ("debug.yaml", ("model.action_space=discrete", "model.discrete.n_bin=32")),
    "parallel": ("debug_parallel.yaml", ()),
    "flow": ("debug_flow.yaml", FLOW_SMALL),
    "fast": ("debug.yaml", ("model.action_space=discrete", "model.discrete.tokenizer=fast")),  # + fitted file
}
# Two families per head, every family used; parallel never on kosmos2 (refused: no custom attention mask). The
# first family of each head is the one exported.
FAMILIES = {
    "mlp": ("llava", "qwen2_5_vl"),
    "lstm": ("paligemma", "smolvlm"),
    "gpt": ("kosmos2", "qwen2_vl"),
    "discrete": ("idefics3", "paligemma2"),
    "parallel": ("qwen2_vl", "smolvlm"),
    "flow": ("kosmos2", "llava"),
    "fast": ("llava", "paligemma"),
}
# ZeRO-3 + LoRA runs: heads and LoRA for step 1, then the head's own group and the last decoder layer. FAST has no
# head of its own (its tokens come out of the LM head), so its second stage trains the LM head.
STAGES = {
    head: f"[{{start_step: 0, trainable: [heads, lora]}}, {{start_step: 1, trainable: [{group}, decoder_last_1]}}]"
    for head, group in (("flow", "action_expert"), ("parallel", "action_head"), ("fast", "lm_head"))
}
ZERO3_FAMILY = {"flow": "llava", "parallel": "paligemma", "fast": "qwen2_vl"}
# Knowledge insulation off for the ZeRO-3 flow run: the last decoder layer then learns from every batch, not only VL.
ZERO3_EXTRA = {"flow": ("model.flow.stop_gradient_to_vlm=false",), "parallel": (), "fast": ()}
# A parameter name part that only the second stage's own group holds.
STAGE1_GROUP = {"flow": "action_expert.", "parallel": "action_head.", "fast": "lm_head."}
SMALL_RUN = (
    "train.micro_batch_size=1",
    "train.global_batch_size=2",
    "train.ckpt_every=0",
    "train.log_every=1",
    "data.num_workers=0",
    "wandb.mode=disabled",
    f"train.process_group_timeout_s={PG_TIMEOUT_S}",
)


def fast_file(tmp_path: Path) -> Path:
    """Where the FAST head's tokenizer is fitted (`data_tools fit-fast`); moved away before the export check."""
    return tmp_path / "fitted" / "fast_tokenizer.json"


def _prepare(tmp_path: Path, data: Path, head: str, family: str, name: str, *extra: str) -> Path:
    config, overrides = HEADS[head]
    return prepare_run(
        ROOT / "configs" / config,
        [
            f"run.name={name}",
            f"run.output_dir={tmp_path / 'runs'}",
            f"data.sources.0.path={data / 'robot'}",
            f"data.sources.1.path={data / 'vl'}",
            f"model.backbone.family={family}",
            f"model.backbone.pretrained={tmp_path / 'backbones' / family}",
            *overrides,
            *((f"model.discrete.fast_path={fast_file(tmp_path)}",) if head == "fast" else ()),
            *SMALL_RUN,
            *extra,
        ],
        2,
    )


def _fresh_process(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """`python -m tests.train.heads_rank ARGS` in its own process group, killed whole on the deadline."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.train.heads_rank", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the export check did not finish in {timeout}s\n{out}\n{err[-4000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def heads_job(tmp_path_factory: pytest.TempPathFactory, toy_data: Path) -> tuple[dict, dict]:
    """The prepared plan and what the ranks recorded per run name."""
    tmp = tmp_path_factory.mktemp("heads_zero")
    fast_file(tmp).parent.mkdir()
    chunk = yaml.safe_load((ROOT / "configs" / HEADS["fast"][0]).read_text())["data"]["fwd_pred_next_n"]
    assert data_tools(["fit-fast", str(toy_data / "robot"), "--chunk", str(chunk), "--out", str(fast_file(tmp))]) == 0
    runs = []
    for head in HEADS:
        for i, family in enumerate(FAMILIES[head]):
            name = f"{head}-{family}"
            run_dir = _prepare(tmp, toy_data, head, family, name, "train.max_steps=1", "train.zero_stage=2")
            runs.append({"run_dir": str(run_dir), "export": str(tmp / "exports" / head) if i == 0 else None})
    for head, stages in STAGES.items():  # ZeRO-3 last: it leaves transformers' zero.Init hook behind while alive
        family = ZERO3_FAMILY[head]
        extra = ("train.max_steps=2", "train.zero_stage=3", "model.lora.enabled=true", f"train.stages={stages}")
        extra += ZERO3_EXTRA[head]
        runs.append({"run_dir": str(_prepare(tmp, toy_data, head, family, f"{head}-zero3-lora", *extra))})
    ep = first_episode(toy_data)  # read here: webdataset refuses to read without a node splitter inside a rank
    inputs = tmp / "inputs.npz"
    np.savez(inputs, frames=np.stack(ep.frames["rgb_static"][:2]), states=ep.state[:2], instruction=ep.instruction)
    plan = {"inputs": str(inputs), "results": str(tmp / "results.json"), "runs": runs}
    plan_path = tmp / "plan.json"
    plan_path.write_text(json.dumps(plan))
    run_module_ranks(tmp, "tests.train.heads_rank", ["--plan", str(plan_path)], timeout=600, cwd=ROOT)
    records = {r["name"]: r for r in json.loads((tmp / "results.json").read_text())}
    assert len(records) == len(runs), rank_logs(tmp)
    return {"path": plan_path, **plan}, records


@pytest.mark.parametrize("head", list(HEADS))
def test_head_trains_on_two_families_under_zero2(heads_job, head: str) -> None:
    """Per family: a finite loss, a step that changed parameters, and the same parameters on both ranks."""
    _, records = heads_job
    for family in FAMILIES[head]:
        record = records[f"{head}-{family}"]
        (step,) = record["steps"]
        assert record["zero_stage"] == 2
        assert step["loss"] is not None and math.isfinite(step["loss"]), (family, step["loss"])
        assert step["changed"], f"{head} on {family}: the step changed no parameter"
        assert not set(step["changed"]) - set(step["trainable"])
        assert not step["differ_across_ranks"], f"{head} on {family}: ranks diverged in {step['differ_across_ranks']}"
        head_prefix = {"discrete": "adapter.", "fast": "adapter."}.get(head, "action_")  # token heads train the LM
        assert any(n.startswith(head_prefix) for n in step["changed"]), (head, family, step["changed"][:5])


@pytest.mark.parametrize("head", list(STAGES))
def test_zero3_lora_and_staged_unfreezing(heads_job, head: str) -> None:
    """ZeRO-3 + LoRA: step 1 trains heads and LoRA only (base weights untouched), step 2 switches to the head's
    own group and the last decoder layer; every step leaves the ranks with identical (gathered) parameters."""
    _, records = heads_job
    record = records[f"{head}-zero3-lora"]
    assert record["zero_stage"] == 3
    first, second = record["steps"]
    assert [first["stage"], second["stage"]] == [0, 1]
    for step in (first, second):
        assert math.isfinite(step["loss"]) and step["changed"], step["loss"]
        assert not set(step["changed"]) - set(step["trainable"]), "a frozen parameter changed"
        assert not step["differ_across_ranks"], step["differ_across_ranks"]
    assert any(".lora_" in n for n in first["changed"])
    if head != "fast":  # the continuous heads' own modules train beside LoRA; FAST's loss reaches only LoRA
        assert any(n.startswith("action_") for n in first["changed"])
    assert not any(".lora_" in n for n in second["changed"])
    assert any(STAGE1_GROUP[head] in n for n in second["changed"]), second["changed"]
    assert any(n.startswith("adapter.") and ".lora_" not in n for n in second["changed"]), "decoder_last_1 idle"


def test_every_head_exports_to_a_policy_in_a_fresh_process(heads_job) -> None:
    """Each head's checkpoint → `export_policy` → `Policy.from_pretrained` in a process that never trained: two
    steps of an episode equal what the trained model predicted in its rank."""
    plan, _ = heads_job
    fitted = fast_file(Path(plan["path"]).parent)
    fitted.rename(fitted.with_name("moved.json"))  # the FAST export must carry its own tokenizer
    fast_export = next(Path(r["export"]) for r in plan["runs"] if r.get("export") and Path(r["export"]).name == "fast")
    assert (fast_export / "fast_tokenizer.json").read_bytes() == fitted.with_name("moved.json").read_bytes()
    done = _fresh_process(["--check-exports", str(plan["path"])], timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report) == len(HEADS)
    for export, result in report.items():
        head = Path(export).name
        assert result["finite"] and result["shape"][0] == 2, (head, result)
        assert result["max_abs_diff"] is not None and result["max_abs_diff"] <= 1e-5, (head, result)
        expected_space = {"mlp": "continuous", "lstm": "continuous", "gpt": "continuous"}.get(head, head)
        assert result["action_space"] == expected_space or head == "fast", (head, result)
        if expected_space == "continuous":
            assert result["head"] == head
