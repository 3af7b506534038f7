"""Compressor kernels at full V4 shapes and under CUDA-graph capture: device tests (`--backend=cuda|rocm`
on the hardware; on the CPU they skip with the reason, the interpreter tests cover small shapes).

- decode for 256 sequences at mixed positions (both ratios, both widths, the fused FP8 form), against the
  reference on the same states;
- a decode step captured in a CUDA graph and replayed on new tokens at new positions (the emission is
  decided on the device);
- a 64K-token prefill and a ragged batch of chunked prefills continuing from their states;
- indexer_cache_quantize at V4 entry counts (512, 16K + 7, 64K rows) with NaN / inf / zero / -0 rows, bytes
  against the reference (the TileLang kernel's only numerics run).
"""
import pytest
import torch

import dsv4_kernels as dk
from dsv4_kernels import ladder
from dsv4_kernels.reference import compressor as ref
from dsv4_kernels.reference.transforms import rope_tables

TOKEN_BYTES = 584


def _device_only(device):
    if device.type == "cpu":
        pytest.skip("full V4 shapes and CUDA-graph capture run on a device (--backend=cuda|rocm); on the CPU "
                    "the interpreter tests cover small shapes")


def _coff(ratio):
    return 2 if ratio == 4 else 1


def _decode_setup(ratio, d, batch, gen):
    """States of `batch` sequences (random rows, as any prefix leaves them), next tokens at positions that
    cover every phase of the block, permuted slots."""
    width = _coff(ratio) * d
    slots = batch + 7
    kv_state = torch.randn(slots, _coff(ratio) * ratio, width, generator=gen)
    score_state = 2.0 * torch.randn(slots, _coff(ratio) * ratio, width, generator=gen)
    kv, score = torch.randn(batch, width, generator=gen), 2.0 * torch.randn(batch, width, generator=gen)
    ape = 0.5 * torch.randn(ratio, width, generator=gen)
    positions = ratio + torch.randperm(batch * 3, generator=gen)[:batch]
    slot_ids = torch.randperm(slots, generator=gen)[:batch]
    return kv_state, score_state, kv, score, ape, positions, slot_ids


def _compare(op, out, expected):
    ladder.get_check(op).compare(out.cpu(), expected.cpu())


@pytest.mark.op("compressor_decode")
@pytest.mark.parametrize("ratio", (4, 128))
@pytest.mark.parametrize("d, fused", ((512, True), (512, False), (128, False)), ids=["attn-fp8", "attn", "indexer"])
def test_decode_256_sequences_on_device(impl, device, ratio, d, fused):
    _device_only(device)
    gen = torch.Generator().manual_seed(ratio + d)
    kv_state, score_state, kv, score, ape, positions, slot_ids = _decode_setup(ratio, d, 256, gen)
    extra = ()
    if fused:
        cos, sin = rope_tables(torch.arange(1024))
        pages = torch.zeros(8, 64 * TOKEN_BYTES, dtype=torch.uint8)
        extra = (1.0 + 0.2 * torch.randn(d, generator=gen), cos, sin, pages, 64, torch.randperm(512, generator=gen)[:256])
    args = (kv_state, score_state, kv, score, ape, positions, ratio, slot_ids, *extra)
    on_device = [a.clone().to(device) if isinstance(a, torch.Tensor) else a for a in args]
    entries, emitted = dk.compressor_decode(*on_device, impl=impl)
    want, want_emitted = ref.compressor_decode(*args)
    assert torch.equal(emitted.cpu(), want_emitted)
    _compare("compressor_decode", entries, want)
    assert torch.equal(on_device[0].cpu().nan_to_num(neginf=-7), args[0].nan_to_num(neginf=-7))
    assert torch.equal(on_device[1].cpu().nan_to_num(neginf=-7), args[1].nan_to_num(neginf=-7))
    if fused:
        assert torch.equal(on_device[11].cpu(), args[11])


@pytest.mark.op("compressor_decode")
@pytest.mark.parametrize("ratio", (4, 128))
def test_decode_step_replays_in_a_cuda_graph(impl, device, ratio):
    _device_only(device)
    if impl == "reference":
        pytest.skip("CUDA-graph capture is the kernels' contract; the reference is the oracle, not a decode-path op")
    gen = torch.Generator().manual_seed(ratio)
    d = 512
    kv_state, score_state, kv, score, ape, positions, slot_ids = _decode_setup(ratio, d, 256, gen)
    positions[:2] = torch.tensor([3 * ratio - 2, 5 * ratio - 3])   # row 0 emits at replay 1, row 1 at replay 2
    cos, sin = rope_tables(torch.arange(2048))
    weight = 1.0 + 0.2 * torch.randn(d, generator=gen)
    pages = torch.zeros(8, 64 * TOKEN_BYTES, dtype=torch.uint8)
    cache_slots = torch.randperm(512, generator=gen)[:256]
    host = [kv_state, score_state, kv, score, ape, positions, slot_ids, weight, cos, sin, pages, cache_slots]
    dev = [t.to(device) for t in host]
    s_kv, s_sc, t_kv, t_sc, t_ape, t_pos, t_ids, t_w, t_cos, t_sin, t_pages, t_cslots = dev

    def step():
        return dk.compressor_decode(s_kv, s_sc, t_kv, t_sc, t_ape, t_pos, ratio, t_ids, t_w, t_cos, t_sin, t_pages, 64,
                                    t_cslots, impl=impl)
    step()                                         # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        entries, emitted = step()
    for _ in range(2):                             # new tokens at the next positions: emission moves
        kv_state, score_state, pages = s_kv.cpu(), s_sc.cpu(), t_pages.cpu()
        t_kv.copy_(torch.randn(256, _coff(ratio) * d, generator=gen).to(device))
        t_pos.add_(1)
        graph.replay()
        want, want_emitted = ref.compressor_decode(kv_state, score_state, t_kv.cpu(), t_sc.cpu(), ape, t_pos.cpu(),
                                                   ratio, slot_ids, weight, cos, sin, pages, 64, cache_slots)
        assert torch.equal(emitted.cpu(), want_emitted) and bool(want_emitted.any())
        _compare("compressor_decode", entries, want)
        assert torch.equal(t_pages.cpu(), pages)


