"""Training: DeepSpeed engine factory, the loop, checkpoints and metrics sinks.

Composes `vla_scale.data` and `vla_scale.model`; neither of them imports from here.
"""
