#!/usr/bin/env python
"""Training steps of real models, stock against ``replace_dropout(model)``, eager and compiled.

Each model is built with ``weights=None`` and fed random data of the right shape. One step is
forward, backward and ``optimizer.step()`` (AdamW). The four variants of a model are timed
in interleaved rounds, so machine load hits them alike; the figure is the median step time
after warm-up, with p95 and max beside it. Memory: on CUDA the peak of
``torch.cuda.max_memory_allocated`` during a step; on the CPU the bytes autograd saves for
backward during one forward (every tensor kept alive for the step's backward, counted once
per storage), which is where dropout's masks live.

    python benchmarks/bench_models.py [--device cuda] [--quick] [--out runs/bench_models]
"""

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fused_dropout

from common import DefaultsHelpFormatter, Timing, progress_bar, provenance, saved_bytes, write_results


class DecoderBlock(nn.Module):
    """A GPT-2 block: pre-norm attention and MLP, each followed by dropout on the residual
    branch. ``fused`` makes the residual dropouts ``dropout_add``."""

    def __init__(self, dim, heads, p, fused):
        super().__init__()
        self.heads, self.p, self.fused = heads, p, fused
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.attn_drop = nn.Dropout(p)
        self.mlp_drop = nn.Dropout(p)

    def residual(self, branch, x, drop):
        if self.fused:
            return fused_dropout.dropout_add(branch, x, self.p, self.training)
        return x + drop(branch)

    def attention(self, normed):
        b, t, d = normed.shape
        q, k, v = self.qkv(normed).view(b, t, 3, self.heads, d // self.heads).transpose(1, 3).unbind(2)
        return self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d))

    def mlp(self, normed):
        return self.out(F.gelu(self.fc(normed), approximate="tanh"))

    def forward(self, x):
        x = self.residual(self.attention(self.ln1(x)), x, self.attn_drop)
        return self.residual(self.mlp(self.ln2(x)), x, self.mlp_drop)

    def fused_norm_forward(self, normed, h, next_norm):
        """(next_norm(h'), h') for the block whose input h has been normed by ln1 already: each
        branch's dropout, residual add and the following LayerNorm are one fused pass."""
        normed, h = fused_dropout.dropout_add_layer_norm(
            self.attention(normed), h, self.ln2.weight, self.ln2.bias, self.p, self.training, prenorm=True
        )
        return fused_dropout.dropout_add_layer_norm(
            self.mlp(normed), h, next_norm.weight, next_norm.bias, self.p, self.training, prenorm=True
        )


class GPT(nn.Module):
    def __init__(self, layers, dim, heads, vocab=50257, context=1024, p=0.1, fused=False):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.drop = nn.Dropout(p)
        self.fused = fused
        self.blocks = nn.ModuleList(DecoderBlock(dim, heads, p, bool(fused)) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        x = self.drop(self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device)))
        if self.fused == "norm":
            # Each block's attention branch + residual + ln2, and its MLP branch + residual +
            # the next block's ln1 (the last block's: the final ln), one fused pass each.
            normed = self.blocks[0].ln1(x)
            norms = [block.ln1 for block in self.blocks[1:]] + [self.ln]
            for block, next_norm in zip(self.blocks, norms):
                normed, x = block.fused_norm_forward(normed, x, next_norm)
            return self.head(normed)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


# The models model_specs builds (--quick: the first two). timm_vit_small and hf_gpt2 are the
# client libraries' own: timm's ViT with drop path, and transformers' GPT-2 with eager
# attention, whose attention dropout is a functional call (replace_dropout(..., functional=True));
# hf_gpt2_host is that GPT-2 at a host-bound size, where the functional mode's host cost shows.
# The heads and llama_lora measure dropout before a Linear (FusedDropoutLinear).
MODEL_NAMES = [
    "gpt2",
    "vit_b_16",
    "convnext_tiny",
    "swin_t",
    "efficientnet_b0",
    "vgg11",
    "gpt2_norm",
    "vit_b_16_norm",
    "timm_vit_small",
    "hf_gpt2",
    "hf_gpt2_host",
    "vgg11_head",
    "efficientnet_b0_head",
    "llama_lora",
]


