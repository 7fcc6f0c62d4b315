"""The machine's process table, for tests that check what a launcher started and stopped."""

from __future__ import annotations

import subprocess

Row = tuple[int, int, str, str]  # (ppid, pgid, stat, args)


def ps_table() -> dict[int, Row]:
    """pid → (ppid, pgid, stat, args) for every process, via ``ps``."""
    out = subprocess.run(
        ["ps", "-ww", "-eo", "pid=,ppid=,pgid=,stat=,args="], capture_output=True, text=True,
        check=True,
    ).stdout
    table = {}
    for line in out.splitlines():
        pid, ppid, pgid, stat, *args = line.split(maxsplit=4)
        table[int(pid)] = (int(ppid), int(pgid), stat, args[0] if args else "")
    return table


def process_tree(root: int, *, include_root: bool = True) -> dict[int, Row]:
    """``root`` (if alive and ``include_root``) and all its live descendants."""
    table = ps_table()
    found = {root: table[root]} if include_root and root in table else {}
    stack = [root]
    while stack:
        pid = stack.pop()
        for child, row in table.items():
            if row[0] == pid and child not in found:
                found[child] = row
                stack.append(child)
    return found
