"""The DeepSpeed JSON, generated from our config so the two can never disagree."""

from __future__ import annotations

from vla_scale.config.schema import Config


def build_ds_config(cfg: Config, world_size: int) -> dict:
    """DeepSpeed config dict for `deepspeed.initialize` (optimizer and scheduler are passed as objects)."""
    t = cfg.train
    zero: dict = {"stage": t.zero_stage}
    if t.zero_stage == 3:
        # Without this, ZeRO-3 save_16bit_model silently writes nothing.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if t.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum(world_size),  # raises unless the batch splits over the ranks
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        # Our GuardedAdamW is torch's AdamW plus a finiteness check; DeepSpeed only knows the exact class.
        "zero_allow_untested_optimizer": True,
        # check_grad_overflow: a NaN/inf gradient skips the step instead of corrupting the weights.
        "bf16": {"enabled": t.bf16, "check_grad_overflow": True},
        # Dynamic loss scaling from 2^16, halved on overflow, doubled after 1000 clean steps.
        "fp16": {"enabled": t.fp16, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000},
        "steps_per_print": 10**9,  # our metrics sinks do the printing
        "wall_clock_breakdown": False,
    }
