"""momentum_cuda demo: `momentum-cuda demo`, `python -m momentum_cuda.demo`, what `make demo` runs.

All training is on scikit-learn's bundled 8x8 digits (no download), a small MLP, batch 32, the
same initial weights and the same batches for every optimizer in a part.

(a) Drop-in check. torch.optim.SGD(foreach=False) and momentum_cuda.SGD (lr 0.1, Nesterov momentum
    0.9, weight decay 1e-4) side by side. After every epoch: both losses in full precision (repr)
    and whether every parameter AND every momentum buffer is bitwise equal (torch.equal) and the
    batch losses of the epoch are identical. Any epoch that is not makes the demo exit 1.
(b) Does momentum converge faster? From one initialisation:
      plain SGD           momentum_cuda.SGD(lr=a)                      (momentum 0)
      momentum, EMA form  momentum_cuda.Momentum(lr=a/(1-b), momentum=b)
      momentum, SGD form  momentum_cuda.SGD(lr=a, momentum=b)         (heavy ball)
      control             momentum_cuda.SGD(lr=a/(1-b))                (momentum 0)
    with a = 0.05, b = 0.9. The EMA form v = b*v + (1-b)*g, theta -= lr*v with lr = a/(1-b)
    takes exactly heavy-ball SGD's steps (a/(1-b) * v_t = a * sum_k b^(t-k) g_k = a * buf_t), so
    the two momentum runs differ by rounding only: the comparison with plain SGD at the same a is
    the textbook one. The control is plain SGD at momentum's effective step size a/(1-b): it tells
    whether the gain is more than the larger step. The loss on the full training set is measured
    after every step; the report says which optimizer first reached the loss plain SGD ends with
    and the final test accuracies, computed from this run, not assumed.
(c) <out>/demo-loss.png: (b)'s loss curves, (a)'s two curves on top of each other, and (e)'s.
(d) `momentum-cuda bench --quick --out <out>` (unless --no-bench): the step timings.

(e) bf16 parameters at a small step (lr 0.01, momentum 0.9): momentum_cuda.SGD on fp32 weights,
    on bf16 weights (each op rounds to nearest even: updates under half a bf16 ulp are lost), on
    bf16 weights with stochastic_rounding=True (rounded up or down with the probability that
    keeps the mean) and with master_weights=True (exact fp32 masters). Full training-set loss
    after every step, the final losses and how many weights ever moved, computed from this run.

Exit code 0; 1 if (a) found a bit that differs or the benchmark failed.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import sys
import time

import torch
from torch import nn

import momentum_cuda

DEFAULT_OUT = "momentum-cuda-out"
DEFAULT_EPOCHS = 10
BATCH = 32
SEED = 0
PNG_NAME = "demo-loss.png"
DESCRIPTION = ("Train a small MLP on scikit-learn's digits with torch.optim.SGD and "
               "momentum_cuda.SGD side by side (bitwise check every epoch), compare plain SGD "
               f"with momentum, plot the losses to <out>/{PNG_NAME}, then run "
               "`momentum-cuda bench --quick`.")
# (a): the hyper-parameters where torch's for-loop does the most work (nesterov + weight decay).
HYPER = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
# (b): plain SGD's learning rate a and the momentum b (see the module doc for the EMA form's lr).
LR, BETA = 0.05, 0.9
SMOOTH = 15  # steps in (a)'s running mean in the plot: batch losses are noisy


# ---- arguments --------------------------------------------------------------------------------
def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (argparse prefixes the message with the argument's name)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options, shared by `momentum-cuda demo` and `python -m momentum_cuda.demo`."""
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"folder for {PNG_NAME} and the benchmark's files, created if "
                             f"missing (default: ./{DEFAULT_OUT})")
    parser.add_argument("--epochs", type=positive_int, default=DEFAULT_EPOCHS, metavar="N",
                        help=f"epochs of training in parts (a) and (b) (default: {DEFAULT_EPOCHS})")
    parser.add_argument("--no-bench", action="store_true",
                        help="skip part (d), the `bench --quick` step timings")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where to train (default: cpu)")


