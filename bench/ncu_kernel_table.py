#!/usr/bin/env python3
"""bench/ncu_kernel_table.py NCU_CSV [--steps N] [--top K] [--md FILE]

Per-kernel time table from Nsight Compute's CSV output of one run, e.g. a few training steps:

    ncu --csv --print-units base --metrics gpu__time_duration.sum --cache-control none --clock-control none \\
        ./moda train ... --steps 2 > ncu.csv
    python3 bench/ncu_kernel_table.py ncu.csv --steps 2

Kernels are grouped by name (the demangled name without its argument list, template arguments kept); the
table gives launches and milliseconds per step (totals divided by --steps), each group's share of the kernel
time, and its mean duration per launch. Lines before the CSV header (the application's output, ncu's ==PROF==
lines) are skipped. Durations in any unit ncu prints (nsecond, usecond, msecond, second) are read."""
import csv
import re
import sys

UNITS = {"nsecond": 1e-6, "ns": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0, "ms": 1.0, "second": 1e3, "s": 1e3}
NAME_COLS = ("Kernel Name", "Function Name", "Demangled Name")


def short_name(name):
    """'void mg_rows<4, true>(const float *, int)' -> 'mg_rows<4, true>'; names without arguments are kept"""
    n = name.strip()
    if n.startswith("void "):
        n = n[5:]
    depth = 0
    for i, ch in enumerate(n):  # the argument list is the first '(' outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            return n[:i].strip()
    return n


def read_rows(path):
    with open(path, errors="replace") as f:
        lines = f.read().splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
    if start is None:
        raise SystemExit("ncu_kernel_table.py: no CSV header (a line starting with \"ID\") in %s" % path)
    rows = list(csv.DictReader(lines[start:]))
    if not rows:
        return []
    name_col = next((c for c in NAME_COLS if c in rows[0]), None)
    if name_col is None or "Metric Value" not in rows[0]:
        raise SystemExit("ncu_kernel_table.py: %s has no kernel name or metric value column" % path)
    out = []
    for r in rows:
        if r.get("Metric Name", "gpu__time_duration.sum") != "gpu__time_duration.sum":
            continue
        if not r.get(name_col) or not r.get("Metric Value"):  # a stray line after the table
            continue
        unit = (r.get("Metric Unit") or "nsecond").strip()
        if unit not in UNITS:
            raise SystemExit("ncu_kernel_table.py: unknown duration unit %r" % unit)
        try:
            v = float(re.sub(r"[,\s]", "", r["Metric Value"]))
        except ValueError:
            continue
        out.append((short_name(r[name_col]), v * UNITS[unit]))
    return out


def table(rows, steps, top):
    groups = {}
    for name, ms in rows:
        g = groups.setdefault(name, [0, 0.0])
        g[0] += 1
        g[1] += ms
    total = sum(g[1] for g in groups.values())
    order = sorted(groups.items(), key=lambda kv: -kv[1][1])
    lines = ["| kernel | launches / step | ms / step | share | mean us / launch |", "| --- | --- | --- | --- | --- |"]
    for name, (n, ms) in order[:top]:
        lines.append("| `%s` | %g | %.3f | %.1f %% | %.1f |" % (name, n / steps, ms / steps, 100 * ms / total if total else 0,
                                                             1e3 * ms / n))
    rest = order[top:]
    if rest:
        n = sum(g[0] for _, g in rest)
        ms = sum(g[1] for _, g in rest)
        lines.append("| (%d more kernels) | %g | %.3f | %.1f %% | |" % (len(rest), n / steps, ms / steps,
                                                                   100 * ms / total if total else 0))
    lines.append("| **all** | %g | %.3f | 100 %% | |" % (sum(g[0] for g in groups.values()) / steps, total / steps))
    return "\n".join(lines)


def main(argv):
    path, steps, top, md = None, 1.0, 30, None
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("--steps", "--top", "--md") and i + 1 < len(argv):
            if a == "--steps":
                steps = float(argv[i + 1])
            elif a == "--top":
                top = int(argv[i + 1])
            else:
                md = argv[i + 1]
            i += 2
        elif a in ("-h", "--help"):
            print(__doc__)
            return 0
        elif path is None and not a.startswith("--"):
            path = a
            i += 1
        else:
            raise SystemExit("ncu_kernel_table.py: unexpected argument %s" % a)
    if path is None or steps <= 0 or top < 1:
        raise SystemExit("usage: ncu_kernel_table.py NCU_CSV [--steps N > 0] [--top K >= 1] [--md FILE]")
    rows = read_rows(path)
    if not rows:
        print("no kernel durations in %s" % path)
        return 1
    text = table(rows, steps, top)
    print(text)
    if md:
        with open(md, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
