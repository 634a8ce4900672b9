"""Prints the hottest loop of a function from `aarch64-linux-gnu-objdump -d --no-show-raw-insn` output as
assembly that llvm-mca reads: the backward conditional branch whose body holds the most `fmla`s, addresses
stripped, the branch pointed at a local label. Usage: extract_loop.py DISASSEMBLY SYMBOL_SUBSTRING."""
import re
import sys

text = open(sys.argv[1]).read().splitlines()
start = next(i for i, line in enumerate(text) if re.match(r"^[0-9a-f]+ <.*%s.*>:$" % re.escape(sys.argv[2]), line))
body = []
for line in text[start + 1:]:
    m = re.match(r"^\s+([0-9a-f]+):\s+(.*)$", line)
    if not m:
        break
    body.append((int(m.group(1), 16), m.group(2).split("//")[0].strip()))
best = None
for i, (address, instruction) in enumerate(body):
    m = re.match(r"^(b\.\w+|cbnz|cbz|tbnz|tbz)\s+.*?([0-9a-f]+) <", instruction)
    if m and int(m.group(2), 16) < address:
        target = int(m.group(2), 16)
        loop = [ins for a, ins in body if target <= a <= address]
        score = sum(ins.startswith("fmla") for ins in loop)
        if best is None or score > best[0]:
            best = (score, loop)
loop = best[1]
print(".Lloop:")
for instruction in loop[:-1]:
    print("    " + instruction)
print("    " + re.sub(r"\s+[0-9a-f]+ <.*>$", " .Lloop", loop[-1]))
