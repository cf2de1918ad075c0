"""The modes of issue 14 side by side in one optimizer, with gradients as DDP hands them over
(gradient_as_bucket_view=True: every .grad a view of one flat bucket per dtype, filled in
reverse parameter order, zeroed in place by zero_grad(set_to_none=False)), flat and per-tensor:
a group of each mode (stochastic rounding, bf16 and fp16 master weights, int8 and bf16
momentum) and a plain fp32 group, each against its plain-torch reference stepped by hand."""
import pytest
import torch

import momentum_cuda
from momentum_cuda.reference import (pack_ties, sgd_fp16_master_reference_step,
                                     sgd_master_reference_step,
                                     sgd_momentum_dtype_reference_step, sgd_sr_reference_step,
                                     sr_key)
from torch.optim.sgd import sgd as torch_sgd

from conftest import bits

H = dict(lr=0.05, momentum=0.9, weight_decay=1e-2)
SHAPES = [(97,), (5, 7), (300,)]
GROUPS = [  # (dtype, group keys)
    (torch.bfloat16, dict(stochastic_rounding=True, sr_seed=11)),
    (torch.bfloat16, dict(master_weights=True)),
    (torch.float16, dict(master_weights=True)),
    (torch.float32, dict(momentum_dtype=torch.int8)),
    (torch.float32, dict(momentum_dtype=torch.bfloat16)),
    (torch.float32, dict()),
]


def _buckets(params):
    """DDP-style buckets: one flat tensor per dtype, views handed out in reverse order."""
    out = {}
    for dt in {p.dtype for p in params}:
        ps = [p for p in reversed(params) if p.dtype == dt]
        flat = torch.zeros(sum(p.numel() for p in ps), dtype=dt)
        off = 0
        for p in ps:
            p.grad = flat[off:off + p.numel()].view(p.shape)
            off += p.numel()
        out[dt] = flat
    return out


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "per-tensor"])
def test_every_mode_in_one_optimizer_with_bucket_view_gradients(flat):
    gen = torch.Generator().manual_seed(31)
    groups, ref = [], []
    for dt, keys in GROUPS:
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dt)) for s in SHAPES]
        groups.append(dict(params=ps, **keys))
        ref.append([p.detach().clone() for p in ps])
    opt = momentum_cuda.SGD(groups, flat=flat, **H)
    params = [p for g in groups for p in g["params"]]
    buckets = _buckets(params)
    state = [[dict() for _ in SHAPES] for _ in GROUPS]
    for step in range(1, 5):
        opt.zero_grad(set_to_none=False)
        for b in buckets.values():
            assert not b.any()  # zeroed in place, still the gradients' storage
        for p in params:
            p.grad.copy_(torch.randn(p.shape, generator=gen).to(p.dtype))
        gs = [[p.grad.clone() for p in g["params"]] for g in groups]
        opt.step()
        pos = 0
        for k, ((dt, keys), rs, st, g) in enumerate(zip(GROUPS, ref, state, gs)):
            for i, (r, s, gi) in enumerate(zip(rs, st, g)):
                if keys.get("stochastic_rounding"):
                    (s["buf"],) = sgd_sr_reference_step([r], [gi], [s.get("buf")],
                                                        [sr_key(11, step, pos + i)], **H)
                elif keys.get("master_weights") and dt is torch.bfloat16:
                    s.setdefault("rem", torch.zeros(r.shape, dtype=torch.int16))
                    s.setdefault("ties", pack_ties(torch.zeros(r.shape, dtype=torch.bool)))
                    (s["buf"],) = sgd_master_reference_step([r], [gi], [s.get("buf")],
                                                            [s["rem"]], [s["ties"]], **H)
                elif keys.get("master_weights"):
                    s.setdefault("m", r.float())
                    (s["buf"],) = sgd_fp16_master_reference_step([r], [gi], [s.get("buf")],
                                                                 [s["m"]], **H)
                elif keys.get("momentum_dtype") is not None:
                    int8 = keys["momentum_dtype"] is torch.int8
                    (s["buf"],), sc = sgd_momentum_dtype_reference_step(
                        [r], [gi], [s.get("buf")], [s.get("sc")] if int8 else None, **H)
                    if int8:
                        s["sc"] = sc[0]
                else:
                    bufs = [s.get("buf")]
                    torch_sgd([r], [gi], bufs, foreach=False, dampening=0.0, nesterov=False,
                              maximize=False, **H)
                    s["buf"] = bufs[0]
            pos += len(rs)
            for i, (p, r, s) in enumerate(zip(groups[k]["params"], rs, st)):
                assert torch.equal(bits(p), bits(r)), f"step {step} group {k} param {i}"
                b = opt.state[p]["momentum_buffer"]
                assert b.dtype == s["buf"].dtype and torch.equal(bits(b), bits(s["buf"])), \
                    f"step {step} group {k} buffer {i}"
                if "sc" in s:
                    assert torch.equal(bits(opt.state[p]["momentum_scales"]), bits(s["sc"]))
                if "m" in s:
                    assert torch.equal(bits(opt.master_weight(p)), bits(s["m"]))
    for p in params:  # the gradients are still the buckets' views
        assert any(p.grad.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
                   for b in buckets.values())
    paths = {e["path"] for e in opt.last_step}
    assert {"stochastic-rounding", "master", "momentum-dtype"} <= paths


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "per-tensor"])
@pytest.mark.parametrize("dt,keys", GROUPS[:-1], ids=["sr", "master-bf16", "master-fp16",
                                                       "momentum-int8", "momentum-bf16"])
def test_a_sparse_gradient_is_refused_before_anything_is_written(flat, dt, keys):
    """The modes' ops take dense gradients: a sparse one raises naming the mode and the
    parameter, with nothing stepped (a strided dense one is copied and stepped)."""
    gen = torch.Generator().manual_seed(32)
    p = torch.nn.Parameter(torch.randn(10, generator=gen).to(dt))
    q = torch.nn.Parameter(torch.randn(7, generator=gen).to(dt))
    opt = momentum_cuda.SGD([dict(params=[p, q], **keys)], flat=flat, **H)
    p.grad = torch.randn(10, generator=gen).to(dt).to_sparse()
    q.grad = torch.randn(14, generator=gen).to(dt)[::2]
    before = [p.detach().clone(), q.detach().clone()]
    with pytest.raises(RuntimeError, match=r"needs a dense torch\.\w+ gradient of the "
                                           r"parameter's shape; the parameter of shape \(10,\)"):
        opt.step()
    assert torch.equal(bits(p), bits(before[0])) and torch.equal(bits(q), bits(before[1]))
    assert not opt.state
    p.grad = None
    opt.step()
    assert not torch.equal(bits(q), bits(before[1]))
