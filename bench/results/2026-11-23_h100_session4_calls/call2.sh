#!/usr/bin/env bash
# session 4 call 2: forward pp/dtma and backward overlap variants side by side; deterministic dK/dV A/B
set -u
T0=$(date +%s)
STAGES=variants BENCH_SHAPES=S1,S2,S3,S4,S5,S1n,S2n VARIANT_ENV=MODA_CUDA_FORWARD=auto VARIANT_BENCH_ARGS=--nondeterministic \
 VARIANTS="pp=-DMODA_HOPPER_PINGPONG=1 dtma=-DMODA_HOPPER_DEPTH_TMA=1 both=-DMODA_HOPPER_PINGPONG=1,MODA_HOPPER_DEPTH_TMA=1 hbo1=-DMODA_HB_OVERLAP=1 hbo2=-DMODA_HB_OVERLAP=2" \
 bash bench/device_run.sh > $OUT/variants_run.log 2>&1
echo "variants done at $(( $(date +%s) - T0 )) s"
for v in base pp dtma both hbo1 hbo2; do
  cuobjdump -sass build-var-$v/libmoda.so > /tmp/sass_$v.txt 2>/dev/null
  echo "sass $v: HGMMA $(grep -c HGMMA /tmp/sass_$v.txt) LDL $(grep -c 'LDL' /tmp/sass_$v.txt) STL $(grep -c 'STL' /tmp/sass_$v.txt) UTMALDG $(grep -c UTMALDG /tmp/sass_$v.txt) DEPBAR1 $(grep -c 'WARPGROUP.DEPBAR.LE gsb0, 0x1' /tmp/sass_$v.txt)"
done
echo "== deterministic: two-pass vs dK/dV form (base lib)"
for e in X=0 MODA_CUDA_BWD_HOPPER_DKDV=1; do
  env $e timeout 120 build-var-base/bench --device cuda --shapes S1,S2,S3,S5 > $OUT/det_$e.log 2>&1
  echo "$e"; grep -E "^\| S" $OUT/det_$e.log
done
cat $OUT/variants_short.txt
echo "== done at $(( $(date +%s) - T0 )) s"
