"""Every place vla_scale reaches into a private or undocumented attribute of DeepSpeed, transformers or py-cpuinfo.

Each patch is one function here, with the reason it exists, and one test in tests/test_compat.py that
fails loudly when the upstream version renames or drops what the function relies on. A function that
finds the attribute missing raises `UpstreamChanged` instead of silently doing nothing.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import platform
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


class UpstreamChanged(RuntimeError):
    """An upstream library no longer has the private attribute a patch here relies on."""


def _require(obj: Any, attr: str, where: str) -> None:
    if not hasattr(obj, attr):
        raise UpstreamChanged(f"{where} has no attribute {attr!r} any more; update vla_scale/compat.py")


def skip_shm_allreduce_build() -> None:
    """Stop DeepSpeed's CPU backend from JIT-compiling its shared-memory all-reduce op (40-80 s per rank).

    `deepspeed.comm.torch.TorchBackend.__init__` calls the module-level `build_shm_op()`; the op serves
    only inference all-reduce, which training never uses. Call before `deepspeed.init_distributed`.
    """
    comm_torch = importlib.import_module("deepspeed.comm.torch")
    _require(comm_torch, "build_shm_op", "deepspeed.comm.torch")
    comm_torch.build_shm_op = lambda: None


MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


def import_muon_with_lazy_kernels() -> None:
    """Import DeepSpeed's Muon optimizer module with its kernels compiled on first use, not at import (~0.6 s of
    CPU per rank, and inductor's import with it).

    DeepSpeed imports that module where vla_scale never uses it: the ZeRO optimizer check of every
    `deepspeed.initialize` (`is_zero_supported_optimizer`, to list `MuonWithAuxAdam`) and ZeRO-1/2's gradient
    reduction at the first backward (`average_tensor`, for an `isinstance`). Its kernels are decorated with
    `deepspeed.runtime.compiler.compile()`, which is `torch.compile` and imports dynamo's and inductor's
    compiler stack at decoration. Here that decorator is replaced, for this one import, by one that calls
    `torch.compile` on the kernel's first call, so the module is complete and a Muon optimizer would still
    get compiled kernels; vla_scale's optimizers never call them. Both later imports then find the module
    loaded. Does nothing when the module is already imported.
    """
    if MUON_MODULE in sys.modules:
        return
    compiler = importlib.import_module("deepspeed.runtime.compiler")
    _require(compiler, "compile", "deepspeed.runtime.compiler")
    eager = compiler.compile
    compiler.compile = _compile_on_first_call
    try:
        importlib.import_module(MUON_MODULE)
    finally:
        compiler.compile = eager


def _compile_on_first_call() -> Any:
    """A stand-in for `deepspeed.runtime.compiler.compile()`: the decorated function is compiled when first called."""

    def decorate(fn: Any) -> Any:
        compiled = None

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            nonlocal compiled
            if compiled is None:
                compiled = torch.compile(fn)
            return compiled(*args, **kwargs)

        return call

    return decorate


def fast_cpu_info() -> dict:
    """The fields DeepSpeed reads from py-cpuinfo (arch, flags, vendor), taken from /proc/cpuinfo and uname.

    py-cpuinfo's `get_cpu_info` probes CPUID in a child process; on a loaded 2-core VM that probe was
    seen spinning for over ten minutes inside DeepSpeedCPUAdam's constructor.
    """
    machine = platform.machine().lower()
    arch = {"x86_64": "X86_64", "amd64": "X86_64", "aarch64": "ARM_8", "arm64": "ARM_8"}.get(machine, machine.upper())
    if machine.startswith("ppc"):
        arch = "PPC_64"
    elif machine.startswith("riscv"):
        arch = "riscv64"
    info: dict = {"arch": arch, "flags": [], "vendor_id_raw": "unknown"}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "vendor_id":
            info["vendor_id_raw"] = value.strip()
        elif key in ("flags", "Features") and not info["flags"]:
            info["flags"] = value.split()
    return info


def use_fast_cpu_info() -> None:
    """Replace `cpuinfo.get_cpu_info` with `fast_cpu_info` for DeepSpeed's CPU Adam and its op builder.

    Both import `get_cpu_info` from the `cpuinfo` module at call time, so replacing the module attribute
    reaches them. Call before constructing `DeepSpeedCPUAdam`.
    """
    import cpuinfo

    _require(cpuinfo, "get_cpu_info", "cpuinfo")
    cpuinfo.get_cpu_info = fast_cpu_info


def remove_engine_forward_hooks(engine: Any) -> None:
    """Detach the forward hooks a DeepSpeed engine put on its module, so a destroyed engine can be freed.

    `DeepSpeedEngine.destroy()` leaves `module_forward_pre_hook` / `module_forward_post_hook` registered
    on the wrapped model; their closures keep the old engine (optimizer state, fp32 masters, gradient
    buffers) alive for as long as the model lives. Call after `engine.destroy()` at a stage switch.
    """
    for attr in ("module_forward_pre_hook", "module_forward_post_hook"):
        _require(engine, attr, "DeepSpeedEngine")
        handle = getattr(engine, attr)
        if handle is not None:
            handle.remove()
            setattr(engine, attr, None)


def reset_step_verdict(optimizer: torch.optim.Optimizer) -> None:
    """Clear an optimizer's `overflow` flag before a step (it is set again only if the step runs).

    `DeepSpeedEngine._take_model_step` reads `optimizer.overflow` after `optimizer.step()` to count a
    skipped step; our `GuardedAdamW` sets it. Optimizers without the flag are left alone.
    """
    if hasattr(optimizer, "overflow"):
        optimizer.overflow = False


def step_was_skipped(engine: Any, optimizer: torch.optim.Optimizer, skipped_before: int) -> bool:
    """Whether the last optimizer step was refused: DeepSpeed counted a skip, or the optimizer flagged overflow."""
    return engine.skipped_steps > skipped_before or bool(getattr(optimizer, "overflow", False))


def loss_scale(engine: Any) -> float:
    """The current dynamic fp16 loss scale, read from DeepSpeed's optimizer wrapper.

    Every fp16 wrapper (`FP16_Optimizer`, `FP16_UnfusedOptimizer`, ZeRO 1/2 and ZeRO-3) promotes its
    loss scaler's scale to a `loss_scale` property; only the ZeRO ones also have `cur_scale`, which
    this used to read (it fails under fp16 ZeRO-0).
    """
    _require(engine.optimizer, "loss_scale", type(engine.optimizer).__name__)
    return float(engine.optimizer.loss_scale)


def keep_hf_deepspeed_config(ds_config: dict) -> Any:
    """Make transformers' `from_pretrained` create models under `deepspeed.zero.Init` (ZeRO-3 partitioned).

    transformers keeps the `HfDeepSpeedConfig` only through a module-level weak reference
    (`transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref`), so the caller must hold the
    returned object for as long as models should be created partitioned.
    """
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations import deepspeed as hf_deepspeed

    _require(hf_deepspeed, "_hf_deepspeed_config_weak_ref", "transformers.integrations.deepspeed")
    return HfDeepSpeedConfig(ds_config)


@contextlib.contextmanager
def hf_zero3_init_disabled() -> Iterator[None]:
    """Load a model whole even while transformers' DeepSpeed ZeRO-3 integration is alive.

    `from_pretrained` creates models under `deepspeed.zero.Init` (partitioned) whenever an
    `HfDeepSpeedConfig` with stage 3 exists; transformers finds it through the module-level weak
    reference `_hf_deepspeed_config_weak_ref`, which this clears for the duration of the block.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    _require(hf_deepspeed, "_hf_deepspeed_config_weak_ref", "transformers.integrations.deepspeed")
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def optimizer_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Every param group's settings but its parameters: what `repair_zero3_universal_load` puts back."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def repair_zero3_universal_load(engine: Any, hyperparameters: list[dict]) -> None:
    """Undo two faults of DeepSpeed 0.19's ZeRO-3 universal load (stage3.py, `load_hp_checkpoint_state_...`).

    1. It puts one and the same `step` tensor into the Adam state of every ZeRO-3 sub-group; ZeRO-3
       steps the base optimizer once per sub-group and torch's Adam adds 1 to `step` in place, so
       every sub-group after the first ran with a step count too high (wrong bias correction): the
       1.4e-4 weight drift after one step that kept ZeRO-3 from resuming on another world size.
    2. It copies param group 0's settings (weight decay, betas, eps) onto every group, so the
       no-decay group would decay. `hyperparameters` (`optimizer_hyperparameters` of the optimizer
       before the load) come from the same config, which `check_same_run` held to the checkpoint's.
    """
    zero = engine.optimizer
    _require(zero, "fp32_partitioned_groups_flat", type(zero).__name__)
    base = zero.optimizer
    for flat in zero.fp32_partitioned_groups_flat:
        state = base.state.get(flat, {})
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    if len(hyperparameters) != len(base.param_groups):
        raise UpstreamChanged(
            f"ZeRO-3 optimizer has {len(base.param_groups)} param groups after a universal load, built with "
            f"{len(hyperparameters)}; update vla_scale/compat.py"
        )
    for group, saved in zip(base.param_groups, hyperparameters, strict=True):
        group.update(saved)
