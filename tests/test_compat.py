"""One test per upstream patch in vla_scale/compat.py: each fails loudly when DeepSpeed, transformers or
py-cpuinfo change what the patch relies on (a renamed attribute, a call site that no longer reads it)."""

import importlib
import inspect
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.train.jobs import free_port
from vla_scale import compat

ENGINE_PROBE = textwrap.dedent(
    """
    import gc, json, math, sys, weakref
    import deepspeed, torch
    from vla_scale import compat
    from vla_scale.train.engine import GuardedAdamW, init_distributed

    # the training ranks' own start: gloo, without the shared-memory all-reduce op (a JIT build whose
    # py-cpuinfo probe was seen taking minutes on a loaded machine)
    init_distributed(120)
    model = torch.nn.Linear(4, 2)
    optimizer = GuardedAdamW(model.parameters(), lr=0.1)
    config = {"train_batch_size": 1, "zero_optimization": {"stage": 0}, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    facts = {"hooks_before": [len(model._forward_pre_hooks), len(model._forward_hooks)]}

    # optimizer.overflow: DeepSpeed counts a skipped step when the optimizer flags it
    compat.reset_step_verdict(optimizer)
    before = engine.skipped_steps
    engine.backward(engine(torch.ones(1, 4)).sum() * math.nan)
    engine.step()
    facts["skipped_nan_step"] = compat.step_was_skipped(engine, optimizer, before)
    facts["engine_counted_skip"] = engine.skipped_steps == before + 1
    compat.reset_step_verdict(optimizer)
    before = engine.skipped_steps
    engine.backward(engine(torch.ones(1, 4)).sum())
    engine.step()
    facts["skipped_clean_step"] = compat.step_was_skipped(engine, optimizer, before)

    # engine forward hooks: after destroy() + removal nothing keeps the engine alive
    engine.destroy()
    compat.remove_engine_forward_hooks(engine)
    facts["hooks_after"] = [len(model._forward_pre_hooks), len(model._forward_hooks)]
    ref = weakref.ref(engine)
    del engine, optimizer
    gc.collect()
    facts["engine_freed"] = ref() is None
    print("FACTS " + json.dumps(facts), flush=True)
    """
)


