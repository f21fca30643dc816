"""bench/ncu_kernel_table.py on a small Nsight Compute CSV: application output before the header skipped,
names grouped without their argument lists, every duration unit read, per-step division and the share."""

import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "ncu_kernel_table.py")
HEAD = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
        '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')


def row(i, name, unit, value):
    return ('"%d","1","moda","h","%s","1","7","(256, 1, 1)","(8, 1, 1)","0","9.0","Command line profiler metrics",'
            '"gpu__time_duration.sum","%s","%s"' % (i, name, unit, value))


def run(tmp_path, text, *args):
    p = tmp_path / "ncu.csv"
    p.write_text(text)
    return subprocess.run([sys.executable, SCRIPT, str(p)] + list(args), capture_output=True, text=True, timeout=60)


def table(out):
    return {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:-1]] for l in out.splitlines()
            if l.startswith("| ") and not l.startswith("| kernel") and not l.startswith("| ---")}


def test_groups_units_and_steps(tmp_path):
    text = "\n".join([
        "step 1/2 | loss 5.5", '==PROF== Profiling "a": 0%....100% - 1 pass', HEAD,
        row(0, "void rows<4, (bool)1>(const float *, int)", "nsecond", "3,000"),
        row(1, "void rows<4, (bool)1>(const float *, int)", "usecond", "5"),
        row(2, "gemm_kernel", "msecond", "0.092"),
        row(3, "void rows<4, (bool)1>(const float *, int)", "nsecond", "4000"),
        row(4, "gemm_kernel", "second", "0.000096"),
        "==PROF== Disconnected from process 1",
    ]) + "\n"
    p = run(tmp_path, text, "--steps", "2")
    assert p.returncode == 0, p.stdout + p.stderr
    t = table(p.stdout)
    # rows: 3 launches, 12 us in all; gemm: 2 launches, 188 us; per step: 6 us and 94 us of 100 us
    assert t["`rows<4, (bool)1>`"] == ["1.5", "0.006", "6.0 %", "4.0"]
    assert t["`gemm_kernel`"] == ["1", "0.094", "94.0 %", "94.0"]
    assert t["**all**"][:3] == ["2.5", "0.100", "100 %"]
    assert p.stdout.splitlines()[2].startswith("| `gemm_kernel`")  # the largest first


def test_top_folds_the_rest(tmp_path):
    text = HEAD + "\n" + "\n".join(row(i, "k%d" % i, "usecond", str(10 * (i + 1))) for i in range(5)) + "\n"
    p = run(tmp_path, text, "--top", "2")
    assert p.returncode == 0, p.stderr
    t = table(p.stdout)
    assert list(t)[:2] == ["`k4`", "`k3`"] and t["(3 more kernels)"][:2] == ["3", "0.060"]


def test_bad_input_is_reported(tmp_path):
    p = run(tmp_path, "no csv here\n")
    assert p.returncode != 0 and "no CSV header" in p.stderr
    p = run(tmp_path, HEAD + "\n" + row(0, "k", "furlong", "1") + "\n")
    assert p.returncode != 0 and "unknown duration unit" in p.stderr
