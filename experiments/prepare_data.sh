#!/usr/bin/env bash
# experiments/prepare_data.sh [OUTDIR] - the experiment's byte-level corpus from a real code base that is not
# part of this project: the C sources of Debian's linux-source-6.1 package (GPL-2.0; used as training text,
# not redistributed: only this recipe is committed).
#   train.txt: the .c/.h files of kernel/ mm/ fs/ net/ (sorted paths, concatenated, each preceded by a
#              "// FILE: path" line), cut at TRAIN_MB (default 60) MB (the four directories hold 90.8 MB);
#   val.txt:   the same from lib/ and block/ (directories the training text never sees), cut at VAL_MB (1) MB.
# Deterministic for a given package version (LC_ALL=C sort). Needs apt-get (Debian/Ubuntu), dpkg-deb, tar, xz.
set -euo pipefail
OUTDIR=${1:-experiments/data}
# 60 MB: one pass over the text covers run_arms.sh's 52.4 M tokens per run (24 MB, the first default, made
# them 2.2 passes and the validation loss rose over the last 200 steps); 61 MB with val.txt still fits the
# device tool's 64 MiB of carried files
TRAIN_MB=${TRAIN_MB:-60}
VAL_MB=${VAL_MB:-1}
PKG=${PKG:-linux-source-6.1}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$work"
apt-get download "$PKG" >/dev/null 2>&1 || { echo "apt-get download $PKG failed" >&2; exit 1; }
deb=$(ls ./*.deb)
echo "package: $deb ($(stat -c %s "$deb") bytes, sha256 $(sha256sum "$deb" | cut -c1-16)...)"
dpkg-deb -x "$deb" pkg
tarball=$(ls pkg/usr/src/linux-source-*.tar.*)
top=$(basename "$tarball" | sed 's/\.tar\..*//')
tar -xf "$tarball" "$top/kernel" "$top/mm" "$top/fs" "$top/net" "$top/lib" "$top/block"
concat() { # concat MB dir...
    local mb=$1
    shift
    (cd "$top" && find "$@" -type f \( -name '*.c' -o -name '*.h' \) | LC_ALL=C sort | while read -r f; do
        printf '// FILE: %s\n' "$f"
        cat "$f"
    done) | head -c $((mb * 1000 * 1000))
}
set +o pipefail # head closes the pipe early on purpose
concat "$TRAIN_MB" kernel mm fs net > "$OUTDIR/train.txt"
concat "$VAL_MB" lib block > "$OUTDIR/val.txt"
ls -l "$OUTDIR/train.txt" "$OUTDIR/val.txt"
sha256sum "$OUTDIR/train.txt" "$OUTDIR/val.txt"
