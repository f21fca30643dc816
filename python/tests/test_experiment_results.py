"""experiments/results.py on a small synthetic runs folder: the table's numbers, the seed-range verdicts, the
throughput read from a console log, and a valid PNG from the dependency-free fallback (and from matplotlib where
it imports)."""

import importlib.util
import json
import os
import struct
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "results.py")

# arm -> (final validation loss, throughput in tok/s); the earlier evaluations sit above the final one
RUNS = {
    "post_none_s1": (1.10, 400000.0),
    "post_none_s2": (1.08, 400000.0),
    "post_attn_s1": (1.12, 320000.0),  # range [1.12, 1.13] above [1.08, 1.10]: loses beyond the spread
    "post_attn_s2": (1.13, 320000.0),
    "post_attnffn_s1": (1.04, 200000.0),  # range [1.03, 1.04] below: beats beyond the spread
    "post_attnffn_s2": (1.03, 200000.0),
    "pre_none_s1": (1.06, 410000.0),
    "pre_attnffn_s1": (1.00, 205000.0),  # one seed: no claim
    "mid_none_s1": (1.10, 1.0),
    "mid_none_s2": (1.00, 1.0),
    "mid_attn_s1": (1.05, 1.0),  # range inside the baseline's: within the spread
    "mid_attn_s2": (1.06, 1.0),
}
STEPS, BATCH, SEQ = 40, 4, 64


def make_runs(root):
    console = []
    for arm, (final, tps) in RUNS.items():
        d = root / arm
        d.mkdir()
        recs = [{"config": "synthetic " + arm, "params": 1, "steps": STEPS, "batch": BATCH, "seq": SEQ, "lr": 1e-3,
                 "warmup": 2, "seed": int(arm[-1])}]
        for s in range(1, STEPS + 1):
            recs.append({"step": s, "loss": 3.0 - s / STEPS, "lr": 1e-3, "grad_norm": 0.5})
            if s % 10 == 0:
                recs.append({"step": s, "val_loss": final + 0.5 * (STEPS - s) / STEPS, "val_bits": 0.0})
        with open(d / "log.jsonl", "w") as f:
            f.write("\n".join(json.dumps(r) for r in recs) + "\nnot json\n")
        console += ["== %s: --norm x --depth y --seed 1, %d steps" % (arm, STEPS), "step 10/40 | 123 tok/s",
                    "throughput %.0f tok/s over 37 steps (after 3 warm-up steps)" % tps]
    (root / "console.log").write_text("\n".join(console) + "\n")


def run(tmp_path, *extra, matplotlib=False):
    env = dict(os.environ)
    if not matplotlib:
        env["MODA_RESULTS_NO_MATPLOTLIB"] = "1"
    md, png = tmp_path / "table.md", tmp_path / "curves.png"
    p = subprocess.run([sys.executable, SCRIPT, str(tmp_path / "runs"), "--md", str(md), "--png", str(png)] +
                       list(extra), capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout, md.read_text(), png.read_bytes()


def rows(table):
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| ") and "-norm " in line}


def png_size(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_table_verdicts_and_fallback_png(tmp_path):
    (tmp_path / "runs").mkdir()
    make_runs(tmp_path / "runs")
    out, table, png = run(tmp_path, "--console", str(tmp_path / "runs" / "console.log"))
    assert "unlabelled fallback" in out
    r = rows(table)
    # columns: runs, mean, spread, gap, seed range, tokens per run, throughput, wall time per token vs baseline
    assert r["post-norm none"][1] == "1.0900" and r["post-norm none"][2] == "0.0200"
    assert r["post-norm attn+ffn"][3] == "-0.0550"
    assert r["post-norm attn+ffn"][4] == "[1.0300, 1.0400]"
    assert r["post-norm attn"][3] == "+0.0350" and r["post-norm attn"][4] == "[1.1200, 1.1300]"
    assert r["pre-norm attn+ffn"][2] == "n/a (1 seed)"
    assert all(v[5] == "10 k" for v in r.values())  # 40 steps x 4 x 64 = 10,240 tokens
    assert r["post-norm attn+ffn"][6] == "200000" and r["post-norm attn+ffn"][7] == "+100 %"
    assert r["post-norm attn"][7] == "+25 %" and r["post-norm none"][7] == ""
    assert "post-norm attn+ffn beats the baseline beyond the seed spread" in table
    assert "post-norm attn loses to the baseline beyond the seed spread" in table
    assert "mid-norm attn is within the seed spread of the baseline" in table
    assert "pre-norm attn+ffn: -0.0600 against the baseline from 1 and 1 seed(s)" in table
    assert "beats" not in [line for line in table.splitlines() if line.startswith("- pre-norm")][0]
    assert png_size(png) == (900, 560)


def test_no_throughput_without_a_source(tmp_path):
    (tmp_path / "runs").mkdir()
    make_runs(tmp_path / "runs")
    _, table, _ = run(tmp_path)
    assert "tok/s" not in table.splitlines()[0] and "tokens per run" in table.splitlines()[0]


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed")
def test_matplotlib_png(tmp_path):
    (tmp_path / "runs").mkdir()
    make_runs(tmp_path / "runs")
    out, table_mpl, png = run(tmp_path, matplotlib=True)
    assert "matplotlib" in out and "fallback" not in out
    w, h = png_size(png)
    assert w > 1000 and h > 500
    _, table_fallback, _ = run(tmp_path)
    assert table_mpl == table_fallback


def rewrite_val(path, fn):
    recs = [json.loads(x) for x in path.read_text().splitlines() if x.startswith("{")]
    for r in recs:
        if "val_loss" in r:
            r["val_loss"] = fn(r["step"], r["val_loss"])
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")


def test_diverged_and_overfitting_runs_are_named(tmp_path):
    (tmp_path / "runs").mkdir()
    make_runs(tmp_path / "runs")
    _, table, _ = run(tmp_path)
    assert "diverged" not in table and "above its own best" not in table  # monotone curves: nothing to say
    # post_none_s1 blows up after step 20 (1.35 there, 3.6 at the end); pre_attnffn_s1 ends 0.025 above its best (1.125 at step 30)
    rewrite_val(tmp_path / "runs" / "post_none_s1" / "log.jsonl", lambda s, v: v if s <= 20 else 3.6)
    rewrite_val(tmp_path / "runs" / "pre_attnffn_s1" / "log.jsonl", lambda s, v: v + (0.15 if s == 40 else 0.0))
    _, table, _ = run(tmp_path)
    warn = [x for x in table.splitlines() if "diverged" in x]
    assert len(warn) == 1 and "post_none_s1 diverged: validation loss 1.3500 at step 20, 3.6000 at step 40" in warn[0]
    rose = [x for x in table.splitlines() if "above its own best" in x]
    assert len(rose) == 1 and "1 of 12 runs" in rose[0] and "pre_attnffn_s1, +0.0250 from 1.1250 at step 30" in rose[0]