@pytest.fixture(scope="module")
def engine_facts() -> dict:
    """One 1-rank DeepSpeed engine (ZeRO-0, CPU) in a child process, probed for what the patches rely on."""
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    env.update(MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    proc = subprocess.Popen(
        [sys.executable, "-c", ENGINE_PROBE],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"engine probe did not finish in 300 s\n{out[-6000:]}")
    lines = [ln for ln in out.splitlines() if ln.startswith("FACTS ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"engine probe exited {proc.returncode}\n{out[-6000:]}")
    return json.loads(lines[-1].removeprefix("FACTS "))


def test_build_shm_op_is_still_what_the_cpu_backend_calls(monkeypatch):
    comm_torch = importlib.import_module("deepspeed.comm.torch")
    monkeypatch.setattr(comm_torch, "build_shm_op", comm_torch.build_shm_op)  # restored after the test
    assert "build_shm_op()" in inspect.getsource(comm_torch.TorchBackend.__init__)
    compat.skip_shm_allreduce_build()
    assert comm_torch.build_shm_op() is None


def test_muon_module_is_imported_with_kernels_compiled_on_first_call():
    """In a fresh interpreter: nothing else there has imported DeepSpeed's Muon module yet."""
    probe = textwrap.dedent(
        """
        import inspect, sys
        import torch
        from deepspeed.runtime import compiler, engine
        from deepspeed.runtime.zero import stage_1_and_2, utils
        from vla_scale import compat
        from vla_scale.train.engine import GuardedAdamW, init_distributed
        init_distributed(60)  # the original check logs through deepspeed.comm
        # where DeepSpeed imports the module without using it
        assert "muon_optimizer import MuonWithAuxAdam" in inspect.getsource(utils.is_zero_supported_optimizer)
        assert "muon_optimizer import MuonWithAuxAdam" in inspect.getsource(
            stage_1_and_2.DeepSpeedZeroOptimizer.average_tensor)
        eager = compiler.compile
        compat.import_muon_with_lazy_kernels()
        assert compat.MUON_MODULE in sys.modules and compiler.compile is eager
        assert "torch._inductor.compile_fx" not in sys.modules  # no compiler stack imported
        from deepspeed.runtime.zero.muon import original_muon
        assert "@compiler.compile()" in inspect.getsource(original_muon)
        compiled = []
        torch.compile = lambda fn: compiled.append(fn) or fn  # the first call compiles: record it, run eagerly
        g = torch.randn(8, 4)
        out = original_muon.zeropower_via_newtonschulz5(g, 2)
        assert compiled == [original_muon.zeropower_via_newtonschulz5.__wrapped__]
        torch.testing.assert_close(out, original_muon.zeropower_via_newtonschulz5.__wrapped__(g, 2))
        original_muon.zeropower_via_newtonschulz5(g, 2)
        assert len(compiled) == 1  # once
        p = [torch.nn.Parameter(torch.zeros(2))]
        optimizers = [torch.optim.Adam(p), torch.optim.AdamW(p), GuardedAdamW(p), torch.optim.SGD(p)]
        print("OK", [engine.is_zero_supported_optimizer(o) for o in optimizers])
        """
    )
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and "OK [True, True, False, False]" in proc.stdout, proc.stdout + proc.stderr[-3000:]


def test_cpu_info_replacement_reaches_deepspeed_and_has_what_it_reads(monkeypatch):
    import cpuinfo
    from deepspeed.ops.adam import cpu_adam
    from deepspeed.ops.op_builder import builder

    monkeypatch.setattr(cpuinfo, "get_cpu_info", cpuinfo.get_cpu_info)
    # both read it from the module at call time, so replacing the module attribute reaches them
    assert "from cpuinfo import get_cpu_info" in inspect.getsource(builder)
    assert "from cpuinfo import get_cpu_info" in inspect.getsource(cpu_adam.DeepSpeedCPUAdam.__init__)
    compat.use_fast_cpu_info()
    assert cpuinfo.get_cpu_info is compat.fast_cpu_info
    info = cpuinfo.get_cpu_info()
    assert set(info) >= {"arch", "flags", "vendor_id_raw"}
    assert isinstance(info["flags"], list) and info["arch"]


def test_engine_forward_hooks_are_removed_and_the_engine_freed(engine_facts):
    pre, post = engine_facts["hooks_before"]
    assert pre >= 1 and post >= 1, "DeepSpeed no longer puts forward hooks on the module"
    assert engine_facts["hooks_after"] == [pre - 1, post - 1]
    assert engine_facts["engine_freed"], "something else now keeps a destroyed engine alive"


def test_optimizer_overflow_flag_makes_deepspeed_skip_the_step(engine_facts):
    assert engine_facts["skipped_nan_step"] and engine_facts["engine_counted_skip"]
    assert not engine_facts["skipped_clean_step"]


def test_every_fp16_optimizer_wrapper_has_loss_scale():
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    for cls in (FP16_Optimizer, FP16_UnfusedOptimizer, DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3):
        assert isinstance(inspect.getattr_static(cls, "loss_scale"), property), cls.__name__

    class _Wrapper:  # what `loss_scale` reads, on an object shaped like DeepSpeed's wrapper
        loss_scale = 1024.0

    class _Engine:
        optimizer = _Wrapper()

    assert compat.loss_scale(_Engine()) == 1024.0
    _Engine.optimizer = object()
    with pytest.raises(compat.UpstreamChanged, match="loss_scale"):
        compat.loss_scale(_Engine())


def test_hf_deepspeed_config_weak_ref_is_what_from_pretrained_consults():
    from transformers.integrations import deepspeed as hf_deepspeed

    assert hf_deepspeed.is_deepspeed_zero3_enabled() is False
    held = compat.keep_hf_deepspeed_config({"train_batch_size": 1, "zero_optimization": {"stage": 3}})
    try:
        assert hf_deepspeed._hf_deepspeed_config_weak_ref() is held
        assert hf_deepspeed.is_deepspeed_zero3_enabled() is True
        with compat.hf_zero3_init_disabled():
            assert hf_deepspeed.is_deepspeed_zero3_enabled() is False
        assert hf_deepspeed.is_deepspeed_zero3_enabled() is True
    finally:
        del held
    assert hf_deepspeed.is_deepspeed_zero3_enabled() is False


def test_zero3_universal_load_still_shares_one_step_and_group_0s_settings():
    """The two faults `repair_zero3_universal_load` undoes are still in DeepSpeed's loader (when this fails because
    upstream fixed them, drop the repair), and the attribute it walks is still the flat fp32 partitions."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    loader = inspect.getsource(Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3)
    assert "self.optimizer.state[fp32_param]['step'] = state_step" in loader
    assert '["param_groups"][0].items()' in loader
    assert "self.fp32_partitioned_groups_flat[sub_group_id]" in loader


def test_repair_gives_each_sub_group_its_own_step_and_settings():
    """Two sub-groups left as DeepSpeed's ZeRO-3 universal load leaves them (one shared `step` tensor, group 0's
    weight decay on both): after the repair, one Adam step per sub-group counts each step once."""
    import torch

    flats = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    adam = torch.optim.AdamW([{"params": [flats[0]], "weight_decay": 0.1}, {"params": [flats[1]], "weight_decay": 0.0}])
    before = compat.optimizer_hyperparameters(adam)
    step = torch.tensor(5.0)
    for group, flat in zip(adam.param_groups, flats, strict=True):
        adam.state[flat] = {"step": step, "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
        group["weight_decay"] = 0.1
    zero3 = type("Stage3", (), {})()
    zero3.fp32_partitioned_groups_flat, zero3.optimizer = flats, adam
    compat.repair_zero3_universal_load(type("Engine", (), {"optimizer": zero3})(), before)
    assert [g["weight_decay"] for g in adam.param_groups] == [0.1, 0.0]
    for flat in flats:  # ZeRO-3 steps the base optimizer once per sub-group
        flat.grad = torch.ones_like(flat)
    adam.step()
    assert [float(adam.state[f]["step"]) for f in flats] == [6.0, 6.0]
    with pytest.raises(compat.UpstreamChanged, match="param groups"):
        compat.repair_zero3_universal_load(type("Engine", (), {"optimizer": zero3})(), before[:1])
