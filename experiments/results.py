#!/usr/bin/env python3
"""experiments/results.py [RUNS_DIR] [--md FILE] [--png FILE] [--console FILE ...]

Tabulates the arms of experiments/run_arms.sh (RUNS_DIR/<arm>/log.jsonl, default experiments/runs): the final
validation loss of each run, per arm (norm, depth) the mean over seeds, the spread and the min-max range of the
seeds, the gap of every MoDA arm to the same norm's baseline, tokens per run and throughput; then one sentence per
MoDA arm saying whether its seed range is disjoint from the baseline's, and a warning for every run whose
validation loss ended far above its own best (diverged), or a line listing the best losses where runs ended
slightly above them (over-fitting). Throughput comes from log.jsonl when a
record there carries it ("tok_s" or "throughput"), else from the trainer's console output given with --console
(run_arms.sh's "== <arm>:" headers followed by the trainer's "throughput N tok/s" line), else it is left out.

The PNG (default RUNS_DIR/val_curves.png) shows the validation curves against tokens seen, colour per depth
source, solid post-norm, dashed pre-norm, with a second panel on the last half of training. It is drawn with
matplotlib when that imports; otherwise (or with MODA_RESULTS_NO_MATPLOTLIB=1) a small built-in rasterizer draws
the same curves without text."""
import json
import os
import re
import struct
import sys
import zlib

DEPTHS = ("none", "attn", "attn+ffn")  # table and legend order
NORMS = ("post", "pre")
COLOURS = {"none": (40, 40, 40), "attn": (30, 110, 220), "attn+ffn": (220, 60, 40)}


def arm_of(name):
    """post_attnffn_s2 -> ("post", "attn+ffn")"""
    norm, rest = name.split("_", 1)
    depth = rest.rsplit("_s", 1)[0]
    return norm, "attn+ffn" if depth == "attnffn" else depth


def seed_of(name):
    return name.rsplit("_", 1)[1]


def arm_key(arm):
    norm, depth = arm
    return (NORMS.index(norm) if norm in NORMS else len(NORMS), norm,
            DEPTHS.index(depth) if depth in DEPTHS else len(DEPTHS), depth)


def read_run(path):
    """-> (config record or None, [(step, val loss)], [(step, train loss)], throughput in tok/s or None)"""
    cfg, val, train, tps = None, [], [], None
    with open(path) as f:
        for line in f:
            try:
                o = json.loads(line)
            except ValueError:
                continue
            if not isinstance(o, dict):
                continue
            if "config" in o:
                cfg = o
            elif "val_loss" in o:
                val.append((o["step"], o["val_loss"]))
            elif "loss" in o:
                train.append((o["step"], o["loss"]))
            for k in ("tok_s", "throughput"):
                if isinstance(o.get(k), (int, float)):
                    tps = float(o[k])
    return cfg, val, train, tps


def read_console(paths):
    """run_arms.sh console logs -> {arm name: tok/s} from the trainer's closing "throughput" line"""
    out, arm = {}, None
    for p in paths:
        with open(p, errors="replace") as f:
            for line in f:
                m = re.match(r"== (\S+):", line)
                if m:
                    arm = m.group(1)
                    continue
                m = re.search(r"throughput ([0-9.]+) tok/s over", line)  # after the trainer's label, if any
                if m and arm:
                    out[arm] = float(m.group(1))
    return out


def tokens_per_step(cfg):
    try:
        return int(cfg["batch"]) * int(cfg["seq"])
    except (TypeError, KeyError, ValueError):
        return None


def fmt_tokens(n):
    return "%.1f M" % (n / 1e6) if n >= 1e6 else "%.0f k" % (n / 1e3) if n >= 1e3 else "%d" % n


# --- fallback: a dependency-free PNG of the curves, without text ---