# ---- data, model, one training loop for both parts ---------------------------------------------
def load_digits_split(seed: int, device: torch.device):
    """scikit-learn's 8x8 digits (1797 images, bundled with the package): 80 % train, 20 % test."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.8 * len(x))
    tr, te = perm[:n_train], perm[n_train:]
    return (x[tr].to(device), y[tr].to(device)), (x[te].to(device), y[te].to(device))


def make_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 10))


def twins(base: nn.Module, makers: dict) -> tuple[dict, dict]:
    """One deep copy of `base` per optimizer (identical initial weights), each with its optimizer;
    the copy comes first because momentum_cuda moves the parameters into its flat buffer."""
    models = {name: copy.deepcopy(base) for name in makers}
    return models, {name: make(list(models[name].parameters())) for name, make in makers.items()}


LOSS_FN = nn.CrossEntropyLoss()


def forward(model: nn.Module, x) -> torch.Tensor:
    """The model's fp32 logits: inputs in its dtype (a no-op for fp32), logits widened."""
    return model(x.to(next(model.parameters()).dtype)).float()


def full_loss(model: nn.Module, x, y) -> float:
    with torch.no_grad():
        return LOSS_FN(forward(model, x), y).item()


def accuracy(model: nn.Module, x, y) -> float:
    with torch.no_grad():
        return (forward(model, x).argmax(1) == y).float().mean().item()


def train(models: dict, opts: dict, data, epochs: int, probe=None, on_epoch=None) -> dict:
    """Steps every optimizer on the same batches in lockstep (one shuffle per epoch, shared) and
    returns {name: one loss per step}: the batch loss, or probe(model) after the step if given.
    on_epoch(epoch, curves) runs after each epoch (the checks and prints of each part)."""
    x, y = data
    gen = torch.Generator().manual_seed(SEED + 1)
    curves = {name: [] for name in models}
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(x), generator=gen).to(x.device)
        for i in range(0, len(order), BATCH):
            idx = order[i:i + BATCH]
            for name, model in models.items():
                opts[name].zero_grad()
                loss = LOSS_FN(forward(model, x[idx]), y[idx])
                loss.backward()
                opts[name].step()
                curves[name].append(probe(model) if probe else loss.item())
        if on_epoch:
            on_epoch(epoch, curves)
    return curves


def steps_per_epoch(n_train: int) -> int:
    return math.ceil(n_train / BATCH)


# ---- (a) torch.optim.SGD vs momentum_cuda.SGD, bit for bit -------------------------------------
def state_equal(models: dict, opts: dict) -> bool:
    """Every parameter and every momentum buffer of the two runs bitwise equal (torch.equal)."""
    (ma, mb), (oa, ob) = models.values(), opts.values()
    for p, q in zip(ma.parameters(), mb.parameters(), strict=True):
        bp, bq = oa.state[p].get("momentum_buffer"), ob.state[q].get("momentum_buffer")
        if not torch.equal(p, q) or (bp is None) != (bq is None) or (
                bp is not None and not torch.equal(bp, bq)):
            return False
    return True


