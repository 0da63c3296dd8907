"""LM forward time with and without the Perceiver resampler at realistic image-token counts (a script).

Why: a 224 px SigLIP/14 tower gives 256 tokens per image, a 336 px one 576; with two cameras the
LM sequence is mostly image tokens and attention grows with its square. The resampler
(`model.resampler`) turns each image's tokens into `num_latents` latents before fusion. This
measures what that buys in the LM, and what the resampler itself costs.

Both sides start from the same image tokens (random `[B, N, D]` per camera, as the adapter would
hand them over; the vision tower's cost is the same with or without a resampler and is left out)
and a `--text`-token instruction, and go through the real code: `RoboVLM.fuse` (BOS, image tokens
of both cameras, state-free, instruction, one action token, EOS) and the adapter's `lm_forward`
(a random-weight Llama built from its real config class). With the resampler, the
`PerceiverResampler` runs on each camera's tokens first, inside the timed region. Sides alternate
(without, with, without, with ...) and each figure is a median over repeats.

    python tests/benchmarks/bench_resampler.py
    python tests/benchmarks/bench_resampler.py --train        # forward + backward
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

import torch
from bench_common import command_line, median, quiet_libraries, table

from vla_scale.config.schema import ModelConfig, ResamplerConfig, TinyBackboneConfig
from vla_scale.model import RoboVLM, build_tiny_backbone
from vla_scale.model.resampler import PerceiverResampler


def build(args: argparse.Namespace, tmp: str) -> tuple[RoboVLM, PerceiverResampler]:
    """A LLaVA (Llama LM) RoboVLM of the requested size, and a resampler to `--latents` latents."""
    tiny = TinyBackboneConfig(
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.hidden // 64,
        intermediate_size=args.hidden * 8 // 3 // 64 * 64,
        vision_hidden_size=32,
        vision_layers=1,
        vision_heads=2,
        image_size=32,
        patch_size=8,
    )
    adapter = build_tiny_backbone("llava", tiny, tmp)
    model = RoboVLM(ModelConfig(), action_dim=7, state_dim=8, adapter=adapter).eval()
    resampler = PerceiverResampler.from_config(args.hidden, ResamplerConfig(enabled=True, num_latents=args.latents))
    return model, resampler.eval()


def lm_pass(model: RoboVLM, image_tokens: torch.Tensor, text_ids: torch.Tensor, train: bool) -> int:
    """Fuse image + instruction + action token and run the LM; returns the sequence length."""
    keep = torch.ones_like(text_ids, dtype=torch.bool)
    fused = model.sequences.fuse(
        image_tokens, text_ids, keep, n_action=1, action_token=model.action_token, append_eos=True
    )
    hidden, _, _ = model.adapter.lm_forward(fused.embeds, fused.attention_mask, return_logits=False)
    if train:
        hidden.float().mean().backward()
    return fused.embeds.shape[1]


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    start = time.perf_counter()
    length = fn()
    return time.perf_counter() - start, length


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 576], help="tokens per image (default: 256 576)")
    p.add_argument("--cameras", type=int, default=2, help="images per sample (default: %(default)s)")
    p.add_argument("--text", type=int, default=64, help="instruction tokens (default: %(default)s)")
    p.add_argument("--latents", type=int, default=64, help="resampler latents per image (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=768, help="LM hidden size (default: %(default)s)")
    p.add_argument("--layers", type=int, default=8, help="LM decoder layers (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1, help="samples per forward (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per side (default: %(default)s)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (default: %(default)s; more oversubscribe a shared CPU)"
    )
    p.add_argument("--train", action="store_true", help="time forward + backward instead of forward only")
    args = p.parse_args()
    print("command:", command_line())
    quiet_libraries()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench_resampler_") as tmp:
        model, resampler = build(args, tmp)
    lm_params = sum(p.numel() for p in model.adapter.decoder_layers.parameters())
    res_params = sum(p.numel() for p in resampler.parameters())
    text_ids = torch.randint(10, 400, (args.batch, args.text))
    cams = {n: [torch.randn(args.batch, n, args.hidden) * 0.02 for _ in range(args.cameras)] for n in args.tokens}

    def without(n: int) -> int:
        return lm_pass(model, torch.cat(cams[n], dim=1), text_ids, args.train)

    def resample(n: int) -> torch.Tensor:
        return torch.cat([resampler(c) for c in cams[n]], dim=1)

    def with_resampler(n: int) -> int:
        return lm_pass(model, resample(n), text_ids, args.train)

    times: dict[tuple[int, str], list[float]] = {(n, s): [] for n in args.tokens for s in ("without", "with", "res")}
    lengths: dict[tuple[int, str], int] = {}
    grad = torch.enable_grad() if args.train else torch.no_grad()
    with grad:
        for rep in range(args.repeats + 1):  # repeat 0 warms up and is dropped
            for n in args.tokens:
                for side, fn in (("without", without), ("with", with_resampler), ("res", resample)):
                    seconds, length = timed(lambda fn=fn, n=n: fn(n))
                    lengths[n, side] = length
                    if rep:
                        times[n, side].append(seconds)
    mode = "forward + backward" if args.train else "forward (no grad)"
    print(
        f"\nLlama LM {args.layers} x {args.hidden} ({lm_params / 1e6:.1f}M decoder parameters), {mode}, batch "
        f"{args.batch}, {args.cameras} cameras, {args.text}-token instruction; resampler to {args.latents} latents "
        f"({res_params / 1e6:.1f}M parameters); {torch.get_num_threads()} threads, median of {args.repeats} repeats"
    )
    rows = []
    for n in args.tokens:
        w, r, res = (median(times[n, s]) for s in ("without", "with", "res"))
        rows.append(
            [
                n,
                lengths[n, "without"],
                lengths[n, "with"],
                f"{w * 1e3:.0f}",
                f"{r * 1e3:.0f}",
                f"{res * 1e3:.0f}",
                f"{w / r:.2f}x",
            ]
        )
    header = ["tokens/image", "LM seq without", "LM seq with", "without ms", "with ms", "resampler ms", "speed-up"]
    print(table(header, rows))
    print("('with ms' = both cameras resampled + fuse + LM; 'resampler ms' = the resampler's forward alone)")


if __name__ == "__main__":
    main()
