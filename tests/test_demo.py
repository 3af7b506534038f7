"""`dsv4k demo`: the tiny V4 block passes, and a broken decode path makes it fail."""
import torch

import dsv4_kernels as dk
from dsv4_kernels import demo, dispatch


def test_demo_block_passes_both_checks_on_both_layers():
    results, chosen = demo.run_demo(prefill_len=250, decode_steps=8)
    checks = ["dispatch vs reference: attn", "dispatch vs reference: moe", "dispatch vs reference: out",
              "prefill+decode vs prefill"]
    assert [(r.ratio, r.check) for r in results] == [(4, c) for c in checks] + [(128, c) for c in checks]
    assert all(r.ok for r in results), [(r.ratio, r.check, r.calc_diff, r.note) for r in results]
    ops = {op for op, _ in chosen}
    assert {"mhc_pre", "mhc_post", "sparse_mqa", "compressor_prefill", "compressor_decode", "hash_topk",
            "score_topk", "fp4_grouped_moe"} <= ops


def test_demo_catches_a_decode_path_that_never_emits(monkeypatch):
    real = dk.compressor_decode

    def never_emits(*args, **kwargs):
        entries, emitted = real(*args, **kwargs)
        return entries, torch.zeros_like(emitted)

    monkeypatch.setattr(dk, "compressor_decode", never_emits)
    # The check under test compares two reference paths: the kernels (interpreter time) are not needed here.
    monkeypatch.setenv("DSV4K_IMPL", ",".join(f"{op}=reference" for op in dispatch.ops()))
    results, _ = demo.run_demo(prefill_len=120, decode_steps=8)  # decode step 8 completes block 0 of ratio 128
    failed = [(r.ratio, r.check) for r in results if not r.ok]
    assert (128, "prefill+decode vs prefill") in failed


def test_demo_says_plainly_when_only_references_ran(monkeypatch, capsys):
    """On a CPU without the interpreter the dispatcher can only run references: the demo must say that its
    'dispatch vs reference' check compared the reference with itself."""
    monkeypatch.setattr(demo, "run_demo", lambda *a: ([], {("mhc_pre", "reference"): 2, ("sparse_mqa", "reference"): 1}))
    assert demo.main(8, 1) == 0
    assert "compared the reference with itself" in capsys.readouterr().out
    monkeypatch.setattr(demo, "run_demo", lambda *a: ([], {("mhc_pre", "triton"): 2, ("sparse_mqa", "reference"): 1}))
    demo.main(8, 1)
    assert "ops with no kernel here, run by their reference: sparse_mqa" in capsys.readouterr().out
