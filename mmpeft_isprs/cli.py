"""``mmpeft-isprs``: a thin command line over the experiment configs.

Subcommands::

    mmpeft-isprs train CONFIG [key=value ...] [--resume | --overwrite] [--max-steps N]
    mmpeft-isprs eval CONFIG --weights best.safetensors [key=value ...] [--out DIR] [--subsets]
    mmpeft-isprs predict --weights W --optical FILE|DIR ... [--dsm FILE|DIR ...] [--input NAME=DIR ...] --out DIR
    mmpeft-isprs demo [--checkpoint sam_vit_b_01ec64.pth] [--quick] [--out DIR] [--resume [DIR] | --overwrite] [key=value ...]
    mmpeft-isprs generate-synthetic ROOT [--num-tiles 19] [--tile-size 512] [--seed 0]
    mmpeft-isprs list-configs
    mmpeft-isprs help [TOPIC [SECTION]]

CONFIG is a YAML file or the name of a bundled config (``list-configs``). Overrides are dotted
keys with YAML values (``train.lr=0.005``, ``model.modalities=[optical]``); unknown keys,
wrong types, missing files and data problems are reported before anything trains, as one line
``error: ...`` and exit status 2. Under ``torchrun`` train and eval run on every rank.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]

EXAMPLES = """examples:
  mmpeft-isprs demo                                   # synthetic data, CPU, about 10 minutes
  mmpeft-isprs train vaihingen_mmadapter_vit_b data.root=/data/vaihingen
  mmpeft-isprs train vaihingen_mmadapter_vit_b --resume
  torchrun --nproc_per_node 4 -m mmpeft_isprs train potsdam_mmlora_vit_l
  mmpeft-isprs eval vaihingen_mmadapter_vit_b --weights runs/vaihingen_mmadapter_vit_b/best.safetensors
  mmpeft-isprs predict --weights best.safetensors --optical top/ --dsm dsm/ --out predictions/
  mmpeft-isprs help isprs                             # the guide (help lists every page)
"""


DEMO_HELP = (
    "Generate the synthetic Vaihingen-layout data, train a small MFNet on optical+DSM and on optical "
    "alone (configs/demo.yaml), score both on the synthetic test tiles, write colour maps and print "
    "the per-class tables side by side with the mIoU gain from the DSM."
)


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted config overrides, values in YAML (train.lr=0.005)"
    )


def _add_predict(sub: Any) -> None:
    """The ``predict`` sub-parser."""
    p = sub.add_parser("predict", help="label new tiles", description="Index and colour maps for tiles of any size.")
    p.add_argument("--weights", required=True, help="best.safetensors written by training")
    p.add_argument(
        "--optical",
        nargs="+",
        action="extend",
        default=[],
        help="optical image files or folders (the model's first modality); repeated: all of them",
    )
    p.add_argument(
        "--dsm",
        nargs="*",
        action="extend",
        default=[],
        help="DSM files or folders (paired by name or tile number); repeated: all of them",
    )
    p.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="files or a folder of modality NAME (one per modality: --input nir=4_Ortho_RGBIR/; repeated: all of them)",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--stride", type=int, default=128, help="window stride (default 128; the paper used 32)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument(
        "--mode", choices=("average", "logit_sum"), default="average", help="how overlapping windows combine"
    )
    p.add_argument("--tta-flip", action="store_true", help="average over flipped windows as well")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast precision")
    p.add_argument("--bands", default=None, help="optical bands to use, e.g. 0,1,2 (for 4-band tiles)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--checkpoint", default=None, help="the SAM file the weights were trained from, if it moved")
    p.add_argument("--cog", action="store_true", help="GeoTIFF inputs: write Cloud-Optimized GeoTIFFs (needs rasterio)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (one sub-parser per command)."""
    parser = argparse.ArgumentParser(
        prog="mmpeft-isprs",
        description="MFNet on ISPRS Vaihingen/Potsdam, MMHunan and your own tiles.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train from a config", description="Train an MFNet (writes into train.run_dir).")
    p.add_argument("config", help="YAML file or bundled config name (see list-configs)")
    _add_overrides(p)
    p.add_argument("--resume", action="store_true", help="continue from <run_dir>/last.pt (same as train.resume=true)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an earlier run in run_dir (same as train.overwrite=true)"
    )
    p.add_argument(
        "--max-steps", type=int, default=None, help="stop after this many steps in total (checkpoint written)"
    )

    p = sub.add_parser(
        "eval", help="score weights on the test tiles", description="Sliding-window evaluation of whole tiles."
    )
    p.add_argument("config", help="YAML file or bundled config name (data and eval sections are used)")
    _add_overrides(p)
    p.add_argument("--weights", required=True, help="best.safetensors (or any file written by training)")
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default <run_dir>/eval_<split>_stride<S>_<mode>_<labels>[...]: one per protocol)",
    )
    p.add_argument(
        "--subsets",
        action="store_true",
        help="score every non-empty subset of the model's modalities (2^M-1: optical+dsm, optical, dsm for two), side by side",
    )

    _add_predict(sub)

    p = sub.add_parser("demo", help="optical+DSM vs optical on synthetic data (CPU)", description=DEMO_HELP)
    p.add_argument(
        "--checkpoint", default=None, help="an official SAM file (sam_vit_b_01ec64.pth) instead of random weights"
    )
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tiny data and model)")
    p.add_argument(
        "--out", default=None, help="folder for the data and both runs (default: a new runs/demo/<date>-<time>)"
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="FOLDER",
        help="continue an interrupted demo (default: the latest under runs/demo)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the demo in --out")
    _add_overrides(p)

    p = sub.add_parser("generate-synthetic", help="write the synthetic Vaihingen-layout data set")
    p.add_argument("root", help="output folder")
    p.add_argument("--num-tiles", type=int, default=19, help="3..19 tiles (19: 12 train, 3 val, 4 test)")
    p.add_argument("--tile-size", type=int, default=512, help="tile side in pixels")
    p.add_argument("--seed", type=int, default=0, help="scene seed")
    p.add_argument("--overwrite", action="store_true", help="regenerate even if the folder holds a data set")

    sub.add_parser("list-configs", help="list the bundled configs")

    p = sub.add_parser("help", help="print the documentation (topics, a page, a section)")
    p.add_argument("topic", nargs="?", help="a page (isprs, quickstart, ...); none: list the pages")
    p.add_argument("section", nargs="?", help="only the first section whose heading contains this text")
    return parser


