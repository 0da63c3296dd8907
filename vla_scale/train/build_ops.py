"""Compile DeepSpeed's C++ ops ahead of training (`make install`; `python -m vla_scale.train.build_ops`).

Why: optimizer offload (`train.offload_optimizer`) runs DeepSpeed's CPU Adam, a C++ extension compiled on
first use. Left to the first training step, every node pays the compile (about a minute on 2 cores) before
step 1, inside the process-group timeout. Built here once, it lands in this Python environment's extension cache
(`extensions_dir`; TORCH_EXTENSIONS_DIR when set), where training finds it. A machine without a compiler gets a
warning, not a failure: nothing else needs the op.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import sys
import time
from pathlib import Path

OPS = {"cpu_adam": "CPUAdamBuilder"}


def extensions_dir() -> Path:
    """Where compiled ops of this Python environment live: TORCH_EXTENSIONS_DIR when set, else a folder of its own
    under ~/.cache/vla_scale/torch_extensions (keyed by the environment's path).

    Why not torch's default (~/.cache/torch_extensions/py311_cpu): every environment with the same Python shares
    it, and an op built against another environment's DeepSpeed and torch (other include paths) is rebuilt in
    place, so two checkouts used in turn recompile CPU Adam at every switch (a minute or more on 2 cores), and a
    process of one may load the other's build."""
    if env := os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(env)
    key = hashlib.sha1(os.path.realpath(sys.prefix).encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "vla_scale" / "torch_extensions" / key


def use_environment_extensions_dir() -> Path:
    """Point torch's extension builds and loads of this process (and of processes it starts) at `extensions_dir`;
    call before DeepSpeed builds or loads an op."""
    path = extensions_dir()
    os.environ["TORCH_EXTENSIONS_DIR"] = str(path)
    return path


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
    folder = use_environment_extensions_dir()
    for name in args.ops or list(OPS):
        start = time.monotonic()
        error = build(name)
        if error is None:
            print(f"DeepSpeed op {name}: ready in {folder} ({time.monotonic() - start:.0f} s)")
        else:
            print(f"warning: DeepSpeed op {name} not built; it compiles on first use.\n{error}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
