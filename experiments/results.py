#!/usr/bin/env python3
"""experiments/results.py [RUNS_DIR] [--png FILE] [--md FILE]

Tabulates the arms of experiments/run_arms.sh: the final validation loss of each run, per arm (norm, depth) the
mean over seeds and the spread (max - min), and the gap of every MoDA arm to the same norm's baseline against
that spread; writes a PNG of the validation curves (no dependencies: a small rasterizer, one colour per depth
source, solid post-norm, lighter pre-norm)."""
import json
import os
import struct
import sys
import zlib

COLOURS = {"none": (40, 40, 40), "attn": (30, 110, 220), "attn+ffn": (220, 60, 40)}


def arm_of(name):
    """post_attnffn_s2 -> ("post", "attn+ffn")"""
    norm, rest = name.split("_", 1)
    depth = rest.rsplit("_s", 1)[0]
    return norm, "attn+ffn" if depth == "attnffn" else depth


def read_run(path):
    cfg, val, train = None, [], []
    with open(path) as f:
        for line in f:
            try:
                o = json.loads(line)
            except ValueError:
                continue
            if "config" in o:
                cfg = o
            elif "val_loss" in o:
                val.append((o["step"], o["val_loss"]))
            elif "loss" in o:
                train.append((o["step"], o["loss"]))
    return cfg, val, train


def png(path, w, h, pixels):
    raw = b"".join(b"\x00" + bytes(pixels[y * w * 3:(y + 1) * w * 3]) for y in range(h))

    def chunk(t, d):
        c = struct.pack(">I", len(d)) + t + d
        return c + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) +
                chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def plot(path, curves, w=900, h=560):
    px = bytearray([255] * (w * h * 3))
    pts = [p for c in curves for p in c[1]]
    if not pts:
        return
    x0, x1 = 0, max(p[0] for p in pts)
    ys = sorted(p[1] for p in pts)
    y0, y1 = ys[0], ys[int(0.98 * (len(ys) - 1))]  # the first evaluations are far above the rest
    m = 40

    def put(x, y, col):
        if 0 <= x < w and 0 <= y < h:
            px[(y * w + x) * 3:(y * w + x) * 3 + 3] = bytes(col)

    for x in range(m, w - m):
        put(x, h - m, (0, 0, 0))
    for y in range(m, h - m):
        put(m, y, (0, 0, 0))
    for i in range(1, 10):  # light grid: tenths of the loss range
        gy = int(h - m - i * (h - 2 * m) / 10)
        for x in range(m, w - m, 4):
            put(x, gy, (210, 210, 210))
    for col, c in curves:
        prev = None
        for s, v in c:
            x = int(m + (s - x0) / max(x1 - x0, 1) * (w - 2 * m))
            y = int(h - m - (min(v, y1) - y0) / max(y1 - y0, 1e-9) * (h - 2 * m))
            if prev:
                n = max(abs(x - prev[0]), abs(y - prev[1]), 1)
                for k in range(n + 1):
                    xx = prev[0] + (x - prev[0]) * k // n
                    yy = prev[1] + (y - prev[1]) * k // n
                    for dx in (0, 1):
                        put(xx + dx, yy, col)
                        put(xx, yy + dx, col)
            prev = (x, y)
    png(path, w, h, px)
    return y0, y1


def main():
    args = sys.argv[1:]
    root = args[0] if args and not args[0].startswith("--") else "experiments/runs"
    out_png = args[args.index("--png") + 1] if "--png" in args else os.path.join(root, "val_curves.png")
    out_md = args[args.index("--md") + 1] if "--md" in args else None
    runs = {}
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        p = os.path.join(root, name, "log.jsonl")
        if os.path.exists(p):
            runs[name] = read_run(p)
    if not runs:
        print("no runs under", root)
        return 1
    arms = {}
    for name, (cfg, val, train) in runs.items():
        norm, depth = arm_of(name)
        if val:
            arms.setdefault((norm, depth), []).append((name, val[-1][0], val[-1][1], train[-1][0] if train else 0))
    lines = ["| arm | runs (seed: final val loss at step) | mean | spread (max-min) | gap to baseline |",
             "| --- | --- | --- | --- | --- |"]
    means = {k: sum(r[2] for r in v) / len(v) for k, v in arms.items()}
    for (norm, depth), rs in sorted(arms.items()):
        ls = [r[2] for r in rs]
        spread = max(ls) - min(ls) if len(ls) > 1 else float("nan")
        base = means.get((norm, "none"))
        gap = "" if depth == "none" or base is None else "%+.4f" % (means[(norm, depth)] - base)
        lines.append("| %s-norm %s | %s | %.4f | %s | %s |" % (
            norm, depth, ", ".join("%s: %.4f @%d" % (r[0].rsplit("_", 1)[1], r[2], r[1]) for r in rs),
            means[(norm, depth)], "%.4f" % spread if spread == spread else "n/a (1 seed)", gap))
    text = "\n".join(lines)
    print(text)
    curves = []
    for name, (cfg, val, train) in sorted(runs.items()):
        norm, depth = arm_of(name)
        col = COLOURS.get(depth, (120, 120, 120))
        if norm == "pre":
            col = tuple(int(c + (255 - c) * 0.55) for c in col)
        curves.append((col, val))
    rng = plot(out_png, curves)
    print("wrote %s (validation loss %.3f .. %.3f; black none, blue attn, red attn+ffn; pale = pre-norm)" %
          (out_png, rng[0], rng[1]))
    if out_md:
        with open(out_md, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
