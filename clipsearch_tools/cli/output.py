"""How the CLI talks to the user: JSON on stdout with --json, else short tables; notes on stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence


def emit_json(document) -> None:
    json.dump(document, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def note(message: str) -> None:
    print(message, file=sys.stderr)


def table(headers: Sequence[str], rows: Sequence[Sequence], right: Sequence[int] = ()) -> None:
    """Prints aligned columns; the columns whose positions are in `right` are right-aligned (numbers)."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max([len(header)] + [len(row[i]) for row in cells]) for i, header in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            value.rjust(widths[i]) if i in right else value.ljust(widths[i]) for i, value in enumerate(values)
        ).rstrip()

    print(line(headers))
    for row in cells:
        print(line(row))


def random_weights_note(model_id: str) -> str:
    return f"note: model {model_id} has RANDOM weights (a stand-in for CLIP): results are not semantic"