def _train(args: argparse.Namespace) -> None:
    from .config import load_config
    from .train import train

    flags = [*(["train.resume=true"] if args.resume else []), *(["train.overwrite=true"] if args.overwrite else [])]
    cfg = load_config(args.config, [*args.overrides, *flags])
    again = ["mmpeft-isprs", "train", args.config, *args.overrides]
    with _interruptible(Path(cfg.train.run_dir) / "last.pt", [*again, "--resume"], [*again, "--overwrite"]):
        train(cfg, max_steps=args.max_steps)


def _eval(args: argparse.Namespace) -> None:
    from .distributed import init_distributed
    from .evaluate import eval_config, evaluate
    from .task import read_weights

    if not Path(args.weights).is_file():
        raise FileNotFoundError(f"--weights: {args.weights} not found")
    weights = read_weights(args.weights)  # the one read of the file: config, model and metrics all use it
    notes: list[str] = []
    cfg = eval_config(args.config, weights, args.overrides, log=notes.append)  # printed (and logged) by evaluate
    info = init_distributed(cfg.train.device, cfg.train.threads)
    evaluate(cfg, weights, subsets=args.subsets, info=info, out_dir=args.out, notes=notes)


def _predict(args: argparse.Namespace) -> None:
    from .config import ConfigError
    from .distributed import resolve_device
    from .predict import PredictOptions, predict_files

    try:
        bands = tuple(int(b) for b in args.bands.split(",")) if args.bands else None
    except ValueError:
        raise ConfigError(f"--bands: expected comma-separated band numbers such as 0,1,2, got {args.bands!r}") from None
    inputs: dict[str, list[str]] = {}
    for item in args.input:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--input: expected NAME=PATH (e.g. nir=4_Ortho_RGBIR/), got {item!r}")
        inputs.setdefault(name, []).append(path)  # repeated: pooled, as --optical A --optical B
    for flag, given in (("--optical", args.optical), ("--dsm", args.dsm)):
        name = flag.lstrip("-")
        if given and name in inputs:
            raise ConfigError(
                f"modality {name!r} is given twice, by {flag} and --input {name}=: give it once "
                "(repeat one flag to pool several files or folders)"
            )
    if not args.optical and not inputs:
        raise ConfigError(
            "predict: give the inputs (--optical FILE|DIR ..., --dsm ..., or --input NAME=PATH per modality)"
        )
    opts = PredictOptions(
        args.stride,
        args.batch_size,
        args.mode,
        args.tta_flip,
        args.amp,
        bands,
        progress=sys.stderr.isatty(),
        checkpoint=args.checkpoint,
        cog=args.cog,
    )
    files = predict_files(
        args.weights, args.optical, args.dsm, args.out, opts, device=resolve_device(args.device), inputs=inputs
    )
    print(f"wrote {len(files)} files to {args.out}")