def write_png(path, w, h, pixels):
    raw = b"".join(b"\x00" + bytes(pixels[y * w * 3:(y + 1) * w * 3]) for y in range(h))

    def chunk(t, d):
        c = struct.pack(">I", len(d)) + t + d
        return c + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) +
                chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def plot_fallback(path, curves, w=900, h=560):
    """curves: [(rgb, dashed, [(x, y)])]; returns the y range drawn"""
    px = bytearray([255] * (w * h * 3))
    pts = [p for c in curves for p in c[2]]
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
    for col, dashed, c in curves:
        prev = None
        for s, v in c:
            x = int(m + (s - x0) / max(x1 - x0, 1) * (w - 2 * m))
            y = int(h - m - (min(v, y1) - y0) / max(y1 - y0, 1e-9) * (h - 2 * m))
            if prev:
                n = max(abs(x - prev[0]), abs(y - prev[1]), 1)
                for k in range(n + 1):
                    if dashed and (k // 8) % 2:
                        continue
                    xx = prev[0] + (x - prev[0]) * k // n
                    yy = prev[1] + (y - prev[1]) * k // n
                    for dx in (0, 1):
                        put(xx + dx, yy, col)
                        put(xx, yy + dx, col)
            prev = (x, y)
    write_png(path, w, h, px)
    return y0, y1


DIVERGED = 1.20  # final validation loss above 1.2x the run's best: the run blew up (not over-fitting noise)


def diverged(val):
    """val: [(x, validation loss)] of one run, in order"""
    return val[-1][1] > DIVERGED * min(v for _, v in val)


def load_matplotlib():
    if os.environ.get("MODA_RESULTS_NO_MATPLOTLIB"):
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except Exception:  # missing, or broken in this environment: the fallback still draws the curves
        return None


def plot_matplotlib(plt, path, series, xlabel, title):
    """series: [(label, depth, norm, seed, [(x, y)])]"""
    fig, (ax_all, ax_end) = plt.subplots(1, 2, figsize=(13, 5.6))
    styles = {"post": "-", "pre": "--"}
    markers = {}
    x_max = max(p[0] for s in series for p in s[4])
    half = x_max / 2
    end_pts, finals, off_scale = [], [], []
    for label, depth, norm, seed, pts in series:
        rgb = COLOURS.get(depth, (120, 120, 120))
        col = tuple(c / 255 for c in rgb)
        mk = markers.setdefault(seed, "osD^v<>"[len(markers) % 7])
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        kw = dict(color=col, linestyle=styles.get(norm, ":"), marker=mk, markersize=4, linewidth=1.6)
        ax_all.plot(xs, ys, label=label, **kw)
        tail = [p for p in pts if p[0] >= half]
        if diverged(pts):  # a diverged run would squash the zoom: left out of it, named there
            off_scale.append(label)
            continue
        end_pts += [p[1] for p in tail]
        ax_end.plot([p[0] for p in tail], [p[1] for p in tail], **kw)
        if tail:
            finals.append((tail[-1][1], tail[-1][0], col))
    ax_all.set_title("whole run")
    ax_end.set_title("last half of training (zoom)")
    for ax in (ax_all, ax_end):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(True, alpha=0.3)
    if end_pts:
        lo, hi = min(end_pts), max(end_pts)
        pad = 0.05 * max(hi - lo, 1e-3)
        ax_end.set_ylim(lo - pad, hi + pad)
        ax_end.set_xlim(half - 0.02 * x_max, x_max * 1.13)  # room for the final values
        # the final value of each curve (the number the table reports) beside its end, pushed apart so that
        # close values stay legible, with a thin line back to the point
        lo, hi = ax_end.get_ylim()
        gap = 0.035 * (hi - lo)
        placed = []
        for y, x, col in sorted(finals):
            ty = max(y, placed[-1] + gap) if placed else y
            placed.append(ty)
            ax_end.annotate("%.4f" % y, (x, y), xytext=(x + 0.03 * x_max, ty), fontsize=7, color=col, va="center",
                            arrowprops=dict(arrowstyle="-", color=col, lw=0.5, shrinkA=0, shrinkB=2))
    if off_scale:
        ax_end.text(0.02, 0.98, "not shown (diverged): " + "; ".join(off_scale), transform=ax_end.transAxes,
                    fontsize=7, va="top", color="0.3")
    ax_all.legend(fontsize=8, title="norm, depth sources, seed (final loss)", title_fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def seed_verdict(norm, depth, ls, base):
    """one sentence: is this arm's seed range disjoint from the same norm's baseline range?"""
    name = "%s-norm %s" % (norm, depth)
    if base is None:
        return "%s: no %s-norm baseline run to compare with." % (name, norm)
    gap = sum(ls) / len(ls) - sum(base) / len(base)
    if len(ls) < 2 or len(base) < 2:
        return ("%s: %+.4f against the baseline from %d and %d seed(s): with no seed spread measured on both "
                "sides, whether this gap exceeds seed-to-seed variation is not shown." % (
                    name, gap, len(ls), len(base)))
    lo, hi, blo, bhi = min(ls), max(ls), min(base), max(base)
    ranges = "[%.4f, %.4f] against [%.4f, %.4f]" % (lo, hi, blo, bhi)
    caveat = "%d and %d seeds show only that the gap exceeds this seed spread, not that it is significant" % (
        len(ls), len(base))
    if hi < blo:
        return "%s beats the baseline beyond the seed spread (%+.4f; ranges %s are disjoint; %s)." % (
            name, gap, ranges, caveat)
    if lo > bhi:
        return "%s loses to the baseline beyond the seed spread (%+.4f; ranges %s are disjoint; %s)." % (
            name, gap, ranges, caveat)
    return "%s is within the seed spread of the baseline (%+.4f; ranges %s overlap): no difference shown." % (
        name, gap, ranges)


ROSE = 0.005  # nats/byte above the run's best at the end: worth a line (over-fitting, or a noisy schedule end)


def run_health(runs):
    """lines on runs whose validation loss ended well above their own best: a diverged run makes its arm's
    gap a measure of training stability, not of the model; a mild rise at the end (over-fitting, e.g. more
    than one pass over the data) makes the best loss worth reading beside the final one"""
    out, rose = [], []
    for name, (cfg, val, train, tps) in sorted(runs.items(), key=lambda kv: (arm_key(arm_of(kv[0])), kv[0])):
        if not val:
            continue
        bstep, best = min(val, key=lambda p: p[1])
        fstep, final = val[-1]
        if diverged(val):
            out.append("Warning: %s diverged: validation loss %.4f at step %d, %.4f at step %d (+%.0f %%). Gaps "
                       "to or from its arm measure training stability at this learning rate, not the model." % (
                           name, best, bstep, final, fstep, 100 * (final / best - 1)))
        elif final - best > ROSE:
            rose.append((final - best, name, best, bstep))
    if rose:
        rose.sort(reverse=True)
        out.append("The validation loss ended above its own best in %d of %d runs (largest: %s, %+.4f from %.4f at "
                   "step %d): over-fitting or noise at the end of the schedule; the best losses: %s." % (
                       len(rose), len(runs), rose[0][1], rose[0][0], rose[0][2], rose[0][3],
                       ", ".join("%s %.4f" % (n, min(v, key=lambda p: p[1])[1])
                                 for n, (c, v, t, x) in sorted(runs.items(),
                                                               key=lambda kv: (arm_key(arm_of(kv[0])), kv[0])) if v)))
    return out


def parse_args(argv):
    root, md, out_png, consoles = None, None, None, []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("--md", "--png"):
            if i + 1 >= len(argv):
                raise SystemExit("results.py: %s needs a file" % a)
            if a == "--md":
                md = argv[i + 1]
            else:
                out_png = argv[i + 1]
            i += 2
        elif a == "--console":
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                consoles.append(argv[i])
                i += 1
        elif a in ("-h", "--help"):
            print(__doc__)
            raise SystemExit(0)
        elif a.startswith("--"):
            raise SystemExit("results.py: unknown option %s" % a)
        elif root is None:
            root = a
            i += 1
        else:
            raise SystemExit("results.py: unexpected argument %s (the runs folder is %s)" % (a, root))
    root = root or "experiments/runs"
    return root, md, out_png or os.path.join(root, "val_curves.png"), consoles


def main():
    root, out_md, out_png, consoles = parse_args(sys.argv[1:])
    runs = {}
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        p = os.path.join(root, name, "log.jsonl")
        if os.path.exists(p):
            runs[name] = read_run(p)
    if not runs:
        print("no runs under", root)
        return 1
    console_tps = read_console(consoles) if consoles else {}
    arms = {}
    for name, (cfg, val, train, tps) in runs.items():
        if not val:
            continue
        tps = tps if tps is not None else console_tps.get(name)
        tpstep = tokens_per_step(cfg)
        steps = train[-1][0] if train else (cfg or {}).get("steps", 0)
        tokens = steps * tpstep if tpstep else None
        arms.setdefault(arm_of(name), []).append((name, val[-1][0], val[-1][1], tokens, tps))
    means = {k: sum(r[2] for r in v) / len(v) for k, v in arms.items()}
    tps_mean = {}
    for k, v in arms.items():
        t = [r[4] for r in v if r[4] is not None]
        if t:
            tps_mean[k] = sum(t) / len(t)
    show_tps = bool(tps_mean)
    head = ("| arm | runs (seed: final val loss at step) | mean | spread (max-min) | gap to baseline | seed range"
            " | tokens per run")
    rule = "| --- | --- | --- | --- | --- | --- | ---"
    if show_tps:
        head += " | throughput (tok/s) | wall time per token vs baseline"
        rule += " | --- | ---"
    lines = [head + " |", rule + " |"]
    verdicts = []
    for (norm, depth) in sorted(arms, key=arm_key):
        rs = arms[(norm, depth)]
        ls = [r[2] for r in rs]
        spread = max(ls) - min(ls) if len(ls) > 1 else float("nan")
        base = means.get((norm, "none"))
        gap = "" if depth == "none" or base is None else "%+.4f" % (means[(norm, depth)] - base)
        rng = "[%.4f, %.4f]" % (min(ls), max(ls)) if len(ls) > 1 else "%.4f (1 seed)" % ls[0]
        toks = sorted(set(r[3] for r in rs if r[3]))
        tok = " / ".join(fmt_tokens(t) for t in toks) if toks else "?"
        row = "| %s-norm %s | %s | %.4f | %s | %s | %s | %s" % (
            norm, depth, ", ".join("%s: %.4f @%d" % (seed_of(r[0]), r[2], r[1]) for r in rs),
            means[(norm, depth)], "%.4f" % spread if spread == spread else "n/a (1 seed)", gap, rng, tok)
        if show_tps:
            t = tps_mean.get((norm, depth))
            bt = tps_mean.get((norm, "none"))
            row += " | %s | %s" % ("%.0f" % t if t else "?",
                                   "" if depth == "none" or not t or not bt else "%+.0f %%" % (100 * (bt / t - 1)))
        lines.append(row + " |")
        if depth != "none":
            verdicts.append(seed_verdict(norm, depth, ls, [r[2] for r in arms.get((norm, "none"), [])] or None))
    verdicts += run_health(runs)
    all_tokens = set(r[3] for v in arms.values() for r in v)
    if len(all_tokens) > 1:
        verdicts.append("Warning: the runs did not all see the same number of tokens (%s): the arms are not "
                        "comparable as they stand." % ", ".join(fmt_tokens(t) if t else "?" for t in all_tokens))
    text = "\n".join(lines) + "\n\n" + "\n".join("- " + v for v in verdicts) if verdicts else "\n".join(lines)
    print(text)

    series = []
    x_tok = all(tokens_per_step(runs[n][0]) for n in runs)
    for name, (cfg, val, train, tps) in sorted(runs.items(), key=lambda kv: (arm_key(arm_of(kv[0])), kv[0])):
        if not val:
            continue
        norm, depth = arm_of(name)
        scale = tokens_per_step(cfg) / 1e6 if x_tok else 1
        pts = [(s * scale, v) for s, v in val]
        series.append(("%s-norm %s, seed %s (%.4f)" % (norm, depth, seed_of(name)[1:], val[-1][1]),
                       depth, norm, seed_of(name), pts))
    xlabel = "tokens seen (millions)" if x_tok else "training step"
    plt = load_matplotlib() if series else None
    if not series:
        print("no validation records: no plot written")
    elif plt is not None:
        steps = sorted(set(r[1] for v in arms.values() for r in v))
        toks = sorted(set(r[3] for v in arms.values() for r in v if r[3]))
        title = "MoDA layer-number experiment: validation loss, %s steps%s per run" % (
            "/".join(str(s) for s in steps), ", %s tokens" % "/".join(fmt_tokens(t) for t in toks) if toks else "")
        plot_matplotlib(plt, out_png, series, xlabel, title)
        print("wrote %s (matplotlib: validation loss against %s, full run and last half)" % (out_png, xlabel))
    else:
        curves = []
        for label, depth, norm, seed, pts in series:
            col = COLOURS.get(depth, (120, 120, 120))
            if norm == "pre":
                col = tuple(int(c + (255 - c) * 0.4) for c in col)
            curves.append((col, norm == "pre", pts))
        y0, y1 = plot_fallback(out_png, curves)
        print("wrote %s: the unlabelled fallback plot (no matplotlib): validation loss %.3f .. %.3f against %s; "
              "black none, blue attn, red attn+ffn; solid post-norm, dashed pale pre-norm" % (out_png, y0, y1, xlabel))
    if out_md:
        with open(out_md, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
