# Times fd.dropout, fd.dropout_add and fd.act_dropout(gelu) on 2^22 elements (median of 40
# calls, 8 inputs rotated) and prints one JSON line. Run it alternately against two builds:
#     for i in 1 2 3 4 5 6; do for b in BEFORE AFTER; do echo "$b $(PYTHONPATH=$b python ab_processes.py)"; done; done
import json
import statistics
import time

import torch

import fused_dropout as fd

torch.manual_seed(0)
out = {}
for dtype in (torch.float32, torch.bfloat16):
    xs = [torch.randn(2**22, dtype=dtype) for _ in range(8)]
    for name, fn in (
        ("dropout", lambda x: fd.dropout(x, 0.5)),
        ("add", lambda x: fd.dropout_add(x, x, 0.5)),
        ("gelu", lambda x: fd.act_dropout(x, 0.5, activation="gelu")),
    ):
        for x in xs[:3]:
            fn(x)
        t = []
        for i in range(40):
            x = xs[i % 8]
            s = time.perf_counter()
            fn(x)
            t.append(time.perf_counter() - s)
        out[f"{str(dtype)[6:]} {name}"] = statistics.median(t) * 1e3
print(json.dumps(out))