def part_a(data, test, epochs: int) -> tuple[bool, dict]:
    """Runs (a); returns (bitwise equal in every epoch, per-step batch losses)."""
    models, opts = twins(make_mlp(SEED), {
        "torch.optim.SGD": lambda ps: torch.optim.SGD(ps, foreach=False, **HYPER),
        "momentum_cuda.SGD": lambda ps: momentum_cuda.SGD(ps, **HYPER)})
    spe = steps_per_epoch(len(data[0]))
    hp = ", ".join(f"{k}={v}" for k, v in HYPER.items())
    print(f"== (a) torch.optim.SGD(foreach=False) vs momentum_cuda.SGD: digits MLP "
          f"({sum(p.numel() for p in models['torch.optim.SGD'].parameters()):,} params, "
          f"{len(data[0])} train / {len(test[0])} test images), {epochs} epochs of {spe} steps, "
          f"batch {BATCH}, {hp}; same initial weights, same batches")
    print("   bitwise equal = every parameter, every momentum buffer and every batch loss of the "
          "epoch, torch.equal / ==")
    verdicts = []

    def check(epoch: int, curves: dict) -> None:
        this = {name: c[-spe:] for name, c in curves.items()}
        equal = state_equal(models, opts) and this["torch.optim.SGD"] == this["momentum_cuda.SGD"]
        verdicts.append(equal)
        mean = {name: sum(c) / len(c) for name, c in this.items()}
        print(f"   epoch {epoch:>2}: mean batch loss torch {mean['torch.optim.SGD']!r:<20} "
              f"momentum_cuda {mean['momentum_cuda.SGD']!r:<20} "
              f"bitwise equal: {'yes' if equal else 'NO'}")

    curves = train(models, opts, data, epochs, on_epoch=check)
    ours = opts["momentum_cuda.SGD"]
    print(f"   momentum_cuda step: backend {ours.backend!r}, "
          + ", ".join(f"{c['tensors']} tensors / {c['numel']:,} params in one {c['path']} call"
                      for c in ours.last_step))
    print("   test accuracy: " + ", ".join(f"{name} {accuracy(m, *test):.4f}"
                                           for name, m in models.items()))
    ok = all(verdicts)
    print(f"   verdict: {'BITWISE EQUAL in every epoch' if ok else 'NOT bitwise equal'}")
    return ok, curves


# ---- (b) plain SGD vs momentum -----------------------------------------------------------------
PLAIN = f"plain SGD, lr {LR:g}"
EMA = f"Momentum (EMA form), lr {LR / (1 - BETA):g}, b {BETA:g}"
HEAVY = f"SGD momentum {BETA:g}, lr {LR:g}"
CONTROL = f"plain SGD, lr {LR / (1 - BETA):g} (control)"


def first_reach(curve: list, target: float) -> int | None:
    """The 1-based step after which the loss is first <= target; None if it never is."""
    return next((i + 1 for i, v in enumerate(curve) if v <= target), None)


CLEAR_RATIO = 1.25  # a single run: fewer steps by less than this factor is no clear difference


def compare(k: int | None, k_ref: int | None) -> tuple[bool, str]:
    """(clearly faster, in words) for k steps to the target against k_ref; None: never reached."""
    steps = f"{k or 'never'} vs {k_ref or 'never'} steps"
    if k is None or k_ref is None:
        return k_ref is None and k is not None, ("faster" if k_ref is None and k is not None
                                                 else "not faster") + f": {steps}"
    if k_ref >= CLEAR_RATIO * k:
        return True, f"faster: {steps} ({k_ref / k:.1f}x fewer)"
    if k >= CLEAR_RATIO * k_ref:
        return False, f"slower: {steps} ({k / k_ref:.1f}x more)"
    return False, (f"about as fast: {steps} (within {CLEAR_RATIO:g}x: no clear difference in "
                   "one run)")


def convergence_report(curves: dict, reach: dict, spe: int) -> list[str]:
    """Who first reached the loss plain SGD ends with, in steps, and what that says; worded from
    the measured numbers (momentum may well not be faster in a given run)."""
    lines = [f"   target: the train loss plain SGD (lr {LR:g}) ends with, {curves[PLAIN][-1]:.4f}, "
             f"after {len(curves[PLAIN])} steps. First reached after:"]
    for name, k in sorted(reach.items(), key=lambda kv: kv[1] or math.inf):
        lines.append(f"     {name:<40} " + (f"step {k:>4} (epoch {math.ceil(k / spe)})"
                                            if k else "never"))
    for name in (EMA, HEAVY):
        faster, words = compare(reach[name], reach[PLAIN])
        lines.append(f"   {name} vs plain SGD, lr {LR:g}: {words}")
        if not faster:
            lines.append("   -> momentum did NOT converge faster than plain SGD in this run")
    _, words = compare(reach[HEAVY], reach[CONTROL])
    lines.append(f"   control: {HEAVY} vs plain SGD at the same effective step "
                 f"{LR / (1 - BETA):g}: {words}")
    return lines


