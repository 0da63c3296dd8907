"""The training loop in named steps: setup/resume, stage switch, train_step, log window, checkpoint.

run = setup(run_dir)                      # state.py: config, process group, model, engine, resume
while step < max_steps:
    staged.switch_if_due(step)            # engine.py: rebuild the engine when the stage changes
    train_step()                          # accumulation micro-steps + the non-finite verdict
    log()                                 # log_window.py: reduce over ranks, write every sink
    checkpoint every ckpt_every steps     # eval_hook.py: rank 0 evaluates due checkpoints in the background
    stop if any rank saw the preemption signal   # preempt.py: save, then exit EXIT_PREEMPTED (75)
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from vla_scale.compat import loss_scale, reset_step_verdict, step_was_skipped
from vla_scale.config import load_config, to_dict
from vla_scale.train import checkpoint
from vla_scale.train.engine import lr_lambda, set_lr
from vla_scale.train.eval_hook import EvalHook
from vla_scale.train.faults import NanInjector, StepGuard
from vla_scale.train.log_window import LogWindow
from vla_scale.train.metrics import MetricsWriter
from vla_scale.train.preempt import EXIT_PREEMPTED, Preemption
from vla_scale.train.state import RunState, setup


def peak_memory_gb() -> float:
    """Peak memory of this rank: allocated device memory on GPU, max resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Trainer:
    """One rank's training run; `train()` is the whole loop, `train_step()` one optimizer step."""

    def __init__(self, run: RunState, preemption: Preemption | None = None):
        self.run = run
        self.preemption = preemption or Preemption("none")
        cfg = run.cfg
        self.writer = MetricsWriter(run.run_dir, cfg.run.name, cfg.wandb, to_dict(cfg), start_step=run.step)
        self.evals = EvalHook(run, self.writer)  # after the writer: it reads the metrics.jsonl the writer kept
        self.window = LogWindow(run.world)
        self.guard = StepGuard(cfg.train.max_bad_steps, fp16=cfg.train.fp16)
        self.inject = NanInjector(run.rank, cfg.debug.nan_injection())
        self.schedule = lr_lambda(cfg.optim, cfg.train.max_steps)
        self.lr = 0.0

    def train_step(self) -> bool:
        """One optimizer step over `gradient_accumulation_steps` micro-batches; returns True when it was skipped.

        The learning rate is set from (step, stage) first. A step whose loss or gradients are not
        finite is refused by the optimizer on every rank alike; its values stay out of the metrics and
        `StepGuard` stops the run after `train.max_bad_steps` of them in a row.
        """
        run, staged = self.run, self.run.staged
        engine, optimizer = staged.engine, staged.optimizer
        self.lr = run.cfg.optim.lr * staged.stage.lr_scale * self.schedule(run.step)
        set_lr(optimizer, self.lr)
        skipped_before = engine.skipped_steps
        reset_step_verdict(optimizer)
        outs = []
        for _ in range(engine.gradient_accumulation_steps()):
            t_fetch = time.perf_counter()
            batch = next(run.data_iter)
            self.window.add_fetch(time.perf_counter() - t_fetch)
            run.stream.update(batch)
            out = self.inject(run.step + 1, engine(batch.to(engine.device)))
            engine.backward(out["loss"])
            engine.step()
            outs.append({k: v.detach() for k, v in out.items() if k != "num_tokens"})
            tokens = out["num_tokens"].detach() if "num_tokens" in out else batch.text_mask.sum()
            self.window.add_micro_step(batch.batch_size, tokens)
        run.step += 1
        report = staged.report_stage(run.step)
        if report is not None:
            self.window.add({k: v for k, v in report.items() if k != "stage"})
        skipped = self.guard.after_step(run.step, step_was_skipped(engine, optimizer, skipped_before), outs)
        if not skipped:
            for out in outs:
                self.window.add(out)
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                self.window.add({"grad_norm": float(grad_norm)})
        return skipped

    def log(self) -> dict[str, float]:
        """Collective: close the log window and write its values to every sink (rank 0)."""
        run = self.run
        means, rates = self.window.close(sum(run.stream.skipped().values()))  # summed over ranks there
        values = {
            **means,
            "lr": self.lr,
            "stage": run.staged.stage.index,
            **rates,
            "skipped_steps": self.guard.skipped_total,
            **{f"mix/{name}": share for name, share in run.stream.mix().items()},
            "peak_mem_gb": peak_memory_gb(),
        }
        if run.cfg.train.fp16:
            values["loss_scale"] = loss_scale(run.staged.engine)
        values.update(self.evals.poll(run.step))  # a finished background evaluation, if any (rank 0)
        self.writer.write(run.step, values)
        return values

    def train(self) -> None:
        """Train from the resumed step to `train.max_steps`, logging and checkpointing on schedule."""
        run, t = self.run, self.run.cfg.train
        pbar = tqdm(total=t.max_steps, initial=run.step, disable=run.rank != 0, file=sys.stdout, dynamic_ncols=True)
        while run.step < t.max_steps:
            run.staged.switch_if_due(run.step)
            self.train_step()
            logged = run.step % t.log_every == 0 or run.step == t.max_steps
            if logged:
                values = self.log()
                pbar.set_postfix({k: f"{values[k]:.4f}" for k in ("loss", "loss_arm", "loss_vl") if k in values})
            pbar.update(1)
            saved = bool(t.ckpt_every) and run.step % t.ckpt_every == 0 and run.step < t.max_steps
            if saved:
                run.save()
                self.evals.after_save(run.step)
            if run.step < t.max_steps and self.preemption.agreed():
                pbar.close()
                self.stop_preempted(logged, saved)
        if checkpoint.read_latest(run.ckpt_dir) != checkpoint.tag_for(run.step):
            run.save()
        self.evals.finish(run.step)
        pbar.close()
        self.writer.close()

    def stop_preempted(self, logged: bool, saved: bool) -> None:
        """Collective: the ranks agreed on a preemption after this step; log and save it, then exit 75."""
        run = self.run
        if not logged:
            self.log()
        if not saved:
            run.save()
        self.evals.abandon()  # a running evaluation is started again on resume
        self.writer.close()
        if run.rank == 0:
            print(
                f"[vla_scale] preempted ({self.preemption.signal_name}): checkpoint {checkpoint.tag_for(run.step)} "
                f"saved; exiting with code {EXIT_PREEMPTED} (resume continues from it)",
                flush=True,
            )
        dist.barrier()
        raise SystemExit(EXIT_PREEMPTED)


def train(run_dir: str | Path) -> None:
    """Train the run laid out by `prepare_run` in `run_dir`; resumes from its `latest` checkpoint.

    The preemption handler goes in before anything is built, so a signal during setup is not lost: the
    ranks then stop after their first step.
    """
    preemption = Preemption(load_config(Path(run_dir) / "config.yaml").train.preempt_signal)
    run = setup(run_dir)
    Trainer(run, preemption).train()
    if run.rank == 0:
        print(f"[vla_scale] done: {run.step} steps, run directory {run.run_dir}", flush=True)
    dist.barrier()
