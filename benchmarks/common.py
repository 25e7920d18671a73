"""What the benchmark scripts share: JSON-line rows and table cells."""
import json


def emit(row: dict, out_path=None) -> None:
    """Print `row` as one JSON line and, with out_path, append the line to that file."""
    line = json.dumps(row)
    print(line, flush=True)
    if out_path:
        with open(out_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def fmt(value, spec: str = "") -> str:
    """A markdown table cell: '-' for a missing value, else format(value, spec)."""
    return "-" if value is None else format(value, spec)