def part_b(data, test, epochs: int) -> tuple[dict, dict]:
    """Runs (b); returns ({optimizer: full training-set loss after every step},
    {optimizer: first step at or below plain SGD's final loss, or None})."""
    b = BETA
    models, opts = twins(make_mlp(SEED), {
        PLAIN: lambda ps: momentum_cuda.SGD(ps, lr=LR),
        EMA: lambda ps: momentum_cuda.Momentum(ps, lr=LR / (1 - b), momentum=b),
        HEAVY: lambda ps: momentum_cuda.SGD(ps, lr=LR, momentum=b),
        CONTROL: lambda ps: momentum_cuda.SGD(ps, lr=LR / (1 - b))})
    spe = steps_per_epoch(len(data[0]))
    print(f"\n== (b) plain SGD vs momentum: same MLP initialisation, same batches, {epochs} "
          f"epochs; loss on the full training set ({len(data[0])} images) after every step")
    print(f"   EMA form lr = a/(1-b) = {LR:g}/(1-{b:g}) takes heavy-ball SGD's steps (lr a): the "
          f"two differ by rounding only")
    short = {PLAIN: "plain", EMA: "EMA", HEAVY: "SGD+mom", CONTROL: "control"}
    print("   epoch  " + "".join(f"{short[n]:>10}" for n in models) + "   (train loss)")

    def show(epoch: int, curves: dict) -> None:
        print(f"   {epoch:>5}  " + "".join(f"{curves[n][-1]:>10.4f}" for n in models))

    curves = train(models, opts, data, epochs, probe=lambda m: full_loss(m, *data), on_epoch=show)
    print("   final test accuracy: " + ", ".join(f"{short[n]} {accuracy(m, *test):.4f}"
                                               for n, m in models.items()))
    drift = max((p - q).abs().max().item() for p, q in
                zip(models[EMA].parameters(), models[HEAVY].parameters()))
    print(f"   EMA form vs heavy-ball SGD after {len(curves[PLAIN])} steps: max |param difference| "
          f"{drift:.3g} (rounding)")
    reach = {name: first_reach(c, curves[PLAIN][-1]) for name, c in curves.items()}
    for line in convergence_report(curves, reach, spe):
        print(line)
    return curves, reach


# ---- (e) bf16 parameters: round to nearest vs stochastic rounding vs master weights --------------
LR_E, BETA_E = 0.01, 0.9
FP32 = "fp32 weights"
BF16 = "bf16 weights, round to nearest"
SR = "bf16 weights, stochastic_rounding=True"
MASTER = "bf16 weights, master_weights=True"


