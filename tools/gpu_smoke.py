"""Every kernel path once on the GPU, for compute-sanitizer (memcheck, racecheck): flat and
multi-tensor, every dtype, odd sizes, unaligned views, empty tensors, several launches."""
import torch

from momentum_cuda import _C

torch.manual_seed(0)
dev = "cuda"
H = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True, maximize=False)
for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    for n, off in ((0, 0), (1, 0), (3, 1), (97, 3), (2**20 + 3, 5), (70000, 7)):
        base = [torch.randn(n + off + 8, device=dev).to(dt) for _ in range(3)]
        p, g, b = (t[off:off + n] for t in base)
        for first in (True, False):
            _C.cuda_sgd_step_flat_(p, g, b, torch.tensor([[0, n]]), first_step=first, **H)
    sizes = [0, 1, 3, 97, 65536 * 3 + 1] + [17] * 400  # > 320 tensors: several launches
    ps = [torch.randn(s, device=dev).to(dt) for s in sizes]
    gs = [torch.randn(s, device=dev).to(dt) for s in sizes]
    bs = [torch.randn(s, device=dev).to(dt) for s in sizes]
    for first in (True, False):
        _C.cuda_sgd_step_list_(ps, gs, bs, first_step=first, **H)
torch.cuda.synchronize()
print("gpu_smoke: every kernel path ran")
