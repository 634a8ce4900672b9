"""Predicted throughput of the NEON micro-kernels' inner loops (llvm-mca; a model, not a measurement).

Usage: mca.py LOOP.s ... (loops cut from the object code by extract_loop.py). For each loop and CPU model:
cycles per iteration, fmla per iteration and per cycle, and the FMA utilisation: the loop's fmla per cycle over
the model's own peak, which is the same loop's fmla alone (loads, broadcasts and pointer arithmetic removed,
the loop counter and branch kept) — so it measures what the loads and broadcasts cost, within the model.

Caveat: LLVM 14 (the llvm-mca here) schedules -mcpu=apple-m1 with its Cyclone-derived model, and has no Neoverse
model: -mcpu=neoverse-v1 falls back to Cortex-A57's (two 64-bit FP pipes). The real cores issue 4 (M1
Firestorm) and 4 (Neoverse V1, as 128-bit NEON) fmla per cycle; the models' peaks are printed beside."""
import os
import re
import subprocess
import sys
import tempfile

CPUS = ("apple-m1", "neoverse-v1")


def cycles(path, cpu):
    out = subprocess.run(["llvm-mca", "-mtriple=aarch64", "-mcpu=" + cpu, "-iterations=1000", path],
                         capture_output=True, text=True, check=True).stdout
    return int(re.search(r"Total Cycles:\s+(\d+)", out).group(1)) / 1000


print("| loop | -mcpu (LLVM 14 model) | cycles/iter | fmla/iter | fmla/cycle | model's peak fmla/cycle | FMA utilisation |")
print("|---|---|---|---|---|---|---|")
for path in sys.argv[1:]:
    lines = open(path).read().splitlines()
    fmla = sum(line.strip().startswith("fmla") for line in lines)
    only = [l for l in lines if l.endswith(":") or l.strip().split()[0] in ("fmla", "subs", "b.ne")]
    with tempfile.NamedTemporaryFile("w", suffix=".s", delete=False) as f:
        f.write("\n".join(only) + "\n")
    for cpu in CPUS:
        loop, peak = cycles(path, cpu), cycles(f.name, cpu)
        print("| %s | %s | %.2f | %d | %.2f | %.2f | %.0f%% |" % (
            os.path.basename(path).removesuffix(".s"), cpu, loop, fmla, fmla / loop, fmla / peak, 100 * peak / loop))
    os.unlink(f.name)
