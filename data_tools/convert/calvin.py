"""`python -m data_tools convert calvin SRC OUT --trust-pickle`: a CALVIN split folder (e.g. task_D_D/training).

CALVIN stores one `episode_XXXXXXX.npz` per frame (rgb_static, rgb_gripper, robot_obs,
rel_actions, actions, ...) and the language annotations in
`lang_annotations/auto_lang_ann.npy`: a pickled dict with `["info"]["indx"]`, a list of
(start, end) frame ids (end inclusive, as CALVIN's own loader reads them), and
`["language"]["ann"]`, one instruction per segment. Each annotated segment becomes one
episode with its instruction (segments overlap, so frames may be stored more than once).

Loading a pickle can run arbitrary code, so the annotation file is only read with
`--trust-pickle`; the per-frame npz files are read with allow_pickle=False.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from data_tools.convert.common import ConvertOptions, add_common_args, convert, parse_cameras, report
from vla_scale.data.format import Episode, FormatError
from vla_scale.data.spaces import Space, Spaces

ANNOTATIONS = "lang_annotations/auto_lang_ann.npy"
DEFAULT_CAMERAS = {"rgb_static": "rgb_static", "rgb_wrist": "rgb_gripper"}
TRUST_HELP = (
    "allow loading the annotation file, which is a pickle (np.load with allow_pickle=True): "
    "a pickle can run arbitrary code, so pass this only for data from a source you trust, "
    "such as the official CALVIN download"
)


@dataclass(frozen=True)
class Keys:
    cameras: tuple[tuple[str, str], ...]  # (output camera, npz key)
    state: tuple[str, ...]
    action: str
    remap_gripper: bool = True


@dataclass(frozen=True)
class Source:
    """One annotated segment; small and picklable."""

    root: str
    index: int  # position in the annotation file
    start: int
    end: int  # inclusive
    instruction: str
    task: str


def frame_path(root: Path, frame: int) -> Path:
    return root / f"episode_{frame:07d}.npz"


def load_annotations(path: Path, trust_pickle: bool) -> tuple[list[tuple[int, int]], list[str], list[str]]:
    """(start, end) segments, instructions and task names from auto_lang_ann.npy."""
    if not path.is_file():
        raise FormatError(f"{path} not found; SRC must be a CALVIN split folder (or pass --annotations PATH)")
    if not trust_pickle:
        raise FormatError(
            f"{path} is a pickle (a Python object saved by np.save), and loading a pickle can run arbitrary code; "
            "if you trust where this dataset came from (e.g. the official CALVIN download), rerun with --trust-pickle"
        )
    try:
        ann = np.load(path, allow_pickle=True).item()
        spans = [(int(s), int(e)) for s, e in ann["info"]["indx"]]
        texts = [str(t) for t in ann["language"]["ann"]]
        tasks = [str(t) for t in ann["language"].get("task", [""] * len(texts))]
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as err:
        raise FormatError(
            f"{path}: not a CALVIN annotation dict with ['info']['indx'] and ['language']['ann'] ({err!r})"
        ) from err
    if not (len(spans) == len(texts) == len(tasks)):
        raise FormatError(f"{path}: {len(spans)} segments but {len(texts)} instructions and {len(tasks)} tasks")
    return spans, texts, tasks


def read_frame(root: Path, frame: int) -> dict[str, np.ndarray]:
    path = frame_path(root, frame)
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise FormatError(f"{path} not found: the annotations name frame {frame}; is the split complete?") from None
    except (ValueError, OSError) as err:
        raise FormatError(f"{path}: unreadable npz ({err})") from err


def resolve_keys(frame: dict[str, np.ndarray], args: argparse.Namespace, where: Path) -> Keys:
    """Options (or defaults) checked against the first annotated frame."""
    have = sorted(frame)
    cameras = parse_cameras(args.camera or [], DEFAULT_CAMERAS)
    for name, key in cameras.items():
        arr = frame.get(key)
        if arr is None or arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
            raise FormatError(f"--camera {name}={key}: not a uint8 [H, W, 3] image in {where}; its keys are {have}")
    state = tuple(k.strip() for k in args.state_keys.split(",") if k.strip())
    for key in (*state, args.action_key):
        if key not in frame:
            raise FormatError(f"key {key!r} is not in {where}; change --state-keys / --action-key (keys: {have})")
    return Keys(tuple(cameras.items()), state, args.action_key, args.gripper == "vla_scale")


def calvin_spaces(keys: Keys, action_dim: int, state_dim: int) -> Spaces:
    """CALVIN's declared spaces: the last action dim is the binary gripper command (and the last state dim when the
    state ends with robot_obs, whose last entry repeats it); 1 closed / 0 open with `--gripper vla_scale`, else
    CALVIN's +1 open / -1 close (threshold 0). rel_actions are relative, actions absolute."""
    threshold, values = (0.5, (0.0, 1.0)) if keys.remap_gripper else (0.0, (-1.0, 1.0))
    state_binary = (state_dim - 1,) if keys.state and keys.state[-1] == "robot_obs" else ()
    return Spaces(
        Space(action_dim, (action_dim - 1,), threshold, values),
        Space(state_dim, state_binary, threshold, values),
        normalization="mean_std",
        action_mode="relative" if keys.action == "rel_actions" else "absolute",
    )