def _demo(args: argparse.Namespace) -> None:
    from .demo import latest_demo_dir, new_demo_dir, run_demo

    resume = args.resume is not None
    out = Path(
        args.resume
        if resume and args.resume != "latest"
        else args.out or (latest_demo_dir() if resume else new_demo_dir())
    )
    cmd = ["mmpeft-isprs", "demo", "--resume", str(out)]
    with _interruptible(out / "demo.json", cmd, cmd):
        run_demo(
            out,
            checkpoint=args.checkpoint,
            quick=args.quick,
            overrides=args.overrides,
            resume=resume,
            overwrite=args.overwrite,
        )


class Interrupted(Exception):
    """Ctrl-C during a command; the message names the command that continues."""


@contextlib.contextmanager
def _interruptible(saved: Path, resume: list[str], restart: list[str]) -> Iterator[None]:
    """Turn Ctrl-C into :class:`Interrupted` naming the exact command to continue (or restart)."""
    try:
        yield
    except KeyboardInterrupt:
        if saved.is_file():
            raise Interrupted(
                f"interrupted; the last checkpoint is intact. Continue with:\n  {shlex.join(resume)}"
            ) from None
        raise Interrupted(
            f"interrupted before anything was saved. Start again with:\n  {shlex.join(restart)}"
        ) from None


def _generate(args: argparse.Namespace) -> None:
    from .data import generate_synthetic_vaihingen

    manifest = generate_synthetic_vaihingen(
        args.root, args.num_tiles, args.tile_size, args.seed, overwrite=args.overwrite
    )
    splits = manifest["splits"]
    print(f"synthetic Vaihingen in {args.root}: " + ", ".join(f"{k} {' '.join(v)}" for k, v in splits.items()))


def _list_configs(_: argparse.Namespace) -> None:
    from .config import bundled_configs, resolve_config_path

    for name in bundled_configs():
        path = resolve_config_path(name)
        first = path.read_text().splitlines()[0].lstrip("# ").strip()
        print(f"{name:<28} {first}")


COMMANDS = {
    "train": _train,
    "eval": _eval,
    "predict": _predict,
    "demo": _demo,
    "generate-synthetic": _generate,
    "list-configs": _list_configs,
}


def _format_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    """``DataWarning: <message>`` for the application's data warnings (the message names the file,
    tile and pixels); other warnings in Python's own format."""
    from .data import DataWarning

    if issubclass(category, DataWarning):
        return f"{category.__name__}: {message}\n"
    return _PYTHON_FORMAT(message, category, filename, lineno, line)


_PYTHON_FORMAT = warnings.formatwarning

ISPRS_EXTRA = {"yaml": "PyYAML", "tifffile": "tifffile", "PIL": "Pillow", "tqdm": "tqdm", "matplotlib": "matplotlib"}
"""The modules of the ``isprs`` extra (``pip install 'mmpeft[isprs]'``) and their packages."""


def _missing_extra(exc: ModuleNotFoundError) -> int:
    """``error:`` naming the missing package of the isprs extra and the command that installs it."""
    package = ISPRS_EXTRA.get((exc.name or "").split(".")[0])
    if package is None:
        raise exc
    print(
        f"error: {package} (module {exc.name!r}) is missing: the mmpeft-isprs command needs the isprs extra; "
        "install it with: pip install 'mmpeft[isprs]' (or, in a source checkout: pip install -e '.[isprs]')",
        file=sys.stderr,
    )
    return 2


def _quiet_broken_pipe() -> int:
    """The output was closed early (``mmpeft-isprs help | head``): stop quietly, as a Unix tool does."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # Python flushes stdout at exit: into /dev/null, not a traceback
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mmpeft-isprs`` and ``python -m mmpeft_isprs``; returns the exit status."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines reach a redirected log at once
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # --help exits here, before torch is imported
    # overrides may also follow options (eval CONFIG --weights W key=value ...)
    bad = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.command == "help":  # before torch and the isprs extra: works on any install
        from .help import show_help

        try:
            return show_help(args.topic, args.section)
        except BrokenPipeError:
            return _quiet_broken_pipe()
    try:
        from .config import ConfigError
        from .data import DataError
    except ModuleNotFoundError as exc:
        return _missing_extra(exc)

    default_format = warnings.formatwarning
    warnings.formatwarning = _format_warning  # data warnings as the docs show them: no source path or code line
    try:
        COMMANDS[args.command](args)
    except (ConfigError, DataError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(exc, file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        return _missing_extra(exc)
    except BrokenPipeError:
        return _quiet_broken_pipe()
    finally:
        from .distributed import shutdown

        warnings.formatwarning = default_format
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