def part_e(data, test, epochs: int) -> dict:
    """Runs (e); returns {optimizer: full training-set loss after every step}."""
    base = make_mlp(SEED)
    models = {FP32: copy.deepcopy(base), BF16: copy.deepcopy(base).to(torch.bfloat16),
              SR: copy.deepcopy(base).to(torch.bfloat16),
              MASTER: copy.deepcopy(base).to(torch.bfloat16)}
    start = {n: [p.detach().clone() for p in m.parameters()] for n, m in models.items()}
    opts = {n: momentum_cuda.SGD(list(m.parameters()), lr=LR_E, momentum=BETA_E,
                                 master_weights=n == MASTER, stochastic_rounding=n == SR,
                                 sr_seed=SEED) for n, m in models.items()}
    print(f"\n== (e) bf16 parameters, lr {LR_E:g}, momentum {BETA_E:g}: the same MLP "
          f"initialisation in fp32, in bf16, in bf16 with stochastic_rounding=True and with "
          f"master_weights=True")
    short = {FP32: "fp32", BF16: "bf16", SR: "bf16 sr", MASTER: "master"}
    print("   epoch  " + "".join(f"{short[n]:>10}" for n in models) + "   (train loss)")

    def show(epoch: int, curves: dict) -> None:
        print(f"   {epoch:>5}  " + "".join(f"{curves[n][-1]:>10.4f}" for n in models))

    curves = train(models, opts, data, epochs, probe=lambda m: full_loss(m, *data), on_epoch=show)
    total = sum(p.numel() for p in base.parameters())
    for n, m in models.items():
        moved = sum(int((p.detach() != s).sum()) for p, s in zip(m.parameters(), start[n]))
        print(f"   {n}: final train loss {curves[n][-1]:.4f}, test accuracy "
              f"{accuracy(m, *test):.4f}, {moved:,} of {total:,} weights ever changed")
    return curves


# ---- (c) the figure ----------------------------------------------------------------------------
def running_mean(values: list, window: int) -> list:
    """Mean of the last `window` values at each step (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot(path: str, curves_a: dict, bitwise: bool, curves_b: dict, reach: dict, spe: int,
         epochs: int, curves_e: dict) -> None:
    """Left: (a)'s batch losses (running mean) of torch and momentum_cuda, drawn over each other.
    Right: (b)'s full training-set loss per step, log y, plain SGD's final loss marked and where
    each optimizer first reached it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right, third) = plt.subplots(1, 3, figsize=(22, 6), constrained_layout=True)
    xlabel = f"epoch ({spe} steps of batch {BATCH} each)"
    ylabel = "cross-entropy loss (nats, log scale)"

    x = [(i + 1) / spe for i in range(len(curves_a["torch.optim.SGD"]))]
    left.plot(x, running_mean(curves_a["torch.optim.SGD"], SMOOTH), color="tab:green", lw=6,
              alpha=0.45, label="torch.optim.SGD(foreach=False)")
    left.plot(x, running_mean(curves_a["momentum_cuda.SGD"], SMOOTH), color="black", lw=1.2,
              ls="--", label="momentum_cuda.SGD: "
              + ("bitwise equal to torch every epoch" if bitwise else "NOT bitwise equal"))
    left.set_title(f"(a) torch.optim.SGD vs momentum_cuda.SGD, lr {HYPER['lr']:g}, Nesterov "
                   f"momentum {HYPER['momentum']:g},\nweight decay {HYPER['weight_decay']:g}: "
                   f"batch loss, running mean over {SMOOTH} steps")

    styles = {PLAIN: ("tab:blue", "-", 2.2, 1.0), EMA: ("tab:orange", "-", 4.0, 1.0),
              HEAVY: ("black", ":", 1.6, 1.0), CONTROL: ("tab:gray", "--", 1.2, 0.8)}
    target = curves_b[PLAIN][-1]
    for name, c in curves_b.items():
        color, ls, lw, alpha = styles[name]
        k = reach[name]
        right.plot([(i + 1) / spe for i in range(len(c))], c, color=color, ls=ls, lw=lw,
                   alpha=alpha, label=f"{name}: " + (f"reached {target:.3f} at step {k}" if k
                                                     else f"never reached {target:.3f}"))
        if k:
            right.plot(k / spe, target, "o", color=color, ms=7, mec="white", zorder=5)
    right.axhline(target, color="tab:blue", lw=0.8, alpha=0.7)
    right.annotate(f"plain SGD's final loss, {target:.3f}", (0.45 * epochs, target),
                   xytext=(0, 4), textcoords="offset points", color="tab:blue", fontsize=9)
    right.set_title("(b) plain SGD vs momentum, same initial weights and batches:\n"
                    "loss on the full training set after every step (not smoothed)")

    styles_e = {FP32: ("tab:green", "-", 4.0), BF16: ("tab:red", "-", 1.8),
                SR: ("tab:orange", "-", 1.4), MASTER: ("black", "--", 1.4)}
    for name, c in curves_e.items():
        color, ls, lw = styles_e[name]
        third.plot([(i + 1) / spe for i in range(len(c))], c, color=color, ls=ls, lw=lw,
                   label=f"{name}: final {c[-1]:.3f}")
    third.set_title(f"(e) bf16 parameters, lr {LR_E:g}, momentum {BETA_E:g}: round to nearest "
                    "loses updates\nunder half an ulp; stochastic rounding keeps them on "
                    "average, masters exactly")

    # (b)'s upper right holds plain SGD's slow curve; its lower left stays empty.
    for ax, where in ((left, "upper right"), (right, "lower left"), (third, "upper right")):
        ax.set(yscale="log", xlim=(0, epochs), xlabel=xlabel, ylabel=ylabel)
        ax.legend(fontsize=9, loc=where)
        ax.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- (d) the benchmark, and the whole demo -----------------------------------------------------
