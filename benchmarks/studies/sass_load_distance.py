#!/usr/bin/env python
"""How many instructions each 16-byte global load (LDG.E.128) of a kernel is issued ahead of
the first instruction that reads its registers, from the SASS of the built extension. A
kernel that wants its Philox rounds to hide the load's latency needs that distance large.

    python benchmarks/studies/sass_load_distance.py [--so fused_dropout/_C*.so] [--arch sm_90] [--kernel REGEX]

cuobjdump comes from the CUDA toolkit (CUDA_HOME, /usr/local/cuda) or triton's copy.
"""

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys


def find_cuobjdump():
    candidates = [shutil.which("cuobjdump")]
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "cuobjdump"))
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for path in candidates:
        if path and os.path.exists(path):
            return path
    sys.exit("cuobjdump not found: set CUDA_HOME")


def demangle(names):
    """Readable kernel names, with the anonymous namespaces and the rule type left out."""
    filt = shutil.which("c++filt")
    if filt is None:
        return names
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    cleaned = [re.sub(r"\(anonymous namespace\)::|fused_dropout::|c10::|^void ", "", n) for n in out]
    return [re.sub(r", StateSource.*", ">", n) for n in cleaned]


def load_distances(instructions):
    """(index of the load, instructions until its registers are first read) per LDG.E.128."""
    found = []
    for k, text in enumerate(instructions):
        load = re.search(r"LDG\.E\.128\S* R(\d+),", text)
        if not load:
            continue
        first = int(load.group(1))
        registers = {f"R{first + j}" for j in range(4)}
        for later in range(k + 1, len(instructions)):
            opcode, _, operands = instructions[later].partition(" ")
            names = re.findall(r"\bR\d+\b", operands)
            read = names if opcode.startswith(("ST", "@")) else names[1:]  # the first operand is the destination
            if registers & set(read):
                found.append((k, later - k))
                break
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--so", default=None, help="the built extension (default: fused_dropout/_C*.so)")
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--kernel", default="contiguous_kernel", help="regex on the mangled kernel name")
    args = parser.parse_args()
    so = args.so or (glob.glob("fused_dropout/_C*.so") or [None])[0]
    if so is None:
        sys.exit("no fused_dropout/_C*.so: build the extension first, or pass --so")
    sass = subprocess.run(
        [find_cuobjdump(), "-sass", "-arch", args.arch, so], check=True, capture_output=True, text=True
    ).stdout
    rows = []
    for function in re.split(r"\n\s*Function : ", sass)[1:]:
        name = function.split("\n", 1)[0]
        if not re.search(args.kernel, name):
            continue
        instructions = [
            re.sub(r"^/\*[0-9a-f]+\*/\s*|\s*/\* 0x[0-9a-f]+ \*/", "", line.strip())
            for line in function.split("\n")
            if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)
        ]
        distances = load_distances(instructions)
        if distances:
            rows.append((name, len(instructions), ", ".join(f"+{d}" for _, d in distances)))
    print("kernel (scalar, aligned, add, bias)                  instructions  load -> first use")
    for readable, (_, count, shown) in zip(demangle([r[0] for r in rows]), rows):
        print(f"{readable[:52]:52s} {count:12d}  {shown}")


if __name__ == "__main__":
    main()