class LogitsOf(nn.Module):
    """A transformers causal LM as a module that returns logits, as the benchmark's loss takes them."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).logits


def model_specs(device, quick):
    """(name, build(fused) -> model, batch -> (input, target)) for each model at this device's size."""
    import torchvision.models as tv

    cuda = device.type == "cuda"
    image = 224 if cuda else (32 if quick else 64)
    batch = 32 if cuda else (2 if quick else 8)
    gpt = (
        dict(layers=12, dim=768, heads=12, seq=512, batch=8)
        if cuda
        else (
            dict(layers=2, dim=64, heads=2, seq=64, batch=2)
            if quick
            else dict(layers=4, dim=256, heads=4, seq=128, batch=4)
        )
    )

    def images(classes=1000):
        return lambda: (
            torch.randn(batch, 3, image, image, device=device),
            torch.randint(0, classes, (batch,), device=device),
        )

    def tokens():
        idx = lambda: torch.randint(0, 50257, (gpt["batch"], gpt["seq"]), device=device)  # noqa: E731
        return lambda: (idx(), idx())

    def vit(fused):
        if cuda:
            return tv.vit_b_16(weights=None, dropout=0.1)
        return tv.VisionTransformer(
            image_size=image,
            patch_size=16,
            num_layers=2 if quick else 4,
            num_heads=4,
            hidden_dim=64 if quick else 192,
            mlp_dim=256 if quick else 768,
            dropout=0.1,
        )

    specs = [
        ("gpt2", lambda fused: GPT(gpt["layers"], gpt["dim"], gpt["heads"], fused=fused), tokens()),
        ("vit_b_16", vit, images()),
    ]
    if not quick:
        specs += [
            ("convnext_tiny", lambda fused: tv.convnext_tiny(weights=None, stochastic_depth_prob=0.1), images()),
            ("swin_t", lambda fused: tv.swin_t(weights=None), images()),
            ("efficientnet_b0", lambda fused: tv.efficientnet_b0(weights=None), images()),
            ("vgg11", lambda fused: tv.vgg11(weights=None), images()),
        ]
        # The same two with dropout + residual + LayerNorm fused (dropout_add_layer_norm).
        specs += [
            (
                "gpt2_norm",
                lambda fused: GPT(gpt["layers"], gpt["dim"], gpt["heads"], fused="norm" if fused else False),
                tokens(),
            ),
            (
                "vit_b_16_norm",
                lambda fused: fused_dropout.replace_dropout(vit(fused), fuse_norms=True) if fused else vit(fused),
                images(),
            ),
        ]
        specs += client_library_specs(device, image, gpt, images, tokens)
        specs += dropout_linear_specs(device, cuda, gpt)
    return specs


