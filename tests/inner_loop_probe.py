"""Writes the output bytes of one CPU kernel call (helpers.inner_loop_call) to a file.

test_mask.py runs it in fresh processes, since the CPU kernel picks its inner loops once per
process:  python inner_loop_probe.py DTYPE OP OUT_FILE
"""

import sys

import torch

from helpers import inner_loop_call, inner_loop_inputs

if __name__ == "__main__":
    dtype, op, out_file = sys.argv[1:]
    dtype = getattr(torch, dtype)
    y = inner_loop_call(op, dtype, *inner_loop_inputs(dtype, op))
    with open(out_file, "wb") as f:
        f.write(y.view(torch.uint8).numpy().tobytes())