def run_bench(out: str) -> bool:
    """`bench --quick --out <out>`; imported here so the demo runs even where bench cannot."""
    print(f"\n== (d) momentum-cuda bench --quick --out {out}", flush=True)
    try:
        from momentum_cuda import bench
    except Exception as e:  # noqa: BLE001 - any import failure is reported, not raised
        print(f"   bench FAILED to import: {type(e).__name__}: {e}")
        return False
    rc = bench.main(["--quick", "--out", out])
    if rc != 0:
        print(f"   bench FAILED: exit code {rc}")
    return rc == 0


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"momentum-cuda demo: --device cuda: torch.cuda.is_available() is False "
                         f"(torch {torch.__version__}, CUDA {torch.version.cuda})")
    return torch.device(name)


def make_out_dir(out: str) -> str:
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"momentum-cuda demo: --out {out!r}: cannot create the folder ({e})")
    return out


@contextlib.contextmanager
def one_thread():
    """torch on one CPU thread, restored after. The 26 k-parameter MLP gains nothing from more,
    and on shared cores more are a trap: with both of 2 cores busy elsewhere, 2 threads made the
    training 15x slower (162 s vs 10.6 s) while 1 thread lost nothing on idle cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(args: argparse.Namespace) -> int:
    """The demo with parsed arguments (add_arguments'); returns the exit code."""
    t0 = time.perf_counter()
    device = resolve_device(args.device)
    out = make_out_dir(args.out)
    print(f"momentum_cuda {momentum_cuda.__version__}, torch {torch.__version__}, device {device}; "
          f"training on 1 CPU thread (a tiny model; the bench uses {torch.get_num_threads()})\n")
    data, test = load_digits_split(SEED, device)
    with one_thread():
        bitwise, curves_a = part_a(data, test, args.epochs)
        curves_b, reach = part_b(data, test, args.epochs)
        curves_e = part_e(data, test, args.epochs)
    png = os.path.join(out, PNG_NAME)
    plot(png, curves_a, bitwise, curves_b, reach, steps_per_epoch(len(data[0])), args.epochs,
         curves_e)
    print(f"\n== (c) wrote {png}")
    print(f"   training and figure took {time.perf_counter() - t0:.1f} s")
    bench_ok = args.no_bench or run_bench(out)
    print(f"\ndone in {time.perf_counter() - t0:.1f} s: "
          + ("momentum_cuda matched torch.optim.SGD bit for bit" if bitwise else "MISMATCH")
          + ("" if args.no_bench else f"; bench {'ok' if bench_ok else 'FAILED'}")
          + f"; files in {os.path.abspath(out)}")
    return 0 if bitwise and bench_ok else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m momentum_cuda.demo [options]`: the same as `momentum-cuda demo [options]`."""
    parser = argparse.ArgumentParser(prog="python -m momentum_cuda.demo", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