def dropout_linear_specs(device, cuda, gpt):
    """Dropout before a Linear: torchvision's VGG-11 and EfficientNet-B0 classifier heads on
    random features, and a Llama-style decoder (transformers, random weights) with PEFT LoRA
    on q, k, v, o, gate, up and down at lora_dropout 0.1, beside the same at lora_dropout 0
    (variant "no_dropout"), where the libraries are installed."""
    import torchvision.models as tv

    rows = 512 if cuda else 128

    def features(channels, classes=1000):
        # The trunk's output at 224x224, which requires grad as it does inside the whole network.
        return lambda: (
            torch.randn(rows, channels, 7, 7, device=device, requires_grad=True),
            torch.randint(0, classes, (rows,), device=device),
        )

    def head(model):
        """The model after its trunk: pooling, flatten and the classifier."""
        return nn.Sequential(model.avgpool, nn.Flatten(1), model.classifier)

    specs = [
        ("vgg11_head", lambda fused: head(tv.vgg11(weights=None)), features(512)),
        ("efficientnet_b0_head", lambda fused: head(tv.efficientnet_b0(weights=None)), features(1280)),
    ]
    try:
        import peft
        import transformers
    except ImportError:
        print("bench_models: peft or transformers is not installed; skipping llama_lora", file=sys.stderr)
        return specs
    size = (
        dict(layers=8, dim=1024, mlp=2816, heads=16, seq=512, batch=4)
        if cuda
        else dict(layers=4, dim=256, mlp=688, heads=4, seq=128, batch=4)
    )
    vocab = 8000

    def llama_lora(lora_dropout):
        config = transformers.LlamaConfig(
            vocab_size=vocab,
            hidden_size=size["dim"],
            intermediate_size=size["mlp"],
            num_hidden_layers=size["layers"],
            num_attention_heads=size["heads"],
            num_key_value_heads=size["heads"],
            max_position_embeddings=size["seq"],
        )
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=lora_dropout, target_modules=targets)
        return LogitsOf(peft.get_peft_model(transformers.LlamaForCausalLM(config), lora))

    def tokens():
        idx = lambda: torch.randint(0, vocab, (size["batch"], size["seq"]), device=device)  # noqa: E731
        return idx(), idx()

    specs.append(("llama_lora", lambda fused: llama_lora(0.1), tokens, {"no_dropout": lambda: llama_lora(0.0)}))
    return specs


def client_library_specs(device, image, gpt, images, tokens):
    """timm's ViT-S/16 with drop path 0.1 and transformers' GPT-2 with eager attention, where
    the libraries are installed (random weights, nothing downloaded)."""
    specs = []
    try:
        import timm
    except ImportError:
        print("bench_models: timm is not installed; skipping timm_vit_small", file=sys.stderr)
    else:
        specs.append(
            (
                "timm_vit_small",
                lambda fused: timm.create_model(
                    "vit_small_patch16_224", pretrained=False, img_size=image, drop_path_rate=0.1, drop_rate=0.1
                ),
                images(),
            )
        )
    try:
        import transformers
    except ImportError:
        print("bench_models: transformers is not installed; skipping hf_gpt2", file=sys.stderr)
    else:

        def hf_gpt2(layers, dim, heads, seq, vocab):
            """transformers' GPT-2 with eager attention; fused, replace_dropout(..., functional=True)."""

            def build(functional):
                config = transformers.GPT2Config(
                    n_layer=layers, n_embd=dim, n_head=heads, n_positions=seq, vocab_size=vocab
                )
                model = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="eager")
                if functional:
                    fused_dropout.replace_dropout(model, functional=True)
                return LogitsOf(model)

            return build

        specs.append(("hf_gpt2", hf_gpt2(gpt["layers"], gpt["dim"], gpt["heads"], gpt["seq"], 50257), tokens()))

        # The same at a size whose step is host-bound on any device (2 layers of width 64, 2 x 16
        # tokens): what the functional mode costs the host shows here, not in the compute. The
        # extra variant swaps the modules only (functional=False), leaving the attention dropout
        # to torch.
        host = hf_gpt2(2, 64, 2, 16, 128)

        def few_tokens():
            return torch.randint(0, 128, (2, 16), device=device), torch.randint(0, 128, (2, 16), device=device)

        others = {"modules_only": lambda: fused_dropout.replace_dropout(host(False))}
        specs.append(("hf_gpt2_host", host, few_tokens, others))
    return specs


