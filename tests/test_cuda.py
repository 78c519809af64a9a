"""CUDA-only behaviour: graph capture and 64-bit indexing."""

import pytest
import torch

import fused_dropout

import reference
from helpers import DTYPES, assert_bitwise_equal, random_input

pytestmark = pytest.mark.cuda


def test_cuda_graph_replays_draw_fresh_masks_and_backward_matches():
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), fused_dropout.FusedDropout(0.5)).cuda()
    static_x = torch.randn(32, 64, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up outside the graph
            model(static_x).sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_y = model(static_x)
        static_y.backward(torch.ones_like(static_y))
    masks, grads = [], []
    for _ in range(4):
        graph.replay()
        torch.cuda.synchronize()
        masks.append(static_y != 0)
        grads.append(model[0].bias.grad.clone())
    assert all(not torch.equal(masks[0], m) for m in masks[1:])
    for mask, grad in zip(masks, grads):
        # d(sum y)/d(bias) = sum over the batch of mask * 2: backward used the replay's mask.
        torch.testing.assert_close(grad, (mask.float() * 2).sum(0), rtol=0, atol=0)


def test_make_graphed_callables():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), fused_dropout.FusedDropout(0.5)).cuda()
    x = torch.randn(8, 16, device="cuda", requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(model, (x,))
    masks = []
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        out = graphed(x)
        mask = (out != 0).clone()  # out is the graph's static output: the next replay rewrites it
        out.backward(torch.ones_like(out))
        # d(sum out)/d(bias) = sum over the batch of mask * 2: backward used this replay's mask.
        torch.testing.assert_close(model[0].bias.grad, (mask.float() * 2).sum(0), rtol=0, atol=0)
        masks.append(mask)
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_blocks_match_cpu_bit_for_bit(dtype):
    # Thousands of blocks: every thread's work lands where the rule says, as on the CPU.
    x = random_input(3 * 2**22 + 7, dtype)
    want = fused_dropout.dropout(x, 0.3, seed=2024, offset=5)
    got = fused_dropout.dropout(x.cuda(), 0.3, seed=2024, offset=5).cpu()
    assert_bitwise_equal(got, want)


def test_successive_cuda_calls_use_disjoint_counters():
    x = torch.ones(1001, device="cuda")
    _, first = fused_dropout.ops.dropout(x, 0.5)
    _, second = fused_dropout.ops.dropout(x, 0.5)
    assert first[0] == second[0] and second[1] - first[1] >= (1001 + 3) // 4


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_more_than_two_to_the_31_elements(dtype):
    numel = 2**31 + 4099
    x = torch.ones(numel, dtype=dtype, device="cuda")
    y = fused_dropout.dropout(x, 0.5, seed=77)
    for start in [0, 2**31 - 6000, numel - 10_000]:  # the head, both sides of 2^31, the tail
        stop = start + 10_000
        got = (y[start:stop] != 0).cpu()
        assert stop <= numel and got.numel() == 10_000
        wrong = (got != torch.from_numpy(reference.keep_range(start, stop, 0.5, 77))).nonzero().flatten()
        assert wrong.numel() == 0, (
            f"elements [{start}, {stop}): {wrong.numel()} masks differ from the rule, "
            f"first at {(wrong[:8] + start).tolist()}"
        )