@pytest.mark.op("compressor_prefill")
@pytest.mark.parametrize("ratio", (4, 128))
def test_prefill_64k_tokens_on_device(impl, device, ratio):
    _device_only(device)
    gen = torch.Generator().manual_seed(ratio)
    d, S = 128, 65536 + 5
    width = _coff(ratio) * d
    kv, score, ape = torch.randn(S, width, generator=gen), 2.0 * torch.randn(S, width, generator=gen), \
        0.5 * torch.randn(ratio, width, generator=gen)
    got = dk.compressor_prefill(kv.to(device), score.to(device), ape.to(device), ratio, impl=impl)
    want = ref.compressor_prefill(kv, score, ape, ratio)
    _compare("compressor_prefill", got[0], want[0])
    for g, w in zip(got[1:], want[1:]):
        assert torch.equal(g.cpu().nan_to_num(neginf=-7), w.nan_to_num(neginf=-7))


@pytest.mark.op("compressor_prefill_batched")
@pytest.mark.parametrize("ratio", (4, 128))
def test_chunked_prefill_of_64_sequences_on_device(impl, device, ratio):
    """64 sequences, prefixes of random length in their slots, chunks of random length (some empty): each
    chunk's entries and slot equal the reference batched prefill; and they equal the one-shot prefill."""
    _device_only(device)
    gen = torch.Generator().manual_seed(ratio + 1)
    d, B = 512, 64
    width = _coff(ratio) * d
    lengths = torch.randint(0, 700, (B,), generator=gen)
    lengths[0] = 0
    starts = torch.randint(0, 3000, (B,), generator=gen)
    starts[1] = 0
    kv_state = torch.randn(B, _coff(ratio) * ratio, width, generator=gen)
    score_state = 2.0 * torch.randn(B, _coff(ratio) * ratio, width, generator=gen)
    N = int(lengths.sum())
    kv, score = torch.randn(N, width, generator=gen), 2.0 * torch.randn(N, width, generator=gen)
    ape = 0.5 * torch.randn(ratio, width, generator=gen)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)
    slot_ids = torch.randperm(B, generator=gen)
    args = [kv.bfloat16(), score.bfloat16(), ape, ratio, cu, kv_state, score_state, starts, slot_ids]
    dev = [a.clone().to(device) if isinstance(a, torch.Tensor) else a for a in args]
    entries, emitted = dk.compressor_prefill_batched(*dev, impl=impl)
    want, want_emitted = ref.compressor_prefill_batched(*args)
    assert torch.equal(emitted.cpu(), want_emitted)
    _compare("compressor_prefill_batched", entries, want)
    for g, w in ((dev[5], args[5]), (dev[6], args[6])):
        assert torch.equal(g.cpu().nan_to_num(neginf=-7), w.nan_to_num(neginf=-7))


@pytest.mark.op("indexer_cache_quantize")
@pytest.mark.parametrize("n", (512, 16384 + 7, 65536), ids=["hca-64k-entries", "csa-64k-entries-tail", "batch-64k"])
def test_indexer_cache_quantize_on_device(impl, device, n):
    """V4 entry counts (a 64K-token prefill: 512 ratio-128 or 16K ratio-4 entries; a large batch), normed rows
    with NaN / inf rows, an all-zero row and -0 mixed in, against the reference bytes. The TileLang kernel's
    numerics run only here (it does not run on the CPU)."""
    _device_only(device)
    gen = torch.Generator().manual_seed(n)
    cos, sin = rope_tables(torch.arange(4096))
    x = ref.compressor_norm_rope(0.3 * torch.randn(n, 128, generator=gen), 1.0 + 0.2 * torch.randn(128, generator=gen),
                                 cos, sin, torch.randint(0, 4096, (n,), generator=gen))
    x[1] = 0.0
    x[2] = -0.0
    x[3, 5] = float("nan")
    x[4, 9] = float("inf")
    x[n - 1] *= 2.0 ** 12
    packed, scale = dk.indexer_cache_quantize(x.to(device), impl=impl)
    want_packed, want_scale = ref.indexer_cache_quantize(x)
    assert torch.equal(scale.cpu(), want_scale)
    assert torch.equal(packed.cpu(), want_packed)
    assert bool((scale[3:5].cpu() == 255).all())