def to_closed_is_one(gripper: np.ndarray) -> np.ndarray:
    """CALVIN's gripper action is +1 open / -1 close; vla_scale's is 1 closed / 0 open."""
    return (gripper < 0).astype(np.float32)


def load_episode(src: Source, keys: Keys) -> Episode:
    """Read the segment's frames (runs in a worker process)."""
    root = Path(src.root)
    frames = [read_frame(root, i) for i in range(src.start, src.end + 1)]
    for i, fr in zip(range(src.start, src.end + 1), frames, strict=True):
        missing = [k for k in (*keys.state, keys.action, *(k for _, k in keys.cameras)) if k not in fr]
        if missing:
            raise FormatError(f"{frame_path(root, i)}: no {missing} (the first frame has them)")
    state = np.stack([np.concatenate([np.ravel(fr[k]) for k in keys.state]) for fr in frames]).astype(np.float32)
    action = np.stack([np.ravel(fr[keys.action]) for fr in frames]).astype(np.float32)
    if keys.remap_gripper:
        action[:, -1] = to_closed_is_one(action[:, -1])
        if keys.state and keys.state[-1] == "robot_obs":  # its last entry is the gripper action too
            state[:, -1] = to_closed_is_one(state[:, -1])
    meta = {"source_format": "calvin", "annotation_index": src.index, "start": src.start, "end": src.end}
    if src.task:
        meta["task"] = src.task
    return Episode(
        key=f"seg{src.index:07d}",
        instruction=src.instruction,
        action=action,
        state=state,
        frames={name: [fr[key] for fr in frames] for name, key in keys.cameras},
        meta=meta,
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `python -m data_tools convert calvin`."""
    p = subparsers.add_parser(
        "calvin",
        help="a CALVIN split folder; one episode per language-annotated segment (needs --trust-pickle)",
        description=__doc__.splitlines()[0]
        + " The language annotations are a pickle; they are read only with --trust-pickle."
        " Default cameras: rgb_static → rgb_static, rgb_gripper → rgb_wrist.",
    )
    add_common_args(p)
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_HELP)
    p.add_argument("--annotations", default=ANNOTATIONS, help="relative to SRC (default: %(default)s)")
    p.add_argument(
        "--action-key", choices=("rel_actions", "actions"), default="rel_actions", help="(default: %(default)s)"
    )
    p.add_argument("--state-keys", default="robot_obs", help="comma-separated to concatenate (default: %(default)s)")
    p.add_argument(
        "--gripper",
        choices=("vla_scale", "keep"),
        default="vla_scale",
        help="vla_scale: map CALVIN's gripper (+1 open / -1 close, last dim of the action and of robot_obs) to "
        "1 closed / 0 open, the convention the trainer and the policy use; keep: store CALVIN's values "
        "(default: %(default)s)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    opts = ConvertOptions.from_args(args)
    root = Path(opts.src)
    if not root.is_dir():
        raise FormatError(f"{root} is not a folder; SRC must be a CALVIN split folder such as task_D_D/training")
    spans, texts, tasks = load_annotations(root / args.annotations, args.trust_pickle)
    bad = next(((s, e) for s, e in spans if e < s), None)
    if bad:
        raise FormatError(f"{root / args.annotations}: segment {bad} ends before it starts")
    sources = [
        Source(str(root), i, s, e, text, task)
        for i, ((s, e), text, task) in enumerate(zip(spans, texts, tasks, strict=True))
    ]
    if not sources:
        raise FormatError(f"{root / args.annotations} lists no segments")
    first = read_frame(root, sources[0].start)
    keys = resolve_keys(first, args, frame_path(root, sources[0].start))
    state_dim = sum(np.ravel(first[k]).size for k in keys.state)
    spaces = calvin_spaces(keys, np.ravel(first[keys.action]).size, state_dim)
    settings = {
        "format": "calvin",
        "annotations": args.annotations,
        "cameras": dict(keys.cameras),
        "state": list(keys.state),
        "action": keys.action,
        "gripper": args.gripper,
    }
    name = f"calvin_{root.resolve().parent.name}_{root.resolve().name}"
    manifest = convert(sources, partial(load_episode, keys=keys), opts, name, settings, spaces=spaces)
    report(manifest, opts.out)
    return 0
