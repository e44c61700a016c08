"""``normattn`` command line: ``bench``, ``train``, ``sample``, ``compare``."""

from __future__ import annotations

import sys

COMMANDS = {
    "bench": ("normattn.bench.cli", "time forward, backward and JVP of every backend"),
    "train": ("normattn.gpt.cli", "train a character-level GPT with any attention"),
    "sample": ("normattn.gpt.cli", "sample text from a trained checkpoint"),
    "compare": ("normattn.gpt.cli", "train one GPT per attention and compare their losses"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: normattn {" + ",".join(COMMANDS) + "} [options]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nnormattn: error: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[0], argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
