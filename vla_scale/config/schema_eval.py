"""`eval:` — closed-loop evaluation during training (`vla_scale.train.eval_hook`), off by default.

Every `every_steps` steps rank 0 hands the checkpoint just saved to a background process that exports
it and runs it in a simulator suite (`vla_scale.eval`); success rates come back into `metrics.jsonl`
and wandb as `eval/success/<task>`. Evaluation reads a saved checkpoint, so `every_steps` must be a
multiple of `train.ckpt_every`. None of these keys changes what the run learns, so a resumed run may
change them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vla_scale.config.errors import ConfigError, check_at_least, suggest


@dataclass
class PeriodicEvalConfig:
    """Which suite, how often and how much closed-loop evaluation the training loop starts."""

    suite: str = ""  # a simulator suite of vla_scale.eval (instruct, metaworld, ...); "": no evaluation
    tasks: list[str] = field(default_factory=list)  # empty: every task of the suite
    every_steps: int = 0  # a multiple of train.ckpt_every; 0: only at the end (with at_end)
    episodes: int = 10  # per task, over held-out seeds
    workers: int = 1  # simulator worker processes of the background evaluation
    exec_steps: int = 1  # actions of each predicted chunk executed open-loop before the next query
    ensemble: bool = False  # temporal ensembling of overlapping chunks
    # Simulated inference latency in steps (0: off): chunks run asynchronously, each from `delay` steps after its
    # request, the next one requested at `overlap` actions left (0: the delay); `rtc`: real-time chunking (flow).
    delay: int = 0
    overlap: int = 0
    rtc: bool = False
    videos: int = 0  # episodes per task saved as a video (and sent to wandb when online)
    image_size: int = 0  # rendered frame size in pixels; 0: the robot dataset's frame size
    device: str = "cpu"  # where the background evaluation runs the policy
    at_end: bool = True  # also evaluate the final checkpoint
    final_wait_s: float = 600.0  # how long the end of training waits for a background evaluation
    keep_exports: bool = False  # keep each evaluated step's policy export (eval/step_X/policy)

    @property
    def enabled(self) -> bool:
        return bool(self.suite)

    def validate(self, prefix: str = "eval") -> None:
        """The section's own values; the cadence against `train.ckpt_every` is `check_eval_cadence`."""
        if not self.suite:
            return
        from vla_scale.eval.registry import SUITES  # a plain table: no simulator is imported

        if self.suite not in SUITES:
            raise ConfigError(f"{prefix}.suite: unknown simulator suite {self.suite!r}.{suggest(self.suite, SUITES)}")
        check_at_least(self, prefix, ("every_steps", "image_size", "videos", "workers", "delay", "overlap"), 0)
        check_at_least(self, prefix, ("episodes", "exec_steps"), 1)
        if not self.delay and (self.overlap or self.rtc):
            raise ConfigError(f"{prefix}.overlap and {prefix}.rtc need {prefix}.delay (simulated latency in steps)")
        if self.delay and (self.exec_steps != 1 or self.ensemble):
            raise ConfigError(
                f"{prefix}.delay runs chunks asynchronously: leave {prefix}.exec_steps at 1 and {prefix}.ensemble off"
            )
        if self.delay and self.overlap and self.overlap < self.delay:
            raise ConfigError(
                f"{prefix}.overlap ({self.overlap}) < {prefix}.delay ({self.delay}): the next chunk is requested "
                "when `overlap` actions remain and must arrive before they run out"
            )
        if self.final_wait_s < 0:
            raise ConfigError(f"{prefix}.final_wait_s must be >= 0, got {self.final_wait_s}")
        if self.every_steps == 0 and not self.at_end:
            raise ConfigError(
                f"{prefix}.suite is {self.suite!r} but {prefix}.every_steps is 0 and {prefix}.at_end is false: "
                f"nothing would be evaluated; set {prefix}.every_steps, {prefix}.at_end=true, or {prefix}.suite=''"
            )


def check_eval_cadence(ev: PeriodicEvalConfig, ckpt_every: int) -> None:
    """Evaluation runs on a saved checkpoint: `eval.every_steps` must land on `train.ckpt_every` steps."""
    if not ev.enabled or ev.every_steps == 0:
        return
    if ckpt_every == 0 or ev.every_steps % ckpt_every:
        raise ConfigError(
            f"eval.every_steps ({ev.every_steps}) must be a multiple of train.ckpt_every ({ckpt_every}): "
            "evaluation runs on the checkpoint saved at that step"
        )
