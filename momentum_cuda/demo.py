"""momentum_cuda demo (`python -m momentum_cuda.demo`, what `make demo` runs).

1. Trains the same small MLP on scikit-learn's bundled digits data set (no download) twice, from
   identical initial weights on identical batches: once with torch.optim.SGD(foreach=False) and
   once with momentum_cuda.SGD. After every epoch it prints both losses in full precision and
   whether all parameters are bitwise equal (torch.equal). Exits 1 if any epoch is not.
2. Times one optimizer step of torch's for-loop, foreach and fused SGD and momentum_cuda.SGD on a
   ~25 M-parameter model (fp32), interleaved, and prints the medians.
"""
from __future__ import annotations

import copy
import sys
import time

import torch
from torch import nn

import momentum_cuda

HYPER = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
EPOCHS = 8
BATCH = 32
SEED = 0


# ---- 1. training side by side -----------------------------------------------------------------
def load_digits_split(seed: int):
    """scikit-learn's 8x8 digits (1797 images, bundled with the package): 80 % train, 20 % test."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.8 * len(x))
    tr, te = perm[:n_train], perm[n_train:]
    return (x[tr], y[tr]), (x[te], y[te])


def make_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 10))


def params_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def accuracy(model: nn.Module, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train_side_by_side() -> bool:
    (x_tr, y_tr), (x_te, y_te) = load_digits_split(SEED)
    ref = make_mlp(SEED)
    ours = copy.deepcopy(ref)  # identical initial weights
    opts = {"torch": torch.optim.SGD(ref.parameters(), foreach=False, **HYPER),
            "momentum_cuda": momentum_cuda.SGD(ours.parameters(), **HYPER)}
    models = {"torch": ref, "momentum_cuda": ours}
    loss_fn = nn.CrossEntropyLoss()
    hp = ", ".join(f"{k}={v}" for k, v in HYPER.items())
    print(f"== 1. digits MLP ({sum(p.numel() for p in ref.parameters()):,} params, "
          f"{len(x_tr)} train / {len(x_te)} test images), {EPOCHS} epochs, batch {BATCH}, {hp}")
    print("   torch.optim.SGD(foreach=False) vs momentum_cuda.SGD, same initial weights, same batches")

    all_equal = True
    gen = torch.Generator().manual_seed(SEED + 1)
    for epoch in range(1, EPOCHS + 1):
        order = torch.randperm(len(x_tr), generator=gen)
        totals = {name: 0.0 for name in models}
        batches = 0
        for i in range(0, len(order), BATCH):
            idx = order[i:i + BATCH]
            xb, yb = x_tr[idx], y_tr[idx]
            for name, model in models.items():
                opt = opts[name]
                opt.zero_grad()
                loss = loss_fn(model(xb), yb)
                loss.backward()
                opt.step()
                totals[name] += loss.item()
            batches += 1
        losses = {name: total / batches for name, total in totals.items()}
        equal = params_equal(ref, ours) and losses["torch"] == losses["momentum_cuda"]
        all_equal &= equal
        print(f"   epoch {epoch}: loss torch {losses['torch']!r:<22} momentum_cuda "
              f"{losses['momentum_cuda']!r:<22} bitwise equal: {'yes' if equal else 'NO'}")

    step = opts["momentum_cuda"].last_step
    print(f"   momentum_cuda step: backend {opts['momentum_cuda'].backend!r}, "
          + ", ".join(f"{c['tensors']} tensors / {c['numel']:,} params in one {c['path']} call"
                      for c in step))
    print(f"   test accuracy: torch {accuracy(ref, x_te, y_te):.4f}, "
          f"momentum_cuda {accuracy(ours, x_te, y_te):.4f}")
    print(f"   verdict: {'BITWISE EQUAL in every epoch' if all_equal else 'NOT bitwise equal'}")
    return all_equal


# ---- 2. step timing on a large model ----------------------------------------------------------
def make_large(seed: int) -> nn.Module:
    """~25 M fp32 parameters in a few big Linear layers."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2048, 4096), nn.Linear(4096, 2048), nn.Linear(2048, 4096))


def time_steps(rounds: int = 15, warmup: int = 2) -> bool:
    base = make_large(SEED)
    gen = torch.Generator().manual_seed(SEED + 2)
    grads = [torch.randn(p.shape, generator=gen) for p in base.parameters()]
    numel = sum(p.numel() for p in base.parameters())
    makers = {
        "torch for-loop": lambda ps: torch.optim.SGD(ps, foreach=False, **HYPER),
        "torch foreach": lambda ps: torch.optim.SGD(ps, foreach=True, **HYPER),
        "torch fused": lambda ps: torch.optim.SGD(ps, fused=True, **HYPER),
        "momentum_cuda": lambda ps: momentum_cuda.SGD(ps, **HYPER),
    }
    models, opts = {}, {}
    for name, make in makers.items():
        model = copy.deepcopy(base)
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()  # set once; every step sees the same gradients
        models[name], opts[name] = model, make(list(model.parameters()))
    del base, grads

    print(f"\n== 2. one optimizer step on a {numel / 1e6:.1f} M-parameter fp32 model "
          f"({len(list(models['torch fused'].parameters()))} tensors), "
          f"{torch.get_num_threads()} threads, {rounds} interleaved rounds after {warmup} warm-up")
    names = list(opts)
    for _ in range(warmup):
        for name in names:
            opts[name].step()
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            opts[name].step()
            times[name].append((time.perf_counter() - t0) * 1e3)

    med = {name: torch.tensor(ts).median().item() for name, ts in times.items()}
    print(f"   {'optimizer':<16}{'median ms':>10}{'min ms':>9}{'max ms':>9}{'GB/s':>8}"
          f"{'vs for-loop':>13}{'vs foreach':>12}{'vs fused':>10}")
    for name, ts in times.items():
        gbps = numel * 20 / (med[name] * 1e-3) / 1e9  # p, g, buf read; p, buf written
        print(f"   {name:<16}{med[name]:>10.2f}{min(ts):>9.2f}{max(ts):>9.2f}{gbps:>8.1f}"
              + "".join(f"{med[b] / med[name]:>{w}.2f}x" for b, w in
                        (("torch for-loop", 12), ("torch foreach", 11), ("torch fused", 9))))
    print("   ('vs X' = X's median / this median: > 1 is faster than X; GB/s at 20 bytes/param;\n"
          "    with weight_decay and nesterov torch's for-loop and foreach allocate temporaries)")
    equal = params_equal(models["torch for-loop"], models["momentum_cuda"])
    print(f"   after {warmup + rounds} steps each: momentum_cuda == torch for-loop bitwise: "
          f"{'yes' if equal else 'NO'}")
    return equal


def main() -> int:
    t0 = time.perf_counter()
    print(f"momentum_cuda {momentum_cuda.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    ok = train_side_by_side()
    ok &= time_steps()
    print(f"\ndone in {time.perf_counter() - t0:.1f} s: "
          f"{'momentum_cuda matched torch.optim.SGD bit for bit' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
