"""Entry point of the ``nvfp4kit`` command: imports each command module, then runs the app.

Each command lives in its own small module (parse options, call a library function, print).
"""

from __future__ import annotations

import importlib

from .app import app

# one module per command (or command group); each registers itself on ``app``
COMMAND_MODULES = (
    "nvfp4kit.cli.model_cmd",
    "nvfp4kit.cli.formats_cmd",
    "nvfp4kit.cli.quantize_cmd",
    "nvfp4kit.cli.eval_cmd",
    "nvfp4kit.cli.inspect_cmd",
    "nvfp4kit.cli.demo_cmd",
    "nvfp4kit.cli.convert_cmd",
    "nvfp4kit.cli.qat_cmd",
    "nvfp4kit.cli.train_cmd",
)

for _name in COMMAND_MODULES:
    importlib.import_module(_name)


def main() -> None:
    from .. import progress
    from ..optional import MissingDependency

    progress.use_terminal()
    try:
        app()
    except MissingDependency as e:  # an optional module the command needs: one line, no traceback
        import sys

        command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
        print(f"error: {e.for_command(f'nvfp4kit {command}'.strip())}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
