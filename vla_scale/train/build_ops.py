"""Compile DeepSpeed's C++ ops ahead of training (`make install`; `python -m vla_scale.train.build_ops`).

Why: optimizer offload (`train.offload_optimizer`) runs DeepSpeed's CPU Adam, a C++ extension compiled on
first use. Left to the first training step, every node pays the compile (about a minute on 2 cores) before
step 1, inside the process-group timeout. Built here once, it lands in torch's extension cache
(TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), where DeepSpeed finds it at run time. A machine
without a compiler gets a warning, not a failure: nothing else needs the op.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time

OPS = {"cpu_adam": "CPUAdamBuilder"}


def build(name: str) -> str | None:
    """Compile (or find cached) op `name`; the error text if it could not be built, else None."""
    from deepspeed.ops import op_builder

    builder = getattr(op_builder, OPS[name])()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            builder.load(verbose=False)
    except Exception as err:  # noqa: BLE001 - reported; training compiles on first use instead
        return f"{type(err).__name__}: {err}\n{log.getvalue()[-2000:]}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ops", nargs="*", help=f"ops to build, of {sorted(OPS)} (default: all)")
    args = parser.parse_args(argv)
    if unknown := sorted(set(args.ops) - set(OPS)):
        parser.error(f"unknown op(s) {unknown}; known: {sorted(OPS)}")
    for name in args.ops or list(OPS):
        start = time.monotonic()
        error = build(name)
        if error is None:
            print(f"DeepSpeed op {name}: ready ({time.monotonic() - start:.0f} s)")
        else:
            print(f"warning: DeepSpeed op {name} not built; it compiles on first use.\n{error}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
