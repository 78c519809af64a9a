"""Statistical behaviour. Each test is deterministic (fixed seeds); the significance level
says how often a correct kernel would fail it for an arbitrary seed."""

import threading

import pytest
import torch

import fused_dropout

from helpers import DEVICES, random_input

stats = pytest.importorskip("scipy.stats", reason="scipy is not installed")

ALPHA = 1e-6  # per-test false-failure rate for a correct implementation


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.05, 0.1, 0.3, 0.5, 0.8, 0.95])
def test_drop_fraction_passes_binomial_test(device, p):
    n = 1 << 20
    kept = int(fused_dropout.keep_mask((n,), p, seed=int(p * 1000), device=device).sum())
    assert stats.binomtest(kept, n, 1 - p).pvalue > ALPHA


@pytest.mark.parametrize("device", DEVICES)
def test_expected_output_equals_input(device):
    # Each element of y = x * b / (1 - p) with b ~ Bernoulli(1 - p): mean x, variance x^2 p / (1 - p).
    x = torch.full((1 << 20,), 3.0, device=device)
    p = 0.4
    y = fused_dropout.dropout(x, p, seed=5).double()
    z = (y.mean().item() - 3.0) / (3.0 * (p / (1 - p)) ** 0.5 / (x.numel() ** 0.5))
    assert abs(z) < stats.norm.isf(ALPHA / 2)


@pytest.mark.parametrize("device", DEVICES)
def test_successive_calls_draw_new_masks(device):
    x = torch.ones(4096, device=device)
    masks = [fused_dropout.dropout(x, 0.5) != 0 for _ in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            # Independent masks agree on about half the elements, identical ones on all.
            agree = int((masks[i] == masks[j]).sum())
            assert stats.binomtest(agree, x.numel(), 0.5).pvalue > ALPHA


@pytest.mark.parametrize("device", DEVICES)
def test_rows_get_independent_masks(device):
    mask = fused_dropout.keep_mask((64, 1024), 0.5, seed=9, device=device)
    agree = int((mask[:-1] == mask[1:]).sum())
    assert stats.binomtest(agree, mask[1:].numel(), 0.5).pvalue > ALPHA


@pytest.mark.parametrize("device", DEVICES)
def test_manual_seed_reproduces_outputs(device):
    x = random_input((1000,), torch.float32, device)
    torch.manual_seed(123)
    first = [fused_dropout.dropout(x, 0.5) for _ in range(3)]
    torch.manual_seed(123)
    second = [fused_dropout.dropout(x, 0.5) for _ in range(3)]
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], first[1])


@pytest.mark.parametrize("device", DEVICES)
def test_generator_argument_reproduces_and_leaves_default_alone(device):
    x = random_input((1000,), torch.float32, device)
    default_state = torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()
    a = fused_dropout.dropout(x, 0.5, generator=torch.Generator(device).manual_seed(7))
    b = fused_dropout.dropout(x, 0.5, generator=torch.Generator(device).manual_seed(7))
    c = fused_dropout.dropout(x, 0.5, generator=torch.Generator(device).manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    after = torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()
    assert torch.equal(default_state, after)


@pytest.mark.parametrize("device", DEVICES)
def test_concurrent_calls_from_threads_never_share_a_mask(device):
    x = torch.ones(1 << 14, device=device)
    results = [[] for _ in range(8)]
    start = threading.Barrier(8)

    def work(index):
        start.wait()
        for _ in range(16):
            results[index].append((fused_dropout.dropout(x, 0.5) != 0).cpu())

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    masks = torch.stack([m for per_thread in results for m in per_thread])
    assert masks.shape[0] == 128
    assert torch.unique(masks, dim=0).shape[0] == 128
