"""The simulation driver's check of the user's label column, before Ray starts.

A label outside `data.labels` would otherwise surface as tracebacks from every Ray
worker that meets it, and labels that differ only in case or surrounding space
("Cardiology", "cardiology ") would silently become separate classes. Unlike a
site's messages, these name the value: the driver reads the user's own file on the
user's own machine, before anything runs, and the value is what the user must fix.
"""

from __future__ import annotations

from fedlora.text_data import DataError, row_place


def spelling(name: str) -> str:
    """What two label names that differ only in case or surrounding space share."""
    return name.strip().casefold()


def check_labels(rows: list[dict], column: str, labels: list[str], source: str) -> None:
    """Every row's label is one of `labels` (data.labels) when that lists any; without
    it, no two of the file's labels differ only in case or surrounding space. Raises
    DataError naming the row (and the file's line), the column and the value."""
    if labels:
        known = set(labels)
        by_spelling = {spelling(name): name for name in labels}
        for index, row in enumerate(rows):
            name = str(row[column])
            if name not in known:
                near = by_spelling.get(spelling(name))
                hint = f"; did you mean {near!r}?" if near is not None else ""
                raise DataError(f"data file {source}: {row_place(rows, index)}: column {column!r} has {name!r}, "
                                f"which is not one of data.labels ({', '.join(labels)}){hint}")
        return
    first: dict[str, tuple[str, int]] = {}  # spelling -> (the first name seen, its row)
    for index, row in enumerate(rows):
        name = str(row[column])
        seen = first.setdefault(spelling(name), (name, index))
        if seen[0] != name:
            raise DataError(f"data file {source}: column {column!r} has {seen[0]!r} at {row_place(rows, seen[1])} and "
                            f"{name!r} at {row_place(rows, index)}, which differ only in case or surrounding space; "
                            f"make them one label in the file, or list both in data.labels to keep them apart")
