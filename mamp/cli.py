"""The `mamp` command: `mamp quantize`, `mamp eval`, `mamp serve`, each the same program as its `python -m` form
(python -m mamp.quantizer, python -m mamp.quantizer.eval, python -m mamp.server), with the same flags."""
from __future__ import annotations

import sys

USAGE = """usage: mamp {quantize,eval,serve} [ARGS...]

  mamp quantize MODEL --out DIR [...]   quantize a Llama-family HF model into a packed mamp checkpoint
  mamp eval CHECKPOINT --text FILE [...] perplexity of a checkpoint (packed or HF) on a text file
  mamp serve --model CHECKPOINT [...]    OpenAI-compatible server with continuous batching and metrics

`mamp COMMAND --help` lists a command's flags."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "quantize":
        from mamp.quantizer.__main__ import main as quantize
        return quantize(rest, prog="mamp quantize")
    if command == "eval":
        from mamp.quantizer.eval import main as evaluate
        return evaluate(rest, prog="mamp eval")
    if command == "serve":
        from mamp.server.__main__ import main as serve
        serve(rest, prog="mamp serve")
        return 0
    if command in ("-V", "--version"):
        from mamp import __version__
        print(f"mamp {__version__}")
        return 0
    print(f"error: unknown command {command!r} (choose quantize, eval or serve)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
