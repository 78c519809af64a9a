"""Compare the CUDA machine code (SASS) of two builds of the extension, kernel by kernel.

A change that should not touch the kernels (moving host code between files, renaming) must
leave every kernel's SASS as it was. Kernel names are compared demangled (c++filt) with
"(anonymous namespace)::" removed, so a kernel, or a type in its template arguments, that moved
out of a file's anonymous namespace or into another file is still the same kernel.

    python tools/sass_compare.py BEFORE.so AFTER.so [--cuobjdump PATH]

Exits 0 when both builds hold the same kernels with the same SASS for every architecture,
1 otherwise, listing what differs.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

# The tag nvcc gives a file's anonymous namespace in mangled names (inside SASS text).
ANONYMOUS = re.compile(r"\d+_GLOBAL__N__[0-9a-f]+_\d+_[A-Za-z0-9_]+?_[0-9a-f]{8}_\d+")
ADDRESS = re.compile(r"/\*[0-9a-f]{4,}\*/")


def find_cuobjdump(given: str | None) -> str:
    if given:
        return given
    found = shutil.which("cuobjdump")
    if found:
        return found
    # The CUDA toolkit in /usr/local/cuda may lack it; triton ships one.
    try:
        import triton

        candidate = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    sys.exit("sass_compare: no cuobjdump found; pass --cuobjdump PATH")


def demangled(names: list[str]) -> list[str]:
    out = subprocess.run(["c++filt"], input="\n".join(names), check=True, capture_output=True, text=True).stdout
    return [name.replace("(anonymous namespace)::", "") for name in out.splitlines()]


def kernels(library: str, cuobjdump: str) -> dict[tuple[str, str], str]:
    """(arch, kernel name without its file tag) -> SASS text without instruction addresses."""
    text = subprocess.run([cuobjdump, "-sass", library], check=True, capture_output=True, text=True).stdout
    found: dict[tuple[str, str], str] = {}
    arch = "?"
    name = None
    body: list[str] = []

    def close() -> None:
        if name is not None:
            key = (arch, name)
            if key in found and found[key] != "\n".join(body):
                sys.exit(f"sass_compare: two different kernels named {key} in {library}")
            found[key] = "\n".join(body)

    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("Fatbin "):  # the next file's header: the kernel before it ends here
            close()
            name, body = None, []
        elif stripped.startswith("arch = "):
            arch = stripped.split("=", 1)[1].strip()
        elif stripped.startswith("Function : "):
            close()
            name, body = stripped[len("Function : ") :], []
        elif name is not None and stripped and not stripped.startswith("...."):
            # cuobjdump pads columns to the file's longest line: compare the words alone.
            body.append(" ".join(ANONYMOUS.sub("<anon>", ADDRESS.sub("", stripped)).split()))
    close()
    keys = list(found)
    names = demangled([name for _, name in keys])
    return {(arch, name): found[(arch, raw)] for (arch, raw), name in zip(keys, names)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--cuobjdump", help="path of cuobjdump (default: on PATH, else triton's)")
    args = parser.parse_args()
    tool = find_cuobjdump(args.cuobjdump)
    before, after = kernels(args.before, tool), kernels(args.after, tool)
    only_before = sorted(set(before) - set(after))
    only_after = sorted(set(after) - set(before))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    for label, keys in (("only before", only_before), ("only after", only_after), ("changed", changed)):
        for arch, name in keys:
            print(f"{label}: {arch} {name}")
    same = len(set(before) & set(after)) - len(changed)
    print(f"{same} kernels identical, {len(changed)} changed,", end=" ")
    print(f"{len(only_before)} only before, {len(only_after)} only after")
    return 0 if not (only_before or only_after or changed) else 1


if __name__ == "__main__":
    sys.exit(main())
