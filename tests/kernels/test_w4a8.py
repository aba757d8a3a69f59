"""kernels.w4a8: the packed layout round-trips, and the C++ kernel equals its torch reference on every path this
machine has (plain, AVX2, AVX-512, each run in a subprocess under ATEN_CPU_CAPABILITY, so that a crash fails the
test), for 1 to 9 rows (every tile remainder), odd block counts and every group size; and it stays within the
activations' INT8 rounding of the exact fp32 product."""

from __future__ import annotations

import json

import pytest
import torch

from kernels import w4a8
from tests.conftest import cpu_capabilities, run_under_capability

CASES = [  # (M, N, K, group): K / 32 odd and even, N not a multiple of anything
    (1, 48, 96, 32),
    (2, 17, 64, 64),
    (3, 64, 128, 64),
    (4, 33, 160, 32),
    (5, 16, 256, 128),
    (9, 70, 384, 128),
]


def operands(M, N, K, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (N, K), generator=g)
    scale = (torch.rand(N, K // group, generator=g) * 0.05).to(torch.bfloat16)
    mn = (torch.randn(N, K // group, generator=g) * 0.2).to(torch.bfloat16)
    x = torch.randn(M, K, generator=g) * 3
    x[0, :32] = 0  # an all-zero block: its scale is 0
    return x, w4a8.pack(q), w4a8.tile_rows(scale), w4a8.tile_rows(mn), q


def test_pack_round_trips_in_tiles_of_16_rows():
    q = torch.randint(0, 16, (21, 96))
    packed = w4a8.pack(q)
    assert packed.shape == (2, 3, 256) and packed.dtype == torch.uint8  # 21 rows: 2 tiles, the second padded
    assert torch.equal(w4a8.unpack(packed, 21), q.to(torch.uint8))
    # tile 1, block 2, chunk 3: 4 bytes per row; row 1 of the tile is row 17, inputs 64 + 12 .. (low) and 64 + 28 ..
    chunk = packed[1, 2, 3 * 64 : 4 * 64].view(16, 4)
    assert torch.equal(chunk[1] & 15, q[17, 76:80].to(torch.uint8))
    assert torch.equal(chunk[1] >> 4, q[17, 92:96].to(torch.uint8))
    assert not chunk[5:].any()  # rows 21.. do not exist: zeros
    s = torch.randn(21, 3)
    assert torch.equal(w4a8.untile_rows(w4a8.tile_rows(s), 21), s.to(torch.bfloat16))
    with pytest.raises(ValueError, match="multiple of 32"):
        w4a8.pack(q[:, :40])


def test_reference_is_the_exact_product_up_to_the_activations_rounding():
    x, packed, scale, mn, q = operands(4, 64, 256, 64)
    s, m = w4a8.untile_rows(scale, 64).float(), w4a8.untile_rows(mn, 64).float()
    exact = x @ (q.float() * s.repeat_interleave(64, 1) + m.repeat_interleave(64, 1)).T
    ref = w4a8.reference(x, packed, scale, mn, 64, 64)
    err = (ref - exact).abs().max() / exact.abs().max()
    assert 0 < err < 0.02, err  # int8 activations: about 1/254 of each block's largest input, per input


PARITY = """
import json, sys, torch
from kernels import w4a8
from tests.kernels.test_w4a8 import CASES, operands
assert w4a8.load()
out = {"level": w4a8.level()}
for case in CASES:
    x, packed, scale, mn, _ = operands(*case)
    M, N, K, group = case
    ref = w4a8.reference(x, packed, scale, mn, N, group)
    for name, y in (("kernel", w4a8.linear(x, packed, scale, mn, N, group)),
                    ("torch", w4a8.dequantized_product(x, packed, scale, mn, N, group))):
        out[f"{case} {name}"] = ((y - ref).abs().max() / ref.abs().max()).item()
if sys.argv[1:] == ["compile"]:
    compiled = torch.compile(lambda x, p, s, m: w4a8.linear(x, p, s, m, 60, 64) + 1)
    x, packed, scale, mn, _ = operands(3, 60, 128, 64)
    y = compiled(x, packed, scale, mn) - 1
    out["compiled"] = (y - w4a8.linear(x, packed, scale, mn, 60, 64)).abs().max().item()
print(json.dumps(out))
"""


@pytest.mark.parametrize("capability", cpu_capabilities())
def test_kernel_equals_reference_under_every_capability(capability):
    best = capability == cpu_capabilities()[-1]  # torch.compile's graph once, at the machine's own width
    proc = run_under_capability(capability, ["-c", PARITY, *(["compile"] if best else [])])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.pop("level") == w4a8.LEVELS[capability.upper()]
    if best:
        assert out.pop("compiled") < 1e-5  # torch.compile calls the op as it is
    for key, err in out.items():
        assert err < 1e-5, (key, err)  # float32 sums in another order, nothing more


def test_kernel_refuses_bad_shapes_with_the_reason():
    x, packed, scale, mn, _ = operands(2, 16, 64, 32)
    with pytest.raises(RuntimeError, match="must split into groups of 48"):
        w4a8.linear(x, packed, scale, mn, 16, 48)
    with pytest.raises(RuntimeError, match=r"packed must be contiguous uint8 \(1, 1, 256\) for N=16, K=32"):
        w4a8.linear(x[:, :32].contiguous(), packed, scale, mn, 16, 32)
    with pytest.raises(RuntimeError, match=r"packed must be contiguous uint8 \(2, 2, 256\) for N=17"):
        w4a8.linear(x, packed, scale, mn, 17, 32)
    with pytest.raises(RuntimeError, match="scale and min must be contiguous bf16"):
        w4a8.linear(x, packed, scale.float(), mn, 16, 32)