def make_step(model, batch, loss_fn):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        inputs, target = batch
        loss = loss_fn(model(inputs), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def lm_loss(logits, target):
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def timed(step, device):
    """Milliseconds of one call of step, on the device's clock."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    step()
    return (time.perf_counter() - begin) * 1e3


class Progress:
    """A tqdm bar over all rounds (warm-up and timed) on a terminal; plain lines on stderr
    otherwise (CI, logs); nothing with --quiet."""

    def __init__(self, total, quiet):
        self.quiet = quiet
        self.bar = progress_bar(total, quiet, unit="round")

    def step(self, message):
        if self.bar is not None:
            self.bar.set_description(message)
            self.bar.update()
        elif not self.quiet:
            print(f"  {message}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def bench_model(name, build, make_batch, device, modes, steps, warmup, progress, others=None):
    """Rows for stock, fused (replace_dropout) and each of ``others`` (name -> build()), all
    holding the stock model's weights."""
    torch.manual_seed(0)
    stock = build(False).to(device)
    models = {"stock": stock, "fused": fused_dropout.replace_dropout(build(True).to(device))}
    for kind, build_other in (others or {}).items():
        models[kind] = build_other().to(device)
    for kind in models:
        models[kind].load_state_dict(stock.state_dict())
    batch = make_batch()
    loss_fn = lm_loss if batch[1].dim() == 2 else F.cross_entropy  # a token per position, or a class per row
    variants = {}
    for mode in modes:
        for kind, model in models.items():
            m = copy.deepcopy(model)
            m.train()
            runnable = torch.compile(m) if mode == "compiled" else m
            variants[(kind, mode)] = {"model": m, "step": make_step(runnable, batch, loss_fn), "ms": []}
    for i in range(warmup):  # warm-up (and compilation) first
        progress.step(f"{name}: warm-up {i + 1}/{warmup}")
        for v in variants.values():
            v["step"]()
    if device.type == "cuda":
        torch.cuda.synchronize()
    for i in range(steps):  # interleaved rounds
        progress.step(f"{name}: round {i + 1}/{steps}")
        for v in variants.values():
            v["ms"].append(timed(v["step"], device))
    rows = []
    for (kind, mode), v in variants.items():
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            v["step"]()
            torch.cuda.synchronize()
            memory = torch.cuda.max_memory_allocated() - base
            activations = float("nan")
        else:
            eager = mode == "eager"
            memory = saved_bytes(v["model"], batch[0]) if eager else float("nan")
            parameters = list(v["model"].parameters())
            activations = saved_bytes(v["model"], batch[0], exclude=parameters) if eager else float("nan")
        timing = Timing.of(v["ms"])
        rows.append(
            {
                "model": name,
                "variant": kind,
                "mode": mode,
                "ms_median": float(timing),
                "ms_p95": timing.p95,
                "ms_max": timing.max,
                "spread": timing.spread,
                "memory_bytes": memory,
                "activation_bytes": activations,
                "steps": len(v["ms"]),
            }
        )
    for row in rows:
        stock_row = next(r for r in rows if r["mode"] == row["mode"] and r["variant"] == "stock")
        row["speedup_vs_stock"] = stock_row["ms_median"] / row["ms_median"]
        row["speedup_noisy"] = row is not stock_row and row["spread"] + stock_row["spread"] > abs(
            row["speedup_vs_stock"] - 1.0
        )
        row["memory_vs_stock"] = (
            row["memory_bytes"] / stock_row["memory_bytes"] if stock_row["memory_bytes"] else float("nan")
        )
    return rows


def no_dropout_lines(rows):
    """For each model measured beside a no-dropout variant: the fused variant's memory and
    activations against it, and its step time against stock dropout."""
    lines = []
    for r in rows:
        base = next(
            (b for b in rows if (b["model"], b["mode"], b["variant"]) == (r["model"], r["mode"], "no_dropout")), None
        )
        if base is None or r["variant"] != "fused":
            continue
        parts = [f"step time {1 / r['speedup_vs_stock']:.3f}x stock dropout's"]
        for key, what in (("memory_bytes", "memory"), ("activation_bytes", "activations saved")):
            if r[key] == r[key] and base[key]:
                parts.append(f"{what} {r[key] / base[key]:.4f}x no dropout's")
        lines.append(f"- {r['model']} ({r['mode']}), fused dropout: " + ", ".join(parts))
    return lines


def write_outputs(rows, meta, out, prov):
    memory_name = "peak memory (MiB)" if meta["device"].startswith("cuda") else "saved for backward (MiB)"
    lines = [
        f"# Training step, stock vs replace_dropout: {prov['device']}",
        "",
        f"{meta['steps']} timed steps per variant after {meta['warmup']} warm-up, interleaved. Time is the whole "
        "step (forward, backward, AdamW), not dropout alone. spread: interquartile range over the median; "
        "(noisy): the two spreads add up to more than the speed difference, which is then not measured.",
        "",
        "activations (CPU): the bytes saved for backward less the model's parameters' (a weight autograd "
        "keeps is no new memory).",
        "",
        f"| model | mode | variant | steps/s | ms median | ms p95 | ms max | spread | {memory_name} "
        "| activations (MiB) | speed vs stock | memory vs stock |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def mib(value):
        return "" if value != value else f"{value / 2**20:.1f}"

    for r in rows:
        mem_ratio = "" if r["memory_vs_stock"] != r["memory_vs_stock"] else f"{r['memory_vs_stock']:.3f}x"
        speed = f"{r['speedup_vs_stock']:.3f}x" + (" (noisy)" if r["speedup_noisy"] else "")
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['variant']} | {1e3 / r['ms_median']:.2f} | {r['ms_median']:.1f} | "
            f"{r['ms_p95']:.1f} | {r['ms_max']:.1f} | {r['spread']:.0%} | {mib(r['memory_bytes'])} | "
            f"{mib(r['activation_bytes'])} | {speed} | {mem_ratio} |"
        )
    against_no_dropout = no_dropout_lines(rows)
    if against_no_dropout:
        lines += ["", "Fused dropout against the same model without dropout:", "", *against_no_dropout]
    write_results(out, prov, "\n".join(lines), rows, extra=meta)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = sorted({(r["model"], r["mode"]) for r in rows})
        fused = [
            next(r["speedup_vs_stock"] for r in rows if (r["model"], r["mode"]) == k and r["variant"] == "fused")
            for k in labels
        ]
        fig, ax = plt.subplots(figsize=(8, 3 + 0.25 * len(labels)))
        ax.barh([f"{m} ({mode})" for m, mode in labels], fused)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xlabel("training-step speed of replace_dropout(model) / stock (median)")
        ax.set_title(prov["device"])
        fig.tight_layout()
        fig.savefig(out / "speedup.png", dpi=120)
    except ImportError:
        pass
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="two tiny models, few steps (CI)")
    parser.add_argument(
        "--models", nargs="*", choices=MODEL_NAMES, metavar="MODEL", help="only these models: " + ", ".join(MODEL_NAMES)
    )
    parser.add_argument(
        "--modes",
        nargs="*",
        default=["eager", "compiled"],
        choices=["eager", "compiled"],
        help="eager, torch.compile or both",
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (20; with --quick 3)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--out", default="runs/bench_models", help="folder for results.{md,json} and speedup.png")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or lines")
    args = parser.parse_args()
    if not torch.cuda.is_available():  # torch.compile's "No CUDA runtime is found" log line
        import logging

        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    device = torch.device(args.device)
    steps = args.steps or (3 if args.quick else 20)
    warmup = 1 if args.quick and args.warmup == 3 else args.warmup
    specs = [spec for spec in model_specs(device, args.quick) if not args.models or spec[0] in args.models]
    if not specs:
        built = "with --quick (it builds gpt2 and vit_b_16)" if args.quick else "here (see the lines above)"
        parser.error(f"none of --models {' '.join(args.models)} is built {built}")
    progress = Progress(len(specs) * (warmup + steps), args.quiet)
    rows = []
    for name, build, make_batch, *others in specs:
        rows += bench_model(name, build, make_batch, device, args.modes, steps, warmup, progress, *others)
    progress.close()
    meta = {"device": str(device), "steps": steps, "warmup": warmup, "quick": args.quick}
    write_outputs(rows, meta, Path(args.out), provenance(device))


if __name__ == "__main__":
    main()
