"""``normattn train | sample | compare``: argument parsing and one-line errors (exit code 2).

Every ``GPTConfig`` and ``TrainConfig`` field is also an option, ``--name value`` (``--max-iters`` and
``--max_iters`` both work), parsed by the field's type.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .config import (
    PRESETS,
    GPTConfig,
    TrainConfig,
    UsageError,
    attention_variants,
    build_configs,
    field_names,
)

DEFAULT_PRESET = "shakespeare-char"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _common(parser: argparse.ArgumentParser) -> None:
    presets = "; ".join(f"{name}: {preset.description}" for name, preset in PRESETS.items())
    parser.add_argument("--preset", default=DEFAULT_PRESET, help=f"{presets} (default: {DEFAULT_PRESET})")
    parser.add_argument("--data", default=None, help="a UTF-8 text file (default: Tiny Shakespeare)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its ckpt.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished or stopped run in --out")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar or log")
    config_fields = parser.add_argument_group("config fields (any GPTConfig or TrainConfig field)")
    for cls in (GPTConfig, TrainConfig):
        for name in field_names(cls):
            spellings = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
            config_fields.add_argument(*spellings, dest=f"field:{name}", default=None, metavar="VALUE")


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    return {
        key.split(":", 1)[1]: value
        for key, value in vars(args).items()
        if key.startswith("field:") and value is not None
    }


def _train_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="normattn train", description="Train a character-level GPT.", allow_abbrev=False)
    parser.add_argument(
        "--attention", default=None, help=f"one of {', '.join(attention_variants())} (default: the preset's)"
    )
    parser.add_argument("--out", default=None, help="run folder (default: runs/<preset>/<attention>)")
    _common(parser)
    return parser


def _compare_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="normattn compare", description="Train one GPT per attention and compare.", allow_abbrev=False
    )
    parser.add_argument(
        "--attentions",
        default=",".join(attention_variants()),
        help=f"comma-separated, from {', '.join(attention_variants())} (default: all)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="train each attention with this many seeds (seed, seed+1, ...) and report mean and std",
    )
    parser.add_argument("--out", default=None, help="folder (default: runs/compare-<preset>)")
    _common(parser)
    return parser


def _sample_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="normattn sample", description="Sample text from a checkpoint.", allow_abbrev=False)
    parser.add_argument(
        "--ckpt", required=True, help="a run folder (its best.pt, else ckpt.pt) or a .pt file"
    )
    parser.add_argument("--prompt", default="\n")
    parser.add_argument("--tokens", type=int, default=500, help="characters to generate")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 takes the most likely character")
    parser.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=200)
    parser.add_argument("--num-samples", "--num_samples", dest="num_samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="auto")
    return parser


def _run_options(args, out: Path):
    from .train import RunOptions

    return RunOptions(
        out=out,
        preset=args.preset,
        data=args.data,
        device=args.device,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=args.progress,
    )


def _train(argv: list[str]) -> int:
    from .train import train

    args = _train_parser().parse_args(argv)
    model_config, train_config = build_configs(args.preset, args.attention, _overrides(args))
    out = Path(args.out) if args.out else Path("runs") / args.preset / model_config.attention
    options = _run_options(args, out)
    result = train(model_config, train_config, options)
    s = result.summary
    if args.progress and s:
        print(
            f"done: {s['iters']} iterations, val loss {s['final_val_loss']:.4f} "
            f"(best {s['best_val_loss']:.4f} at {s['best_val_iter']}); {out}"
        )
    return 0


def _compare(argv: list[str]) -> int:
    try:
        from .compare import compare
    except ImportError as e:
        raise UsageError(f"compare needs pandas and matplotlib ({e}): pip install 'normattn[plot]'") from None

    args = _compare_parser().parse_args(argv)
    attentions = [a.strip() for a in args.attentions.split(",") if a.strip()]
    out = Path(args.out) if args.out else Path("runs") / f"compare-{args.preset}"
    options = _run_options(args, out)
    command = "normattn compare " + shlex.join(argv)
    text = compare(
        args.preset, attentions, _overrides(args), options, command=command.strip(), seeds=args.seeds
    )
    print(text)
    return 0


def _sample(argv: list[str]) -> int:
    from .sample import sample

    args = _sample_parser().parse_args(argv)
    texts = sample(
        args.ckpt,
        prompt=args.prompt,
        tokens=args.tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        device=args.device,
        num_samples=args.num_samples,
    )
    print("\n---------------\n".join(texts))
    return 0


COMMANDS = {"train": _train, "sample": _sample, "compare": _compare}


def main(command: str, argv: list[str]) -> int:
    """Run ``normattn <command> <argv>``; returns the exit code (2: a user error, one line on stderr)."""
    if command not in COMMANDS:
        print(f"normattn: error: unknown command {command!r}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[command](list(argv))
    except UsageError as e:
        print(f"normattn: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        print(
            "normattn: interrupted; the last checkpoint is intact (continue with --resume)", file=sys.stderr
        )
        return 130
