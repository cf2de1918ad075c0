"""`momentum-cuda bench` (momentum_cuda/bench.py): layouts, argument handling, case order, the
result files (schema, rewritten after every case), data drawn once per case, bitwise mismatches
recorded while the run goes on, the time budget, and the GPU-only pieces that can be driven on
the CPU. Nothing here is a speed claim: timings are the bench's output, never asserted by a test."""
import contextlib
import csv
import io
import json
import struct
import types

import pytest
import torch

import momentum_cuda
from momentum_cuda import bench

TINY = ["--quick", "--params", "3000", "--layouts", "few-large", "resnet50", "--rounds", "2",
        "--warmup", "1"]
# Two cases (few-large, then resnet50), momentum_cuda flat and the for-loop only, no plot: fast.
FAST = TINY + ["--dtypes", "float32", "--impls", "mc-flat-cpu", "--formats", "json", "csv"]


# ---- layouts ------------------------------------------------------------------------------
def test_model_layouts_have_the_real_parameter_counts():
    r, g = bench.resnet50_shapes(), bench.gpt2_shapes()
    # torchvision resnet50() and GPT-2 small (HF gpt2, lm_head tied): known totals.
    assert (len(r), sum(map(bench._numel, r))) == (161, 25_557_032)
    assert (len(g), sum(map(bench._numel, g))) == (148, 124_439_808)
    # At their native size the layouts ARE the models' tensors, in order.
    assert bench.layout_sizes("resnet50", 25_557_032, 0) == [bench._numel(s) for s in r]
    assert bench.layout_sizes("gpt2", 124_439_808, 0) == [bench._numel(s) for s in g]


@pytest.mark.parametrize("layout", bench.LAYOUTS)
@pytest.mark.parametrize("total", [2000, 2001, 999_983, 10**8 + 3])
def test_layout_sizes_sum_to_the_total(layout, total):
    sizes = bench.layout_sizes(layout, total, seed=3)
    assert sum(sizes) == total and min(sizes) >= 1
    want = {"few-large": 8, "many-small": 2000, "resnet50": 161, "gpt2": 148,
            "fsdp2-gpt2": 148, "ddp-gpt2": 148}[layout]
    assert len(sizes) == want


def test_scaled_layout_keeps_proportions():
    native = [bench._numel(s) for s in bench.resnet50_shapes()]
    scaled = bench.layout_sizes("resnet50", 10 * sum(native), 0)
    assert scaled == [10 * n for n in native]


def test_layout_smaller_than_its_tensor_count_is_rejected():
    with pytest.raises(ValueError, match="smaller than the layout's 2000 tensors"):
        bench.layout_sizes("many-small", 1999, 0)


# ---- arguments ----------------------------------------------------------------------------
@pytest.mark.parametrize("text,value", [("1M", 10**6), ("2.5k", 2500), ("1e8", 10**8),
                                        ("1B", 10**9), ("97", 97)])
def test_parse_count(text, value):
    assert bench.parse_count(text) == value


@pytest.mark.parametrize("text", ["0", "-5", "abc", "1.5", "1e-3", "M"])
def test_parse_count_rejects(text):
    with pytest.raises(Exception, match="not a parameter count"):
        bench.parse_count(text)


@pytest.mark.parametrize("argv,message", [
    (["--rounds", "5"], "--rounds must be >= 20"),
    (["--quick", "--rounds", "0"], "--rounds must be >= 1"),
    (["--quick", "--threads", "0"], "--threads must be >= 1, got 0"),
    (["--dtypes", "int8"], "invalid choice: 'int8'"),
    (["--layouts", "vgg"], "invalid choice: 'vgg'"),
    (["--params", "many"], "not a parameter count: 'many'"),
    (["--device", "tpu"], "--device must be cpu or cuda"),
    (["--quick", "--name", "out/run"], "--name must be a file name stem"),
    (["--quick", "--formats", "pdf"], "invalid choice: 'pdf'"),
    (["--quick", "--budget-s", "0"], "--budget-s must be > 0, got 0.0"),
    (["--overhead", "--params", "1M"], "--overhead times tiny tensors (--tensors N); it takes "
                                       "no --params"),
    (["--overhead", "--layouts", "gpt2"], "it takes no --layouts"),
    (["--overhead", "--formats", "json", "png"], "--overhead writes json and csv; it has no png"),
    (["--overhead", "--tensors", "0"], "--tensors must be >= 1, got 0"),
    (["--tensors", "148"], "--tensors is for --overhead"),
    (["--overhead", "--rounds", "5"], "--rounds must be >= 20"),
    (["--ampclip", "--overhead"], "--overhead and --ampclip are two modes: one at a time"),
    (["--ampclip", "--formats", "json", "png"], "--ampclip writes json and csv; it has no png"),
    (["--ampclip", "--layouts", "ddp-gpt2"], "--ampclip times plain tensors; it takes no "
                                             "--layouts ddp-gpt2"),
    (["--ampclip", "--max-norm", "0"], "--max-norm must be > 0 and finite, got 0.0"),
    (["--ampclip", "--tensors", "0"], "--tensors must be >= 1, got 0"),
    (["--max-norm", "1"], "--max-norm is for --ampclip"),
    (["--ampclip", "--rounds", "5"], "--rounds must be >= 20"),
    (["--overhead", "--evict", "-1"], "--evict must be >= 0 MiB, got -1"),
    (["--master", "--ampclip"], "--master is a mode of its own: not with --overhead or --ampclip"),
    (["--master", "--dtypes", "float32"], "--master steps bfloat16 models (fp32 ones next to "
                                          "them); it takes no --dtypes"),
    (["--master", "--layouts", "few-large", "fsdp2-gpt2"], "--master times plain tensors; it "
                                                           "takes no --layouts fsdp2-gpt2"),
    (["--master", "--tensors", "148"], "--tensors is for --overhead and --ampclip"),
    (["--master", "--rounds", "5"], "--rounds must be >= 20"),
    (["--quick", "--evict", "8"], "--evict is for --overhead"),
    (["--quick", "--ddp-grads"], "--ddp-grads is for --overhead"),
    (["--quick", "--assigned-grads"], "--assigned-grads is for --overhead"),
    (["--quick", "--unused-grads"], "--unused-grads is for --overhead"),
    (["--overhead", "--unused-grads", "--ddp-grads"], "--unused-grads and --ddp-grads: one at "
                                                       "a time"),
    (["--overhead", "--assigned-grads", "--ddp-grads"], "--assigned-grads and --ddp-grads are "
                                                         "two ways to hand gradients over"),
])
def test_bad_arguments_exit_2_naming_the_argument(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_device_without_gpu_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cuda"])
    assert "torch sees no GPU here" in capsys.readouterr().err


def test_unknown_implementation_stops_naming_what_exists(tmp_path):
    with pytest.raises(SystemExit, match=r"--impls mc-flat-tpu: no such implementation \(names: "
                                         r".*mc-flat-cuda.*; available here: .*mc-flat-cpu"):
        bench.main(TINY + ["--impls", "mc-flat-tpu", "--no-files"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_implementation_that_cannot_run_here_is_reported_and_the_run_goes_on(tmp_path, capsys):
    """The GPU check's --impls on a CPU machine: mc-flat-cuda is named with the reason, the rest
    runs, and the exit status says that something asked for did not run."""
    code = bench.main(FAST + ["--impls", "mc-flat-cuda", "mc-flat-cpu", "--layouts", "few-large",
                              "--out", str(tmp_path), "--name", "run"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "ASKED FOR BUT NOT AVAILABLE on cpu: mc-flat-cuda: backend='cuda' cannot run" in out
    assert "NOT RUN: mc-flat-cuda was asked for but is not available on cpu" in err
    doc = json.loads((tmp_path / "run.json").read_text())
    assert "cannot run on device cpu" in doc["asked_for_not_available"]["mc-flat-cuda"]
    assert doc["failures"] == [] and len(doc["cases"]) == 1
    assert set(doc["cases"][0]["results"]) == {"mc-flat-cpu", "torch-forloop"}


def test_quick_defaults():
    args, device = bench.parse_args(["--quick"])
    assert (args.params, args.rounds, args.warmup, args.wait_idle, args.retries) == (
        [10**6], 5, 1, 0.0, 0)
    assert args.layouts == list(bench.DEFAULT_LAYOUTS) and args.dtypes == ["float32", "bfloat16"]
    assert "fsdp2-gpt2" in bench.LAYOUTS and "fsdp2-gpt2" not in args.layouts  # when asked for
    assert (args.formats, args.name, args.budget_s) == (["json", "csv", "png"], None, None)


def test_gpu_check_command_lines_parse():
    """The two commands the GPU check runs (with --device cpu: no GPU here)."""
    common = ["--device", "cpu", "--dtypes", "float32", "bfloat16", "--impls", "mc-flat-cuda",
              "mc-flat-triton", "torch-forloop", "torch-foreach", "torch-fused", "--out", "o",
              "--formats", "json", "csv"]
    args, _ = bench.parse_args(common + ["--params", "100M", "1B", "--layouts", "few-large",
                                         "gpt2", "--name", "bench-headline", "--budget-s", "170"])
    assert (args.params, args.layouts, args.name, args.budget_s, args.formats) == (
        [10**8, 10**9], ["few-large", "gpt2"], "bench-headline", 170.0, ["json", "csv"])
    args, _ = bench.parse_args(common + ["--params", "1M", "10M", "100M", "--layouts",
                                         "many-small", "resnet50", "few-large", "gpt2",
                                         "fsdp2-gpt2", "--name", "bench-rest",
                                         "--budget-s", "212"])
    assert (args.params, args.name, args.budget_s) == ([10**6, 10**7, 10**8], "bench-rest", 212)
    assert args.layouts[-1] == "fsdp2-gpt2"


def test_case_order_puts_the_first_value_of_each_option_first():
    M100, B1 = 10**8, 10**9
    order = bench.case_order([M100, B1], ["few-large", "gpt2"], ["float32", "bfloat16"])
    assert order == [(M100, "few-large", "float32"),  # every first value
                     (M100, "few-large", "bfloat16"),  # one later value, ...
                     (M100, "gpt2", "float32"),
                     (B1, "few-large", "float32"),
                     (M100, "gpt2", "bfloat16"),  # two later values, ...
                     (B1, "few-large", "bfloat16"),
                     (B1, "gpt2", "float32"),
                     (B1, "gpt2", "bfloat16")]  # every last value
    # The user's order decides: reversed lists, reversed priorities.
    assert bench.case_order([B1, M100], ["gpt2"], ["bfloat16", "float32"])[0] == (
        B1, "gpt2", "bfloat16")


def test_memory_estimate_counts_the_tensor_sets_alive_at_the_peak(monkeypatch):
    # checking: data 3 + for-loop 3 + the one under test 3 + 1; timing: data 3 + 3 per
    # optimizer + 1
    assert [bench.peak_sets(n) for n in (1, 2, 3, 5, 10)] == [10, 10, 13, 19, 34]
    # The GPU check's headline at 1 B fp32: 5 optimizers, 19 sets of 4 GB.
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (140e9, 150e9))
    ok, need, why = bench.fits(10**9, torch.float32, 5, torch.device("cuda"))
    assert (ok, need) == (True, 76 * 10**9) and why == "needs about 76.0 GB, 140.0 GB free"
    ok, need, _ = bench.fits(10**9, torch.float32, 10, torch.device("cuda"))
    assert (ok, need) == (False, 136 * 10**9)  # over 85 % of what is free


# ---- a run and its files -------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = bench.main(TINY + ["--dtypes", "float32", "bfloat16", "--out", str(out)])
    files = {p.suffix: p for p in out.iterdir()}
    return code, files


def test_run_succeeds_and_writes_json_csv_png(run):
    code, files = run
    assert code == 0
    assert set(files) == {".json", ".csv", ".png"}  # and no temporary left
    png = files[".png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width >= 600 and height >= 400


def test_json_schema(run):
    doc = json.loads(run[1][".json"].read_text())
    assert doc["schema"] == "momentum-cuda-bench/2" and doc["error"] is None
    assert doc["complete"] is True and doc["stopped_early"] is None and doc["failures"] == []
    assert doc["skipped"] == [] and len(doc["planned"]) == 4
    m = doc["machine"]
    for key in ("date", "device", "commit", "cpu", "torch", "triton", "backends", "momentum_cuda"):
        assert key in m, key
    assert m["device"] == "cpu" and m["torch"]["version"] == torch.__version__
    assert m["cpu"]["model"]
    assert len(doc["cases"]) == 4  # 2 layouts x 2 dtypes x 1 size
    for case in doc["cases"]:
        assert case["numel"] == 3000 and case["seconds"] > 0
        assert case["estimated_peak_bytes"] == 3000 * case["bytes_per_param"] // 5 * 19
        assert case["bandwidth_probe"]["gbps"] > 0
        res = case["results"]
        assert {"mc-flat-cpu", "mc-list-cpu", "torch-forloop", "torch-foreach"} <= set(res)
        for r in res.values():
            assert r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
            assert len(r["times_ms"]) == 2 and r["gbps"] > 0
            assert r["bw_share"] == pytest.approx(r["gbps"] / case["bandwidth_probe"]["gbps"])
        assert case["bitwise_vs_forloop"]["mc-flat-cpu"] is True
        assert case["bitwise_vs_forloop"]["mc-list-cpu"] is True
        assert case["mismatches"] == {}


def test_step_costs_are_counted(run):
    doc = json.loads(run[1][".json"].read_text())
    case = next(c for c in doc["cases"] if c["layout"] == "few-large" and c["dtype"] == "float32")
    res = case["results"]
    # The flat step is ONE kernel call and allocates nothing; torch's for-loop runs 3 ops per
    # tensor (buf.mul_, buf.add_, p.add_) with momentum and no weight decay.
    assert (res["mc-flat-cpu"]["kernels"], res["mc-flat-cpu"]["alloc_bytes"]) == (1, 0)
    assert res["torch-forloop"]["kernels"] == 3 * case["tensors"]


def test_csv_has_one_row_per_case_and_implementation(run):
    doc = json.loads(run[1][".json"].read_text())
    with run[1][".csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(bench.CSV_FIELDS)
    assert len(rows) == sum(len(c["results"]) for c in doc["cases"])
    assert {r["layout"] for r in rows} == {"few-large", "resnet50"}
    assert all(float(r["bandwidth_probe_gbps"]) > 0 and float(r["bw_share"]) > 0 for r in rows)


def _csv(text) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text.decode() if isinstance(text, bytes) else text)))


class Killed(BaseException):
    """Stands for the process being killed: no `except Exception` stops it."""


def test_files_are_valid_after_every_case_when_killed(monkeypatch, tmp_path):
    """What a kill leaves: the files as they are when a case starts (read from inside the run)."""
    real, seen = bench.run_case, []

    def run_case(*a, **kw):
        seen.append({p.name: p.read_bytes() for p in tmp_path.iterdir()})
        if len(seen) == 2:
            raise Killed
        return real(*a, **kw)

    monkeypatch.setattr(bench, "run_case", run_case)
    with pytest.raises(Killed):
        bench.main(FAST + ["--out", str(tmp_path), "--name", "run"])
    first, second = seen
    assert sorted(first) == sorted(second) == ["run.csv", "run.json"]  # no png, no temporaries
    doc = json.loads(first["run.json"])
    assert doc["complete"] is False and doc["cases"] == [] and len(doc["planned"]) == 2
    assert _csv(first["run.csv"]) == []
    doc = json.loads(second["run.json"])
    assert doc["complete"] is False and [c["layout"] for c in doc["cases"]] == ["few-large"]
    assert doc["cases"][0]["bandwidth_probe"]["gbps"] > 0
    assert [r["implementation"] for r in _csv(second["run.csv"])] == ["mc-flat-cpu",
                                                                      "torch-forloop"]
    # The kill came during case 2: the folder holds exactly what case 1 left.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.csv", "run.json"]
    assert (tmp_path / "run.json").read_bytes() == second["run.json"]


def test_an_interrupted_run_says_so(monkeypatch, tmp_path):
    real = bench.run_case
    calls = []

    def run_case(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(bench, "run_case", run_case)
    assert bench.main(FAST + ["--out", str(tmp_path), "--name", "run"]) == 130
    doc = json.loads((tmp_path / "run.json").read_text())
    assert doc["complete"] is False and len(doc["cases"]) == 1
    assert doc["stopped_early"] == "interrupted (KeyboardInterrupt) during resnet50 3k float32"


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")

    def half_then_fail(p):
        p.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        bench._atomic_write(path, half_then_fail)
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"] and path.read_text() == "old"


def test_a_case_that_raises_is_recorded_and_the_run_goes_on(monkeypatch, tmp_path, capsys):
    real = bench.run_case

    def run_case(layout, *a, **kw):
        if layout == "few-large":
            raise RuntimeError("planted: CUDA out of memory")
        return real(layout, *a, **kw)

    monkeypatch.setattr(bench, "run_case", run_case)
    assert bench.main(FAST + ["--out", str(tmp_path), "--name", "run"]) == 1
    doc = json.loads((tmp_path / "run.json").read_text())
    assert doc["complete"] is True and [c["layout"] for c in doc["cases"]] == ["resnet50"]
    assert [(f["layout"], f["kind"], f["detail"]) for f in doc["failures"]] == [
        ("few-large", "case error", "RuntimeError: planted: CUDA out of memory")]
    assert "FAILED: few-large 3k float32: the case: case error" in capsys.readouterr().err


def test_time_budget_stops_starting_cases(monkeypatch, tmp_path, capsys):
    clock = [0.0]
    monkeypatch.setattr(bench, "_now", lambda: clock[0])
    real = bench.run_case

    def run_case(*a, **kw):
        clock[0] += 100.0  # every case "takes" 100 s
        return real(*a, **kw)

    monkeypatch.setattr(bench, "run_case", run_case)
    code = bench.main(FAST + ["--dtypes", "float32", "bfloat16", "--budget-s", "150", "--out",
                              str(tmp_path), "--name", "run"])
    assert code == 0  # a budget cut is not a failure: the files say what was left out
    doc = json.loads((tmp_path / "run.json").read_text())
    # Cases 1 and 2 start at 0 s and 100 s; at 200 s the budget of 150 s has passed.
    done = [(c["layout"], c["dtype"]) for c in doc["cases"]]
    assert done == [("few-large", "float32"), ("few-large", "bfloat16")]
    assert [(s["layout"], s["dtype"], s["why"]) for s in doc["skipped"]] == [
        ("resnet50", "float32", "time budget"), ("resnet50", "bfloat16", "time budget")]
    assert doc["complete"] is True and doc["stopped_early"].startswith("time budget: 150 s")
    assert len(_csv((tmp_path / "run.csv").read_text())) == 4  # 2 cases x 2 implementations
    assert "time budget: 200 s of 150 s passed; not starting the 2 cases left" in \
        capsys.readouterr().out


def test_past_the_budget_a_case_neither_waits_for_an_idle_cpu_nor_retries(monkeypatch,
                                                                          tmp_path):
    clock, waits = [0.0], []
    monkeypatch.setattr(bench, "_now", lambda: clock[0])
    monkeypatch.setattr(bench, "is_noisy", lambda busy: True)  # every timing looks disturbed
    monkeypatch.setattr(bench, "wait_for_idle", lambda s: waits.append(s))
    real = bench.run_case

    def run_case(*a, **kw):
        clock[0] += 10.0 if a[0] == "few-large" else 200.0  # the budget ends during case 2
        return real(*a, **kw)

    monkeypatch.setattr(bench, "run_case", run_case)
    assert bench.main(FAST + ["--wait-idle", "30", "--retries", "2", "--budget-s", "100",
                              "--out", str(tmp_path), "--name", "run"]) == 0
    first, second = json.loads((tmp_path / "run.json").read_text())["cases"]
    # Case 1, with 90 s left: waits of at most 30 s before each of its 3 attempts.
    assert len(first["discarded_noisy_attempts"]) == 2 and "retry_skipped" not in first
    assert waits == [30.0, 30.0, 30.0]
    # Case 2, started in time but past the budget now: one attempt, no wait.
    assert second["discarded_noisy_attempts"] == [] and second["retry_skipped"] == "time budget"


def test_name_and_formats(tmp_path):
    assert bench.main(FAST + ["--layouts", "few-large", "--out", str(tmp_path), "--name",
                              "bench-headline", "--formats", "json"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["bench-headline.json"]


def test_one_progress_line_per_case_and_a_final_table(tmp_path, capsys):
    assert bench.main(FAST + ["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("[")]
    assert [ln.split(":")[0] for ln in lines] == ["[1/2    0 s] few-large 3k float32",
                                                  f"{lines[1].split(' s]')[0]} s] resnet50 3k "
                                                  "float32"]
    assert all(" | probe " in ln and "mc-flat-cpu" in ln and "%" in ln for ln in lines)
    table = out[out.index("implementation"):]
    assert "bandwidth probe" in table and "BW share" in table and "== for-loop" in table


# ---- data ---------------------------------------------------------------------------------
def test_data_is_drawn_once_per_case_on_the_device(monkeypatch, tmp_path):
    real, draws = torch.randn, []

    def randn(*a, **kw):
        draws.append((kw.get("generator"), kw.get("device")))
        return real(*a, **kw)

    monkeypatch.setattr(torch, "randn", randn)
    assert bench.main(FAST + ["--impls", "mc-flat-cpu", "mc-list-cpu", "torch-foreach", "--out",
                              str(tmp_path)]) == 0
    # init, grads, grads2 per case: 2 cases, whatever the number of implementations (4)
    assert len(draws) == 3 * 2
    assert all(g is not None and g.device == torch.device(d) == torch.device("cpu")
               for g, d in draws)


def test_gradients_are_never_zero(monkeypatch):
    monkeypatch.setattr(torch, "randn",
                        lambda n, **kw: torch.zeros(n, dtype=kw["dtype"], device=kw["device"]))
    data = bench.case_data([3, 5], torch.bfloat16, torch.device("cpu"), 0)
    assert (data.init == 0).all() and (data.grads == 1).all() and (data.grads2 == 1).all()
    assert [t.numel() for t in data.split(data.grads)] == [3, 5]


# ---- correctness before timing -------------------------------------------------------------
def _plant(monkeypatch, impl, where="implementations"):
    real = getattr(bench, where)

    def with_it(device):
        impls, missing = real(device)
        return impls + [impl], missing

    monkeypatch.setattr(bench, where, with_it)


def test_bitwise_mismatch_is_recorded_and_the_run_goes_on(monkeypatch, tmp_path, capsys):
    """A momentum_cuda implementation with lr 2^-20 off (a few fp32 ulps): recorded in every
    case (where and how much), not timed, the other implementations and cases run, exit 1."""
    _plant(monkeypatch, bench.Impl("mc-wrong", "momentum_cuda (planted bug: lr off by 2^-20)",
                                   lambda ps, h: momentum_cuda.SGD(
                                       ps, **{**h, "lr": h["lr"] * (1 + 2**-20)}),
                                   ours=True, flat=True))
    code = bench.main(FAST + ["--impls", "mc-flat-cpu", "mc-wrong", "--out", str(tmp_path),
                              "--name", "run"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "FAILED: few-large 3k float32: mc-wrong: bitwise mismatch: check: " in err
    assert "BITWISE MISMATCH (not timed): mc-wrong" in out
    doc = json.loads((tmp_path / "run.json").read_text())
    assert [c["layout"] for c in doc["cases"]] == ["few-large", "resnet50"]
    assert [(f["layout"], f["implementation"]) for f in doc["failures"]] == [
        ("few-large", "mc-wrong"), ("resnet50", "mc-wrong")]
    for case in doc["cases"]:
        assert set(case["results"]) == {"mc-flat-cpu", "torch-forloop"}  # mc-wrong not timed
        assert case["bitwise_vs_forloop"]["mc-wrong"] is False
        m = case["mismatches"]["mc-wrong"]
        assert (m["phase"], m["steps"]) == ("check", 2)
        assert "momentum_buffer" not in m  # lr does not enter the buffer
        p = m["param"]
        assert 1 <= p["differing"] <= p["of"] == case["tensors"]
        assert 0 <= p["first"] < case["tensors"] and p["value"] != p["reference"]
        assert 0 < abs(p["value"] - p["reference"]) <= p["max_abs_diff"] < 1e-5
        assert f"first: param {p['first']}, element {p['first_element']}" in m["summary"]
    assert {r["implementation"] for r in _csv((tmp_path / "run.csv").read_text())} == {
        "mc-flat-cpu", "torch-forloop"}


def test_flat_that_is_not_one_call_is_recorded(monkeypatch, tmp_path, capsys):
    """A 'flat' implementation that takes the per-tensor path is caught by the call check."""
    _plant(monkeypatch, bench.Impl("mc-fake-flat", "momentum_cuda fake flat",
                                   lambda ps, h: momentum_cuda.SGD(ps, flat=False, **h),
                                   ours=True, flat=True))
    assert bench.main(FAST + ["--impls", "mc-fake-flat", "--layouts", "few-large", "--out",
                              str(tmp_path), "--name", "run"]) == 1
    assert "did not make exactly one flat kernel call" in capsys.readouterr().err
    doc = json.loads((tmp_path / "run.json").read_text())
    assert [f["kind"] for f in doc["failures"]] == ["error"]
    assert set(doc["cases"][0]["results"]) == {"torch-forloop"}


def test_differences_reports_the_first_differing_element():
    a = [torch.zeros(4), torch.arange(6.0)]
    b = [torch.zeros(4), torch.arange(6.0)]
    b[1][3] += 0.5
    b[1][5] -= 2.0
    opt = types.SimpleNamespace(state={})
    d = bench.differences(opt, a, opt, b, momentum=0)
    assert d == {"param": {"differing": 1, "of": 2, "first": 1, "first_element": 3,
                           "value": 3.0, "reference": 3.5, "max_abs_diff": 2.0}}
    assert bench.differences(opt, a, opt, a, momentum=0) is None


# ---- the FSDP2 shard layout: DTensor parameters ---------------------------------------------
needs_dist = pytest.mark.skipif(not (torch.distributed.is_available()
                                     and torch.distributed.is_gloo_available()),
                                reason="torch without distributed/gloo")


@needs_dist
def test_fsdp2_layout_runs_on_dtensors(tmp_path, capsys):
    """--layouts fsdp2-gpt2 (quick): DTensor parameters, Shard(0) on a one-process mesh;
    momentum_cuda per tensor, torch's for-loop and foreach on the DTensors, bitwise equal to the
    for-loop, momentum buffers DTensors; flat left out; torch fused on the local tensors, marked
    so; the process group is gone afterwards."""
    code = bench.main(["--quick", "--params", "3000", "--layouts", "fsdp2-gpt2", "--dtypes",
                       "float32", "bfloat16", "--rounds", "2", "--warmup", "1", "--formats",
                       "json", "csv", "--out", str(tmp_path), "--name", "run"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert not torch.distributed.is_initialized()
    doc = json.loads((tmp_path / "run.json").read_text())
    assert doc["failures"] == [] and len(doc["cases"]) == 2
    for case in doc["cases"]:
        assert (case["layout"], case["tensors"]) == ("fsdp2-gpt2", 148)
        assert case["params"] == "DTensor Shard(0), 1-process mesh"
        assert case["local_tensors"] == ["torch-fused"]
        assert set(case["left_out"]) == {"mc-flat-cpu"}
        assert set(case["results"]) == {"mc-list-cpu", "torch-forloop", "torch-foreach",
                                        "torch-fused"}
        assert case["bitwise_vs_forloop"]["mc-list-cpu"] is True and case["mismatches"] == {}
        res = case["results"]
        assert res["mc-list-cpu"]["kernels"] == 1  # one momentum_cuda call, no aten op
        assert res["torch-forloop"]["kernels"] == 3 * case["tensors"]  # DTensor ops, once each
    rows = _csv((tmp_path / "run.csv").read_text())
    assert {r["implementation"]: r["params"] for r in rows} == {
        "mc-list-cpu": "DTensor Shard(0), 1-process mesh",
        "torch-forloop": "DTensor Shard(0), 1-process mesh",
        "torch-foreach": "DTensor Shard(0), 1-process mesh", "torch-fused": "local tensors"}
    assert "torch-fused [local]" in out and "mc-flat-cpu left out (DTensor parameters" in out
    assert "aten._fused_sgd_ has no sharding strategy" in out


def test_ddp_buckets_follow_ddps_assignment():
    """Reverse parameter order, a bucket closed once it reaches its cap (1 MiB first, then
    25 MiB), no padding; every parameter in exactly one bucket."""
    assert bench.ddp_buckets([1, 2, 3, 4], 1, first=4, cap=5) == [[3], [2, 1], [0]]
    sizes = bench.layout_sizes("ddp-gpt2", 124_439_808, 0)
    buckets = bench.ddp_buckets(sizes, 4)
    assert sorted(i for b in buckets for i in b) == list(range(148))
    assert [i for b in buckets for i in b] == list(reversed(range(148)))
    nbytes = [4 * sum(sizes[i] for i in b) for b in buckets]
    assert nbytes[0] >= 1 << 20 and 4 * sum(sizes[i] for i in buckets[0][:-1]) < 1 << 20
    assert all(4 * sum(sizes[i] for i in b[:-1]) < 25 << 20 for b in buckets[1:])


def test_ddp_layout_reads_gradients_in_their_buckets(tmp_path, capsys):
    """--layouts ddp-gpt2 (quick): not a default layout; every implementation runs, bitwise equal
    to the for-loop; every .grad a view of a bucket; mc-flat takes the flat path, one kernel call
    per bucket, and its call count is in the JSON."""
    assert "ddp-gpt2" not in bench.parse_args(["--quick"])[0].layouts
    code = bench.main(["--quick", "--params", "1M", "--layouts", "ddp-gpt2", "--dtypes",
                       "float32", "--rounds", "2", "--warmup", "1", "--formats", "json",
                       "--out", str(tmp_path), "--name", "run"])
    out, err = capsys.readouterr()
    assert code == 0, err
    (case,) = json.loads((tmp_path / "run.json").read_text())["cases"]
    assert (case["layout"], case["tensors"]) == ("ddp-gpt2", 148)
    assert case["params"] == "grads: views of DDP buckets" and sum(case["buckets"]) == 10**6
    assert len(case["buckets"]) == 2  # 1 MiB first (fp32), the rest in one 25 MiB bucket
    assert case["mismatches"] == {} and case["errors"] == {}
    assert set(case["results"]) == {"mc-flat-cpu", "mc-list-cpu", "torch-forloop",
                                    "torch-foreach", "torch-fused"}
    assert all(case["bitwise_vs_forloop"][n] for n in ("mc-flat-cpu", "mc-list-cpu"))
    assert case["results"]["mc-flat-cpu"]["mc_calls"] == 1  # one call over both buckets
    assert "kernels" in case["results"]["torch-fused"]
    data = bench.case_data(bench.layout_sizes("ddp-gpt2", 10**6, 0), torch.float32,
                           torch.device("cpu"), 0)
    data.buckets = bench.ddp_buckets(data.sizes, 4)
    impl = next(i for i in bench.implementations(torch.device("cpu"))[0]
                if i.name == "mc-flat-cpu")
    opt, params = bench.build(impl, data, dict(lr=0.1, momentum=0.9))
    assert {p.grad.untyped_storage().data_ptr() for p in params} != {
        p.untyped_storage().data_ptr() for p in params}
    assert len({p.grad.untyped_storage().data_ptr() for p in params}) == 2
    for _ in range(2):
        opt.step()
        assert [c["path"] for c in opt.last_step] == ["flat"]
    assert "ddp-gpt2: each .grad a view of a DDP-style gradient bucket" in out


@needs_dist
def test_fsdp2_layout_catches_a_mismatch_on_the_shards(monkeypatch, tmp_path, capsys):
    _plant(monkeypatch, bench.Impl("mc-wrong", "momentum_cuda (planted bug: lr off by 2^-20)",
                                   lambda ps, h: momentum_cuda.SGD(
                                       ps, flat=False, **{**h, "lr": h["lr"] * (1 + 2**-20)}),
                                   ours=True))
    code = bench.main(FAST + ["--impls", "mc-list-cpu", "mc-wrong", "--layouts", "fsdp2-gpt2",
                              "--no-files"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "FAILED: fsdp2-gpt2 3k float32: mc-wrong: bitwise mismatch: check: " in err
    assert "BITWISE MISMATCH (not timed): mc-wrong" in out
    assert not torch.distributed.is_initialized()


@needs_dist
def test_differences_needs_dtensor_buffers_sharded_like_the_for_loops():
    """On DTensor parameters a momentum buffer that is a plain tensor (or sharded otherwise)
    differs even where its elements are equal."""
    device = torch.device("cpu")
    mesh = bench.one_process_mesh(device)
    try:
        data = bench.case_data([3, 5], torch.float32, device, 0)
        data.mesh = mesh
        forloop = bench.Impl("torch-forloop", "", lambda ps, h: torch.optim.SGD(
            ps, foreach=False, **h), ours=False)
        (a, pa), (b, pb) = (bench.build(forloop, data, dict(lr=0.1, momentum=0.9))
                            for _ in range(2))
        a.step()
        b.step()
        assert bench.differences(a, pa, b, pb, momentum=0.9) is None
        b.state[pb[1]]["momentum_buffer"] = b.state[pb[1]]["momentum_buffer"].to_local()
        d = bench.differences(a, pa, b, pb, momentum=0.9)
        assert d == {"momentum_buffer": {"differing": 1, "of": 2, "missing_or_misshapen": [1]}}
        assert "not sharded like the for-loop's: [1]" in bench.describe(d)
        assert bench.fused_takes_dtensors(mesh, torch.float32, device) is False  # torch 2.13
    finally:
        bench.release_meshes()
    assert not torch.distributed.is_initialized()


# ---- the GPU-only pieces, driven on the CPU ------------------------------------------------
def test_device_kernel_count_leaves_out_copies_and_host_events():
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [types.SimpleNamespace(device_type=t, name=n) for t, n in (
        (cuda, "_sgd_flat_kernel"), (cuda, "Memcpy HtoD (Pinned -> Device)"),
        (cuda, "Memset (Device)"), (cpu, "cudaLaunchKernel"), (cpu, "aten::add_"),
        (cuda, "void at::native::vectorized_elementwise_kernel<4, ...>"))]
    assert bench.count_device_events(events) == {"kernels": 2, "memcpy_memset": 2}


def test_cuda_graph_capture_comes_after_warm_up_steps_on_a_side_stream(monkeypatch):
    """Fakes of torch.cuda's stream and graph objects, a real optimizer: the steps before the
    capture run on a side stream that the current stream then waits for, and the first of
    them (which allocates the momentum buffers) is not the captured one."""
    log, active = [], ["current"]

    class Stream:
        def __init__(self, device=None, name="side"):
            self.name = name

        def wait_stream(self, other):
            log.append(f"{self.name} waits for {other.name}")

    class Use:  # torch.cuda.stream(s) / torch.cuda.graph(g): a stream is current inside
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            active.append(self.name)
            log.append(f"enter {self.name}")

        def __exit__(self, *exc):
            active.pop()
            log.append(f"exit {self.name}")

    current = Stream(name="current")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: Use(s.name))
    monkeypatch.setattr(torch.cuda, "device", lambda d: Use("device"))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: types.SimpleNamespace(
        replay=lambda: log.append("replay")))
    monkeypatch.setattr(torch.cuda, "graph", lambda g: Use("capture"))
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    real_step = opt.step

    def step():
        log.append(f"step on {active[-1]}, buffer {'yes' if opt.state[p] else 'no'}")
        real_step()

    opt.step = step
    replay = bench.cuda_graph_step(opt, torch.device("cuda"), warmup=3)
    replay()
    assert log == ["enter device", "side waits for current", "enter side",
                   "step on side, buffer no", "step on side, buffer yes",
                   "step on side, buffer yes", "exit side", "current waits for side",
                   "enter capture", "step on capture, buffer yes", "exit capture",
                   "exit device", "replay"]


def _eager_graphs(monkeypatch, extra_steps_for=None):
    """Graph timing on the CPU: use_graphs says yes and a "capture" is the warm-up steps, its
    "replay" an eager step (one more step for `extra_steps_for` optimizers: a broken graph)."""
    monkeypatch.setattr(bench, "use_graphs", lambda device, total, args: True)

    def capture(opt, device, warmup):
        for _ in range(warmup + (1 if isinstance(opt, extra_steps_for or ()) else 0)):
            opt.step()
        return opt.step

    monkeypatch.setattr(bench, "cuda_graph_step", capture)


def test_graph_replays_are_timed_and_checked_like_the_steps(monkeypatch, tmp_path):
    _eager_graphs(monkeypatch)
    assert bench.main(FAST + ["--layouts", "few-large", "--out", str(tmp_path), "--name",
                              "run"]) == 0
    case = json.loads((tmp_path / "run.json").read_text())["cases"][0]
    assert set(case["results"]) == {"mc-flat-cpu", "torch-forloop", "mc-flat-cpu+graph",
                                    "torch-forloop+graph"}
    assert case["bitwise_vs_forloop"] == {"torch-forloop": True, "mc-flat-cpu": True,
                                          "mc-flat-cpu+graph": True, "torch-forloop+graph": True}
    assert case["steps_per_optimizer"] == bench.GRAPH_WARMUP + 1 + 2
    assert case["estimated_peak_bytes"] == 3000 * 4 * (3 + 3 * 4 + 1)  # graph copies


def test_graph_replay_that_differs_is_recorded(monkeypatch, tmp_path):
    _eager_graphs(monkeypatch, extra_steps_for=momentum_cuda.SGD)
    assert bench.main(FAST + ["--layouts", "few-large", "--out", str(tmp_path), "--name",
                              "run"]) == 1
    case = json.loads((tmp_path / "run.json").read_text())["cases"][0]
    assert "mc-flat-cpu+graph" not in case["results"] and "mc-flat-cpu" in case["results"]
    m = case["mismatches"]["mc-flat-cpu+graph"]
    assert m["phase"] == "cuda-graph replay" and m["param"]["differing"] == case["tensors"]
    assert m["momentum_buffer"]["differing"] == case["tensors"]


def test_a_step_that_cannot_be_captured_is_reported_not_fatal(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "use_graphs", lambda device, total, args: True)

    def capture(opt, device, warmup):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(bench, "cuda_graph_step", capture)
    assert bench.main(FAST + ["--layouts", "few-large", "--out", str(tmp_path), "--name",
                              "run"]) == 0
    case = json.loads((tmp_path / "run.json").read_text())["cases"][0]
    assert case["errors"]["mc-flat-cpu+graph"] == ("not capturable: RuntimeError: operation not "
                                                   "permitted when stream is capturing")
    assert set(case["results"]) == {"mc-flat-cpu", "torch-forloop"}


# ---- --overhead: host time per step on tiny tensors (issue 13) ------------------------------
OVERHEAD = ["--overhead", "--quick", "--rounds", "2", "--warmup", "1"]


@pytest.fixture
def keep_threads():
    """--overhead sets torch.set_num_threads(1): the tests after it get torch's count back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_overhead_defaults():
    args, _ = bench.parse_args(["--overhead"])
    assert (args.tensors, args.dtypes, args.threads, args.formats) == (
        [148, 2000], ["float32"], 1, ["json", "csv"])
    assert args.rounds >= 40 and args.warmup >= 1 and args.params is None
    args, _ = bench.parse_args(["--overhead", "--tensors", "2000", "7", "--threads", "2",
                                "--rounds", "40"])
    assert (args.tensors, args.threads, args.rounds) == ([2000, 7], 2, 40)
    args, _ = bench.parse_args([])  # the other mode's defaults are as they were
    assert (args.rounds, args.warmup, args.threads, args.tensors) == (30, 3, None, None)


def test_tiny_layout_sizes():
    for n in (148, 2000):
        layout = bench.tiny_layout(n)
        sizes = bench.layout_sizes(layout, None, bench.case_seed(0, layout, 0))
        assert len(sizes) == n and 1 <= min(sizes) and max(sizes) <= bench.TINY_MAX
        assert len(set(sizes)) > 8  # not one size: tails of every length
        assert sum(sizes) == bench.overhead_total(n, 0)
    assert bench.tiny_count("tiny-148") == 148 and bench.tiny_count("gpt2") is None
    with pytest.raises(ValueError, match="sizes sum to"):
        bench.layout_sizes("tiny-148", bench.overhead_total(148, 0) + 1, 0)


def test_evict_writes_before_each_timed_call():
    """--evict: every step gets an untimed prepare that writes the whole buffer (each call
    adds 1 to every byte); 0 gives none."""
    steps = {"a": lambda: None, "b": lambda: None}
    assert bench.evicting(steps, 0) is None
    prep = bench.evicting(steps, 1)
    assert set(prep) == {"a", "b"}
    junk = prep["a"].func.__self__
    assert junk.numel() == 1 << 20
    before = junk.clone()
    prep["a"]()
    prep["b"]()
    assert torch.equal(junk, before + 2)
    args, _ = bench.parse_args(["--overhead", "--evict", "64"])
    assert args.evict == 64
    assert bench.parse_args(["--overhead"])[0].evict == 0


@pytest.fixture(scope="module")
def overhead_run(tmp_path_factory):
    n = torch.get_num_threads()
    out = tmp_path_factory.mktemp("overhead")
    buf = io.StringIO()
    import contextlib
    try:
        with contextlib.redirect_stdout(buf):
            code = bench.main(OVERHEAD + ["--out", str(out), "--name", "ovh"])
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(n)
    return code, out, buf.getvalue(), threads


def test_overhead_runs_both_counts_and_writes_json_csv(overhead_run):
    code, out, text, threads = overhead_run
    assert code == 0 and threads == 1
    assert sorted(p.name for p in out.iterdir()) == ["ovh.csv", "ovh.json"]  # no png
    doc = json.loads((out / "ovh.json").read_text())
    assert doc["schema"] == bench.SCHEMA and doc["mode"] == "overhead"
    assert doc["complete"] is True and doc["failures"] == [] and doc["error"] is None
    assert doc["config"]["overhead"] is True and doc["config"]["tensors"] == [148, 2000]
    assert doc["machine"]["torch"]["threads"] == 1
    assert [(c["layout"], c["tensors"], c["dtype"]) for c in doc["cases"]] == [
        ("tiny-148", 148, "float32"), ("tiny-2000", 2000, "float32")]
    for case in doc["cases"]:
        assert 1 <= case["sizes_min"] and case["sizes_max"] <= bench.TINY_MAX
        assert case["numel"] == bench.overhead_total(case["tensors"], 0)
        res = case["results"]
        assert {"mc-flat-cpu", "mc-list-cpu", "torch-forloop", "torch-foreach",
                "torch-fused"} <= set(res)
        for r in [*res.values(), case["bandwidth_probe"]]:
            assert r["median_us"] == pytest.approx(1e3 * r["median_ms"])
            assert r["p10_us"] <= r["median_us"] <= r["p90_us"]
        assert res["mc-flat-cpu"]["kernels"] == 1
        assert res["torch-forloop"]["kernels"] == 3 * case["tensors"]
        assert res["mc-flat-cpu"]["vs_fused"] > 0 and res["mc-list-cpu"]["vs_foreach"] > 0
        assert case["bitwise_vs_forloop"]["mc-flat-cpu"] is True
        assert case["bitwise_vs_forloop"]["mc-list-cpu"] is True
        assert "contention" in case and "discarded_noisy_attempts" in case
    rows = _csv((out / "ovh.csv").read_text())
    assert len(rows) == sum(len(c["results"]) for c in doc["cases"])
    assert {r["layout"] for r in rows} == {"tiny-148", "tiny-2000"}


def test_overhead_targets_in_json_and_output(overhead_run):
    """Issue 13's targets, evaluated: flat <= fused / 3 at 148 tensors and / 5 at 2000, per
    tensor <= foreach at both; a target not met is reported, and the run still exits 0."""
    code, out, text, _ = overhead_run
    doc = json.loads((out / "ovh.json").read_text())
    targets = doc["targets"]
    assert targets["flat_vs_fused_divisor"] == {"148": 3, "2000": 5}
    got = {(t["tensors"], t["implementation"]): t for t in targets["list"]}
    assert set(got) == {(148, "mc-flat-cpu"), (148, "mc-list-cpu"), (2000, "mc-flat-cpu"),
                        (2000, "mc-list-cpu")}
    assert got[148, "mc-flat-cpu"]["max_ratio"] == pytest.approx(1 / 3)
    assert got[2000, "mc-flat-cpu"]["max_ratio"] == pytest.approx(1 / 5)
    assert got[148, "mc-list-cpu"]["base"] == "torch-foreach"
    for (n, name), t in got.items():
        case = next(c for c in doc["cases"] if c["tensors"] == n)
        assert t in case["targets"]
        base = case["results"][t["base"]]["median_ms"]
        assert t["ratio"] == pytest.approx(case["results"][name]["median_ms"] / base)
        assert t["met"] is (t["ratio"] <= t["max_ratio"])
        assert t["paired"]["p10"] <= t["paired"]["median"] <= t["paired"]["p90"]
    judged = [t["met"] for t in targets["list"]]
    assert (targets["met"], targets["not_met"], targets["not_evaluated"]) == (
        sum(judged), 4 - sum(judged), 0)
    assert targets["all_met"] is all(judged)
    assert "median us" in text and "one op: a.add_(b)" in text
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith(("148 tensors:",
                                                                              "2000 tensors:"))]
    assert len(lines) == 4
    assert all(ln.endswith(("target met", "NOT met")) for ln in lines)
    assert any(ln.startswith("2000 tensors: mc-flat-cpu <= torch-fused / 5: ") for ln in lines)


def test_overhead_with_ddp_bucket_views(tmp_path, capsys, keep_threads):
    """--overhead --ddp-grads: every .grad a view of one DDP-style bucket (tiny tensors fit
    the first bucket); momentum_cuda flat reads it in place, one op per step, with the
    for-loop's bits; the printed table says how the gradients were given."""
    code = bench.main(OVERHEAD + ["--ddp-grads", "--tensors", "148", "--out", str(tmp_path),
                                  "--name", "ddp"])
    text = capsys.readouterr().out
    assert code == 0
    doc = json.loads((tmp_path / "ddp.json").read_text())
    assert doc["config"]["ddp_grads"] is True and doc["failures"] == []
    (case,) = doc["cases"]
    assert case["params"] == "grads: views of DDP buckets"
    assert case["buckets"] == [bench.overhead_total(148, 0)]
    assert case["results"]["mc-flat-cpu"]["kernels"] == 1
    assert case["bitwise_vs_forloop"]["mc-flat-cpu"] is True
    assert case["bitwise_vs_forloop"]["mc-list-cpu"] is True
    assert "--ddp-grads: each .grad a view of a DDP-style gradient bucket" in text


def test_overhead_with_assigned_gradients(tmp_path, capsys, keep_threads):
    """--overhead --assigned-grads: before each timed step every parameter gets a gradient
    tensor of its own (never momentum_cuda's flat view), with the for-loop's bits after
    timing; the printed table says how the gradients were given."""
    code = bench.main(OVERHEAD + ["--assigned-grads", "--tensors", "148", "--out",
                                  str(tmp_path), "--name", "assigned"])
    text = capsys.readouterr().out
    assert code == 0
    doc = json.loads((tmp_path / "assigned.json").read_text())
    assert doc["config"]["assigned_grads"] is True and doc["failures"] == []
    (case,) = doc["cases"]
    assert case["bitwise_vs_forloop"]["mc-flat-cpu"] is True
    assert case["bitwise_vs_forloop"]["mc-list-cpu"] is True
    assert "--assigned-grads: before each timed step" in text


@pytest.mark.parametrize("assigned", [False, True], ids=["backward", "assigned"])
def test_overhead_with_unused_gradients(tmp_path, capsys, keep_threads, assigned):
    """--overhead --unused-grads: every 8th parameter from the fourth has no gradient (so with
    --assigned-grads too); momentum_cuda flat steps the others by one flat call over their
    runs (of 7), each contender with the for-loop's bits, the parameters without a gradient
    untouched."""
    code = bench.main(OVERHEAD + ["--unused-grads", "--tensors", "148", "--out", str(tmp_path),
                                  "--name", "unused"] + (["--assigned-grads"] if assigned else []))
    text = capsys.readouterr().out
    assert code == 0
    doc = json.loads((tmp_path / "unused.json").read_text())
    assert doc["config"]["unused_grads"] is True and doc["failures"] == []
    (case,) = doc["cases"]
    assert case["params"] == "grads: none for every 8th parameter from index 3 (19 of 148)"
    assert case["bitwise_vs_forloop"]["mc-flat-cpu"] is True
    assert case["bitwise_vs_forloop"]["mc-list-cpu"] is True
    # one flat call over the runs ([0, 3), then 18 runs of 7; parameter 147 has no gradient)
    assert case["results"]["mc-flat-cpu"]["mc_calls"] == 1
    assert "--unused-grads: every 8th parameter from index 3 has no gradient" in text


def test_differences_with_parameters_never_stepped():
    """A parameter without a gradient has no momentum buffer on either side: equal; a buffer
    on one side only is missing on the other."""
    data = bench.case_data([3, 5, 2], torch.float32, torch.device("cpu"), 0)
    data.bare = frozenset([1])
    forloop = bench.Impl("torch-forloop", "", lambda ps, h: torch.optim.SGD(
        ps, foreach=False, **h), ours=False)
    (a, pa), (b, pb) = (bench.build(forloop, data, dict(lr=0.1, momentum=0.9))
                        for _ in range(2))
    assert pa[1].grad is None and pa[0].grad is not None
    a.step()
    b.step()
    assert bench.differences(a, pa, b, pb, momentum=0.9) is None
    b.state[pb[1]]["momentum_buffer"] = torch.zeros(5)
    d = bench.differences(a, pa, b, pb, momentum=0.9)
    assert d == {"momentum_buffer": {"differing": 1, "of": 3, "missing_or_misshapen": [1]}}


def test_assigning_gives_each_step_gradients_of_its_own():
    """bench.assigning: each call gives every parameter one of 2 gradient sets in turn, each
    tensor its own (not the case's, not another contender's), with the case's values, after
    the function it composes with (--evict's)."""
    data = bench.case_data([3, 1, 5], torch.float32, torch.device("cpu"), seed=2)
    calls = []
    made = {name: (None, [p.clone().requires_grad_(True) for p in data.split(data.init)])
            for name in ("a", "b")}
    prepare = bench.assigning(made, data, {"a": lambda: calls.append("evict")})
    given = {name: [] for name in made}
    for _ in range(3):
        for name, fn in prepare.items():
            fn()
            given[name].append([p.grad for p in made[name][1]])
    assert calls == ["evict"] * 3
    want = data.split(data.grads)
    for name, sets in given.items():
        assert [g is h for g, h in zip(sets[0], sets[2])] == [True] * 3  # 2 sets in turn
        assert not any(g is h for g, h in zip(sets[0], sets[1]))
        for grads in sets:
            assert all(torch.equal(g, w) and g is not w for g, w in zip(grads, want))
    assert not any(g is h for g in given["a"][0] for h in given["b"][0] + given["b"][1])


def test_overhead_targets_unit():
    case = {"tensors": 2000, "results": {n: {"median_ms": m} for n, m in (
        ("mc-flat-cpu", 1.0), ("mc-list-cpu", 4.0), ("torch-foreach", 5.0),
        ("torch-fused", 6.0))}}
    times = {n: [r["median_ms"]] * 3 for n, r in case["results"].items()}
    t = {x["implementation"]: x for x in bench.overhead_targets(case, times)}
    assert t["mc-flat-cpu"]["ratio"] == pytest.approx(1 / 6) and t["mc-flat-cpu"]["met"] is True
    assert t["mc-list-cpu"]["ratio"] == pytest.approx(0.8) and t["mc-list-cpu"]["met"] is True
    case["tensors"] = 148  # flat's target: fused / 3
    times["mc-flat-cpu"] = [3.0] * 3
    case["results"]["mc-flat-cpu"]["median_ms"] = 3.0
    t = {x["implementation"]: x for x in bench.overhead_targets(case, times)}
    assert t["mc-flat-cpu"]["met"] is False
    assert bench.target_line(t["mc-flat-cpu"]).endswith("NOT met")
    case["tensors"] = 500  # no flat target at this count; fused not timed: not evaluated
    del case["results"]["torch-foreach"]
    t = bench.overhead_targets(case, times)
    assert [x["implementation"] for x in t] == ["mc-list-cpu"] and t[0]["met"] is None
    assert "not evaluated (torch-foreach was not timed" in bench.target_line(t[0])


def test_overhead_catches_a_planted_wrong_implementation(monkeypatch, tmp_path, capsys,
                                                         keep_threads):
    """The bitwise check runs in --overhead as everywhere: a wrong momentum_cuda
    implementation is recorded, not timed, and the exit status is 1."""
    _plant(monkeypatch, bench.Impl("mc-wrong", "momentum_cuda (planted bug: lr off by 2^-10)",
                                   lambda ps, h: momentum_cuda.SGD(
                                       ps, **{**h, "lr": h["lr"] * (1 + 2**-10)}),
                                   ours=True, flat=True))
    code = bench.main(OVERHEAD + ["--tensors", "148", "--impls", "mc-flat-cpu", "mc-wrong",
                                  "torch-fused", "--out", str(tmp_path), "--name", "run"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "FAILED: 148 tiny tensors (" in err and "mc-wrong: bitwise mismatch: check: " in err
    assert "BITWISE MISMATCH (not timed): mc-wrong" in out
    doc = json.loads((tmp_path / "run.json").read_text())
    (case,) = doc["cases"]
    assert [f["implementation"] for f in doc["failures"]] == ["mc-wrong"]
    assert case["bitwise_vs_forloop"]["mc-wrong"] is False
    assert set(case["results"]) == {"mc-flat-cpu", "torch-forloop", "torch-fused"}
    assert [t["implementation"] for t in doc["targets"]["list"]] == ["mc-flat-cpu"]


# ---- --ampclip: GradScaler unscale_ + clip_grad_norm_ + step + update ------------------------
AMPCLIP = ["--ampclip", "--quick", "--rounds", "2", "--warmup", "1", "--tensors", "148",
           "--params", "3000"]


def test_ampclip_defaults():
    args, _ = bench.parse_args(["--ampclip"])
    assert (args.tensors, args.params, args.layouts, args.dtypes, args.formats) == (
        [148, 2000], [2**24], ["few-large"], ["float32"], ["json", "csv"])
    assert (args.rounds, args.warmup, args.max_norm, args.threads) == (30, 3, 1.0, None)
    assert bench.AMPCLIP_PARAMS == 16_777_216
    # One kind of case asked for: only that kind runs.
    args, _ = bench.parse_args(["--ampclip", "--tensors", "2000"])
    assert (args.tensors, args.params) == ([2000], [])
    args, _ = bench.parse_args(["--ampclip", "--params", "1M", "--max-norm", "0.5"])
    assert (args.tensors, args.params, args.layouts, args.max_norm) == (
        [], [10**6], ["few-large"], 0.5)
    args, _ = bench.parse_args(["--ampclip", "--layouts", "gpt2", "resnet50"])
    assert (args.tensors, args.params, args.layouts) == ([], [2**24], ["gpt2", "resnet50"])


def test_ampclip_gradient_passes_table_is_what_its_comment_says():
    """GRAD_PHASES' comment: unscale_ 1r+1w, norm 1r, torch's clip multiply 1r+1w, step 1r,
    momentum_cuda's CUDA kernel step+clip 1r+1w; torch's sequence 4r+2w, the CUDA kernel's
    3r+2w, the CPU op's as torch's (its mul_ is torch's, before the kernel); p and buf: 4."""
    assert bench.GRAD_PHASES == {"unscale_": (1, 1), "norm": (1, 0), "clip": (1, 1),
                                 "step": (1, 0), "step+clip": (1, 1)}
    assert bench.STATE_ACCESSES == 4
    torch_ = bench.gradient_passes("torch", 4)
    assert (torch_["grad_reads"], torch_["grad_writes"], torch_["grad_passes"]) == (4, 2, 6)
    assert (torch_["grad_bytes_per_element"], torch_["total_bytes_per_element"]) == (24, 40)
    assert torch_["phases"] == ["unscale_", "norm", "clip", "step"]
    cuda = bench.gradient_passes("mc-cuda-kernel", 4)
    assert (cuda["grad_reads"], cuda["grad_writes"], cuda["grad_bytes_per_element"],
            cuda["total_bytes_per_element"]) == (3, 2, 20, 36)
    cpu = bench.gradient_passes("mc-cpu-op", 2)  # bf16: 2 bytes an element
    assert {k: v for k, v in cpu.items() if k != "sequence"} == {
        k: v for k, v in bench.gradient_passes("torch", 2).items() if k != "sequence"}
    assert cpu["grad_bytes_per_element"] == 12
    # Which sequence an implementation ran: from its kind, backend and reported paths.
    impls = {i.name: i for i in bench.implementations(torch.device("cpu"))[0]}
    assert bench.sequence_of(impls["torch-fused"], set()) == "torch"
    assert bench.sequence_of(impls["mc-flat-cpu"], {"flat"}) == "mc-cpu-op"
    cuda_impl = bench.Impl("mc-flat-cuda", "", None, ours=True, flat=True)
    assert bench.sequence_of(cuda_impl, {"flat"}) == "mc-cuda-kernel"
    assert bench.sequence_of(cuda_impl, {"flat", "torch-clip"}) == "torch"  # torch's clip ran


def test_timed_rounds_refills_untimed_before_each_call():
    """prepare[name] runs before every call of steps[name], warm-up included, outside the
    timed call; the probe (no prepare) is timed as before."""
    events = []

    class FakeClock:
        def sync(self):
            events.append("sync")

        def time_ms(self, fn):
            events.append("start")
            fn()
            events.append("stop")
            return 1.0

    steps = {"a": lambda: events.append("a"), "b": lambda: events.append("b"),
             "probe": lambda: events.append("probe")}
    prepare = {"a": lambda: events.append("fill a"), "b": lambda: events.append("fill b")}
    times, _ = bench.timed_rounds(steps, 1, 2, FakeClock(), prepare)
    assert {k: len(v) for k, v in times.items()} == {"a": 2, "b": 2, "probe": 2}
    assert events[:5] == ["fill a", "a", "fill b", "b", "probe"]  # warm-up
    timed = events[events.index("sync") + 1:]
    for name in ("a", "b"):
        for i, e in enumerate(timed):
            if e == name:  # inside a timed call, its refill just before that call started
                assert timed[i - 1] == "start" and timed[i - 2] == "fill " + name
    assert timed.count("start") == 6 and "fill a" not in [
        timed[i + 1] for i, e in enumerate(timed) if e == "start"]


def _main_quietly(argv) -> tuple[int, str]:
    """bench.main(argv) with its stdout caught: (exit status, what it printed)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = bench.main(argv)
    return code, buf.getvalue()


@pytest.fixture(scope="module")
def ampclip_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ampclip")
    code, text = _main_quietly(AMPCLIP + ["--out", str(out), "--name", "ac"])
    return code, out, text


def test_ampclip_runs_and_writes_json_csv(ampclip_run):
    code, out, text = ampclip_run
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["ac.csv", "ac.json"]  # no png
    doc = json.loads((out / "ac.json").read_text())
    assert doc["schema"] == bench.SCHEMA and doc["mode"] == "ampclip"
    assert doc["complete"] is True and doc["failures"] == [] and doc["error"] is None
    assert doc["config"]["ampclip"] is True and doc["config"]["max_norm"] == 1.0
    for key in ("date", "device", "commit", "cpu", "torch", "triton", "backends"):
        assert key in doc["machine"], key
    assert [(c["layout"], c["tensors"], c["numel"]) for c in doc["cases"]] == [
        ("tiny-148", 148, bench.overhead_total(148, 0)), ("few-large", 8, 3000)]
    assert any("does NOT fuse the clip" in n for n in doc["notes"])  # CPU: said plainly
    assert doc["passes_model"]["sequences"]["torch"] == ["unscale_", "norm", "clip", "step"]
    names = {"mc-flat-cpu", "mc-list-cpu", "torch-forloop", "torch-foreach", "torch-fused"}
    for case in doc["cases"]:
        assert set(case["results"]) == names
        assert case["clip"]["active"] is True and case["grad_scale"] == 2.0**16
        assert all(n > 1.0 for n in case["clip"]["total_norms_checked"])
        assert case["bitwise_vs_forloop"]["mc-flat-cpu"] is True
        assert case["bitwise_vs_forloop"]["mc-list-cpu"] is True
        assert case["mismatches"] == {} and case["errors"] == {}
        assert "contention" in case and case["steps_per_optimizer"] == 1 + 2
        probe = case["bandwidth_probe"]
        for name, r in case["results"].items():
            assert len(r["times_ms"]) == 2
            assert r["p10_us"] <= r["median_us"] <= r["p90_us"]
            assert r["median_us"] == pytest.approx(1e3 * r["median_ms"])
            assert r["iqr_us"] == pytest.approx(1e3 * r["iqr_ms"]) and r["iqr_ms"] >= 0
            # ratios: the torch contender's median / this median, both of this case's rounds
            for base in bench.AMPCLIP_BASES:
                key = base.split("-")[1]
                assert r["vs_" + key] == pytest.approx(
                    case["results"][base]["median_ms"] / r["median_ms"])
                assert r["paired_vs_" + key]["rounds"] == 2
            assert r["final_scale"] == 2.0**16  # no overflow, no growth: the pool stays scaled
            want = "mc-cpu-op" if name.startswith("mc-") else "torch"
            assert r["passes"] == bench.gradient_passes(want, 4)
            assert r["model_gbps"] == pytest.approx(
                case["numel"] * 40 / (r["median_ms"] * 1e-3) / 1e9)
            assert r["bw_share"] == pytest.approx(r["model_gbps"] / probe["gbps"])
            assert r["kernels"] > 0
        assert case["results"]["mc-flat-cpu"]["kernel_paths"] == ["flat"]  # clip in the op
    rows = _csv((out / "ac.csv").read_text())
    assert list(rows[0]) == list(bench.AMPCLIP_CSV_FIELDS)
    assert len(rows) == 2 * len(names)
    assert {r["grad_bytes_per_element"] for r in rows} == {"24"}
    assert "median us" in text and "vs fused" in text and "4r+2w" in text


class _NoClip(momentum_cuda.SGD):
    """A planted bug: clip_grad_norm_ returns the norm and never clips."""

    def clip_grad_norm_(self, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite, foreach)


def test_ampclip_catches_a_clip_that_is_not_applied(monkeypatch, tmp_path, capsys):
    _plant(monkeypatch, bench.Impl("mc-noclip", "momentum_cuda (planted bug: no clip)",
                                   lambda ps, h: _NoClip(ps, **h), ours=True, flat=True))
    code = bench.main(["--ampclip", "--quick", "--rounds", "2", "--warmup", "1", "--tensors",
                       "148", "--impls", "mc-flat-cpu", "mc-noclip", "torch-fused", "--out",
                       str(tmp_path), "--name", "run"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "mc-noclip: bitwise mismatch: check: " in err and "grads differ" in err
    assert "BITWISE MISMATCH (not timed): mc-noclip" in out
    (case,) = json.loads((tmp_path / "run.json").read_text())["cases"]
    assert case["bitwise_vs_forloop"]["mc-noclip"] is False
    assert set(case["results"]) == {"mc-flat-cpu", "torch-forloop", "torch-fused"}


# ---- --master: bf16 parameters with exact fp32 master weights (issue 14) ---------------------
MASTER = ["--master", "--quick", "--params", "3000", "--layouts", "few-large", "gpt2",
          "--rounds", "2", "--warmup", "1"]
MASTER_NAMES = {"mc-master-cpu", "mc-flat-cpu-fp32", "mc-flat-cpu-bf16", "torch-master-forloop",
                "torch-master-foreach", "torch-master-fused", "torch-fp32-forloop",
                "torch-fp32-foreach", "torch-fp32-fused", "torch-bf16-forloop"}
# The bytes model's derivation (MASTER_BYTES' comment), per parameter per step, momentum 0.9:
# one pass: master reads p 2 + rem 2 + ties 1/8 + g 2 + buf 4, writes p 2 + rem 2 + ties 1/8 +
# buf 4; fp32 5 x 4; bf16 5 x 2. torch for-loop / foreach: 8 accesses. The recipe: + 6 + 6.
MOVED = {"mc-master-cpu": (10.125, 8.125), "mc-flat-cpu-fp32": (12, 8),
         "mc-flat-cpu-bf16": (6, 4), "torch-master-forloop": (26, 18),
         "torch-master-foreach": (26, 18), "torch-master-fused": (18, 14),
         "torch-fp32-forloop": (20, 12), "torch-fp32-foreach": (20, 12),
         "torch-fp32-fused": (12, 8), "torch-bf16-forloop": (10, 6)}


def test_master_defaults():
    args, _ = bench.parse_args(["--master"])
    assert (args.master, args.layouts, args.dtypes, args.formats) == (
        True, ["few-large", "many-small"], ["bfloat16"], ["json", "csv", "png"])
    assert (args.rounds, args.warmup) == (30, 3)
    args, _ = bench.parse_args(["--master", "--quick", "--layouts", "gpt2"])
    assert (args.params, args.layouts, args.rounds) == ([10**6], ["gpt2"], 5)


def test_master_bytes_model_is_the_derivation():
    impls = {i.name: i for i in bench.master_implementations(torch.device("cpu"))[0]}
    assert set(impls) == MASTER_NAMES
    hyper = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False)
    got = {n: bench.moved_bytes(i, hyper) for n, i in impls.items()}
    assert {n: (m["read"], m["written"]) for n, m in got.items()} == MOVED
    assert {n: m["total"] for n, m in got.items()} == {
        "mc-master-cpu": 18.25, "mc-flat-cpu-fp32": 20, "mc-flat-cpu-bf16": 10,
        "torch-master-forloop": 44, "torch-master-foreach": 44, "torch-master-fused": 32,
        "torch-fp32-forloop": 32, "torch-fp32-foreach": 32, "torch-fp32-fused": 20,
        "torch-bf16-forloop": 16}
    assert [o["op"] for o in got["torch-master-foreach"]["ops"]] == [
        "copy g into the master's fp32 grad", "buf.mul_(momentum)", "buf.add_(g)",
        "p.add_(d, alpha=-lr)", "copy the master into p"]
    # No momentum, no buffer: the master op reads p, rem, ties, g and writes p, rem, ties.
    plain = {**hyper, "momentum": 0.0}
    assert bench.moved_bytes(impls["mc-master-cpu"], plain)["total"] == 10.25
    assert bench.moved_bytes(impls["torch-fp32-forloop"], plain)["total"] == 12
    # Weight decay and nesterov: a temporary each in torch's for-loop; one pass is one pass.
    extra = {**hyper, "weight_decay": 0.01, "nesterov": True}
    assert bench.moved_bytes(impls["torch-fp32-foreach"], extra)["total"] == 32 + 12 + 12
    assert bench.moved_bytes(impls["mc-master-cpu"], extra)["total"] == 18.25
    assert bench.moved_bytes(impls["torch-master-fused"], extra)["total"] == 32
    # The case's peak: data (bf16 + fp32: 18) + temporaries (4) + every contender's weights,
    # state and gradients: master 2 + 6.125 + 2, flat 12 and 6, recipe 3 x (6 + 4 + 6),
    # torch 3 x 12 + 6: 118.125, rounded up.
    assert bench.master_peak_bytes(list(impls.values()), 10**6, 0.9) == 18 + 4 + 119


def test_master_recipe_is_torchs_fp32_step_copied_back():
    """MasterRecipe (the baseline): its masters are torch's fp32 step on the widened bf16
    values and gradients, its bf16 parameters the masters rounded (for-loop bitwise)."""
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(n, generator=gen).bfloat16() for n in (5, 33)]
    grads = [torch.randn(n, generator=gen).bfloat16() for n in (5, 33)]
    for kw in bench.TORCH_STEPS.values():
        ps = [x.clone().requires_grad_(True) for x in init]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        twin = [x.float().requires_grad_(True) for x in init]
        for t, g in zip(twin, grads):
            t.grad = g.float()
        opt = bench.MasterRecipe(ps, kw, lr=0.5, momentum=0.9)
        ref = torch.optim.SGD(twin, lr=0.5, momentum=0.9, foreach=False)
        for _ in range(3):
            opt.step()
            ref.step()
        for p, t in zip(ps, twin):
            assert p.dtype == torch.bfloat16
            assert torch.equal(p, opt.master_weight(p).bfloat16())  # copied back, rounded
            if "fused" not in kw:  # torch's fused step need not be its for-loop's bits
                assert torch.equal(opt.master_weight(p), t.detach())
                assert torch.equal(opt.state[p]["momentum_buffer"],
                                   ref.state[t]["momentum_buffer"])
        assert all(m.grad.dtype == torch.float32 for m in opt.masters)


def test_master_without_the_op_on_a_backend_is_left_out_with_the_reason(monkeypatch):
    def no_op(backend):
        raise AttributeError("no op 'sgd_step_master_list_'")

    monkeypatch.setattr(bench, "master_op", no_op)
    impls, missing = bench.master_implementations(torch.device("cpu"))
    assert {i.name for i in impls} == MASTER_NAMES - {"mc-master-cpu"}  # flat still runs
    assert missing["mc-master-cpu"].startswith("backend 'cpu' has no master-weights op in this "
                                               "build (AttributeError: ")
    assert "does not run on cpu tensors" in missing["mc-*-triton"]


@pytest.fixture(scope="module")
def master_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("master")
    code, text = _main_quietly(MASTER + ["--out", str(out), "--name", "m"])
    return code, out, text


def _expected_memory(name: str, sizes: list, momentum: bool) -> dict:
    """Bytes held, from the sizes alone (not bench.memory_formula): what each keeps."""
    n = sum(sizes)
    padded = lambda esize: sum(-(-s * esize // 64) * 64 for s in sizes)  # noqa: E731
    if name.startswith("mc-flat"):
        one = padded(4 if name.endswith("fp32") else 2)
        return {"weights": one, "state": one * momentum, "grads": one}
    if name.startswith("mc-master"):
        return {"weights": 2 * n, "grads": 2 * n,
                "state": 4 * n * momentum + 2 * n + sum((s + 7) // 8 for s in sizes)}
    if name.startswith("torch-master"):
        return {"weights": 6 * n, "state": 4 * n * momentum, "grads": 6 * n}
    esize = 2 if "bf16" in name else 4
    return {"weights": esize * n, "state": esize * n * momentum, "grads": esize * n}


def test_master_runs_and_writes_json_csv_png(master_run):
    code, out, text = master_run
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["m.csv", "m.json", "m.png"]
    doc = json.loads((out / "m.json").read_text())
    assert doc["mode"] == "master" and doc["complete"] is True and doc["failures"] == []
    assert doc["config"]["master"] is True and doc["default_backend"] == "cpu"
    assert doc["bytes_model"]["implementations"]["mc-master-cpu"]["total"] == 18.25
    assert any("a MODEL, not a measurement" in n for n in doc["notes"])
    assert [(c["layout"], c["numel"], c["dtype"]) for c in doc["cases"]] == [
        ("few-large", 3000, "bfloat16"), ("gpt2", 3000, "bfloat16")]
    for case in doc["cases"]:
        assert set(case["results"]) == MASTER_NAMES
        assert case["errors"] == {} and case["mismatches"] == {}
        assert case["steps_per_optimizer"] == 1 + 2
        sizes = bench.layout_sizes(case["layout"], case["numel"], case["data_seed"])
        assert len(sizes) == case["tensors"]
        for name, r in case["results"].items():
            assert r["reference"] == ("torch-bf16-forloop" if name.endswith("bf16") or
                                      name == "torch-bf16-forloop" else "torch-fp32-forloop")
            if name.startswith("mc-") or name == "torch-master-forloop":
                assert case["bitwise_vs_forloop"][name] is True, name  # checked after timing
            assert len(r["times_ms"]) == 2 and r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
            read, written = MOVED[name]
            assert (r["moved"]["read"], r["moved"]["written"]) == (read, written)
            assert r["bytes_per_param"] == read + written
            assert r["gbps"] == pytest.approx(
                case["numel"] * r["bytes_per_param"] / (r["median_ms"] * 1e-3) / 1e9)
            for base in bench.MASTER_BASES:
                assert r["vs_" + bench.ratio_key(base)] == pytest.approx(
                    case["results"][base]["median_ms"] / r["median_ms"])
            # Memory held: measured from the tensors, equal to what the sizes say.
            want = _expected_memory(name, sizes, True)
            assert r["memory_bytes"] == want == r["memory_formula_bytes"], name
            assert r["memory_matches_formula"] is True
            assert r["memory_per_param"]["state"] == pytest.approx(want["state"] / case["numel"])
            assert r["kernels"] > 0 and r["alloc_bytes"] == 0  # no allocation in a step
        mp = case["results"]["mc-master-cpu"]
        assert mp["kernels"] == 1 and mp["mc_calls"] == 1  # one master op a step
        # The master's state: fp32 buffer 4 + int16 remainder 2 + a tie bit (+ rounding up)
        assert 6.125 <= mp["memory_per_param"]["state"] < 6.125 + case["tensors"] / 3000
        assert mp["memory_per_param"]["weights"] == 2.0
    rows = _csv((out / "m.csv").read_text())
    assert list(rows[0]) == list(bench.MASTER_CSV_FIELDS) and len(rows) == 2 * len(MASTER_NAMES)
    assert {r["bytes_per_param"] for r in rows if r["implementation"] == "mc-master-cpu"} == {
        "18.25"}
    assert {r["memory_matches_formula"] for r in rows} == {"True"}
    for col in ("moved B/p", "state B/p", "vs m-foreach", "== ref", "18.25"):
        assert col in text
    assert "bandwidth probe (fp32)" in text


class _DriftsAfterTwoSteps(momentum_cuda.SGD):
    """A planted bug the 2-step check cannot see: from the third step on, lr is 2^-20 off."""

    def step(self, closure=None):
        self.steps = getattr(self, "steps", 0) + 1
        if self.steps == 3:
            for g in self.param_groups:
                g["lr"] *= 1 + 2**-20
        return super().step(closure)


@pytest.mark.parametrize("planted,phase,summary", [
    # master_weights not set: the plain flat path runs: the path check says so
    (lambda ps, h: momentum_cuda.SGD(ps, **h), None, "did not make exactly one master kernel "
                                                     "call over 3000 elements on backend cpu"),
    (lambda ps, h: momentum_cuda.SGD(ps, master_weights=True, **{**h, "lr": h["lr"] * 1.5}),
     "check", "masters differ"),
    (lambda ps, h: _DriftsAfterTwoSteps(ps, master_weights=True, **h), "after timing",
     "masters differ"),
], ids=["no-master-path", "lr-off", "drifts-after-the-check"])
def test_master_catches_a_wrong_master(monkeypatch, tmp_path, capsys, planted, phase, summary):
    _plant(monkeypatch, bench.Impl("mc-planted", "momentum_cuda (planted bug)", planted,
                                   ours=True, model=torch.bfloat16, kind="master",
                                   backend="cpu"), "master_implementations")
    code = bench.main(MASTER + ["--layouts", "few-large", "--impls", "mc-master-cpu",
                                "mc-planted", "--formats", "json", "--out", str(tmp_path),
                                "--name", "run"])
    err = capsys.readouterr().err
    assert code == 1 and "mc-planted" in err and summary in err
    (case,) = json.loads((tmp_path / "run.json").read_text())["cases"]
    assert set(case["results"]) == {"mc-master-cpu", "torch-fp32-forloop", "torch-bf16-forloop"}
    if phase is None:  # it could not run as a master-weights step: an error, not timed
        assert summary in case["errors"]["mc-planted"]
    else:
        m = case["mismatches"]["mc-planted"]
        assert (m["phase"], m["steps"]) == (phase, 2 if phase == "check" else 3)
        assert m["master"]["differing"] >= 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_master_backend_that_cannot_run_here_is_named(tmp_path, capsys):
    code = bench.main(MASTER + ["--layouts", "few-large", "--impls", "mc-master-cuda",
                                "mc-master-triton", "--formats", "json", "--out",
                                str(tmp_path), "--name", "run"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "ASKED FOR BUT NOT AVAILABLE on cpu: mc-master-cuda: backend='cuda' cannot run" in out
    assert "mc-master-triton: backend='triton' cannot run on device cpu" in out
    (case,) = json.loads((tmp_path / "run.json").read_text())["cases"]
    assert set(case["results"]) == {"torch-fp32-forloop", "torch-bf16-forloop"}


# ---- --modes: every mode next to fp32 and torch (issue 14) ------------------------------------
MODES = ["--modes", "--quick", "--params", "3000", "--layouts", "few-large", "gpt2",
         "--rounds", "2", "--warmup", "1"]
MODES_NAMES = ["mc-flat-cpu-fp32", "mc-mdtype-cpu-bf16", "mc-mdtype-cpu-int8", "mc-master-cpu",
               "mc-sr-cpu", "mc-flat-cpu-bf16", "torch-fp32-forloop", "torch-fp32-foreach",
               "torch-fp32-fused", "torch-bf16-forloop"]
MODES_TWINS = {"mc-sr-cpu": "ref-sr", "mc-mdtype-cpu-bf16": "ref-mdtype-bf16",
               "mc-mdtype-cpu-int8": "ref-mdtype-int8"}
# The bytes model per parameter per step, momentum 0.9, (read, written), from the brief's
# derivation: stochastic rounding reads p 2 g 2 buf 2, writes p 2 buf 2; momentum_dtype bf16
# reads p 4 g 4 buf 2, writes p 4 buf 2; int8 reads p 4 g 4 codes 1, writes p 4 codes 1, and
# reads and writes a 4-byte scale per 256 elements; the others as --master's.
MODES_MOVED = {"mc-flat-cpu-fp32": (12, 8), "mc-mdtype-cpu-bf16": (10, 6),
               "mc-mdtype-cpu-int8": (9 + 4 / 256, 5 + 4 / 256), "mc-master-cpu": (10.125, 8.125),
               "mc-sr-cpu": (6, 4), "mc-flat-cpu-bf16": (6, 4), "torch-fp32-forloop": (20, 12),
               "torch-fp32-foreach": (20, 12), "torch-fp32-fused": (12, 8),
               "torch-bf16-forloop": (10, 6)}
HYPER = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False)


def test_modes_defaults():
    args, _ = bench.parse_args(["--modes"])
    assert (args.modes, args.params, args.layouts, args.dtypes, args.formats) == (
        True, [10**6, 10**7], ["few-large", "many-small"], ["bfloat16"], ["json", "csv", "png"])
    assert (args.rounds, args.warmup, args.momentum) == (30, 3, 0.9)
    args, _ = bench.parse_args(["--modes", "--quick", "--layouts", "gpt2"])
    assert (args.params, args.layouts, args.rounds) == ([10**6], ["gpt2"], 5)
    args, _ = bench.parse_args(["--modes", "--params", "5M"])
    assert args.params == [5 * 10**6]


@pytest.mark.parametrize("argv,message", [
    (["--modes", "--master"], "--master and --modes are two modes: one at a time"),
    (["--modes", "--ampclip"], "--modes is a mode of its own: not with --overhead or --ampclip"),
    (["--modes", "--dtypes", "float32"], "--modes steps bfloat16 models"),
    (["--modes", "--layouts", "ddp-gpt2"], "--modes times plain tensors; it takes no --layouts "
                                           "ddp-gpt2"),
    (["--modes", "--rounds", "5"], "--rounds must be >= 20"),
])
def test_modes_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def _modes_impls():
    impls, missing = bench.modes_implementations(torch.device("cpu"))
    return {i.name: i for i in impls}, missing


def test_modes_contenders_references_and_bytes_model():
    impls, missing = _modes_impls()
    timed = [n for n, i in impls.items() if i.timed]
    assert timed == MODES_NAMES  # the report's order
    assert {n for n, i in impls.items() if not i.timed} == set(MODES_TWINS.values())
    assert {n: bench.modes_reference(impls[n]) for n in MODES_TWINS} == MODES_TWINS
    assert bench.modes_reference(impls["mc-master-cpu"]) == "torch-fp32-forloop"
    assert bench.modes_reference(impls["mc-flat-cpu-fp32"]) == "torch-fp32-forloop"
    assert bench.modes_reference(impls["mc-flat-cpu-bf16"]) == "torch-bf16-forloop"
    assert "does not run on cpu tensors" in missing["mc-*-triton"]
    got = {n: bench.moved_bytes(impls[n], HYPER) for n in MODES_NAMES}
    assert {n: (m["read"], m["written"]) for n, m in got.items()} == MODES_MOVED
    assert {n: m["total"] for n, m in got.items()} == {
        "mc-flat-cpu-fp32": 20, "mc-mdtype-cpu-bf16": 16, "mc-mdtype-cpu-int8": 14.03125,
        "mc-master-cpu": 18.25, "mc-sr-cpu": 10, "mc-flat-cpu-bf16": 10,
        "torch-fp32-forloop": 32, "torch-fp32-foreach": 32, "torch-fp32-fused": 20,
        "torch-bf16-forloop": 16}
    # No momentum, no buffer (and no scales): one pass reads p, g and writes p.
    plain = {**HYPER, "momentum": 0.0}
    assert bench.moved_bytes(impls["mc-mdtype-cpu-int8"], plain)["total"] == 12
    assert bench.moved_bytes(impls["mc-sr-cpu"], plain)["total"] == 6
    # needed_twins: a twin runs only where a timed contender refers to it
    some = [impls[n] for n in ("mc-sr-cpu", "torch-fp32-forloop", "torch-bf16-forloop")]
    assert [i.name for i in bench.needed_twins(some + [impls[t] for t in MODES_TWINS.values()])] \
        == ["mc-sr-cpu", "torch-fp32-forloop", "torch-bf16-forloop", "ref-sr"]


def test_modes_without_an_op_on_a_backend_are_left_out_with_the_reason(monkeypatch):
    def no_op(backend):
        raise AttributeError("no such op")

    monkeypatch.setattr(bench, "sr_op", no_op)
    monkeypatch.setattr(bench, "qmom_op", no_op)
    impls, missing = _modes_impls()
    assert [n for n, i in impls.items() if i.timed] == [
        n for n in MODES_NAMES if n not in MODES_TWINS]
    assert missing["mc-sr-cpu"] == ("backend 'cpu' has no stochastic-rounding op in this build "
                                    "(AttributeError: no such op)")
    for w in ("bf16", "int8"):
        assert missing[f"mc-mdtype-cpu-{w}"].startswith("backend 'cpu' has no momentum_dtype op")


def _held_expected(name: str, sizes: list, momentum: bool) -> dict:
    """Bytes held, from the sizes alone (not bench.memory_formula): what each mode keeps."""
    n = sum(sizes)
    if name.startswith("mc-sr"):  # bf16 parameter, gradient and buffer
        return {"weights": 2 * n, "state": 2 * n * momentum, "grads": 2 * n}
    if name.startswith("mc-mdtype"):  # fp32 parameter and gradient; bf16 buffer or int8 codes
        state = 2 * n if name.endswith("bf16") else n + 4 * sum((s + 255) // 256 for s in sizes)
        return {"weights": 4 * n, "state": state * momentum, "grads": 4 * n}
    return _expected_memory(name, sizes, momentum)


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_modes_memory_formula_is_what_the_tensors_hold(momentum):
    """held_memory() (measured) == memory_formula() == the sizes' arithmetic, on sizes that
    are not multiples of the flat alignment nor of the int8 block."""
    impls, _ = _modes_impls()
    sizes = [1, 255, 256, 257, 1000]
    data = bench.case_data(sizes, torch.bfloat16, torch.device("cpu"), 5)
    datas = {torch.bfloat16: data, torch.float32: bench.CaseData(
        sizes, *(t.float() for t in (data.init, data.grads, data.grads2)))}
    h = {**HYPER, "momentum": momentum}
    for name in MODES_NAMES:
        impl = impls[name]
        opt, params = bench.build(impl, datas[impl.model], h)
        opt.step()
        held = bench.held_memory(opt, params)
        assert held == bench.memory_formula(impl, sizes, momentum) == _held_expected(
            name, sizes, bool(momentum)), name


def test_twin_sample():
    small = [5, 300, 1000]
    assert bench.twin_sample(small) == {0: 5, 1: 300, 2: 1000}  # small: every element
    few = bench.layout_sizes("few-large", 10**7, 0)
    assert bench.twin_sample(few) == {i: 2**16 for i in range(8)}  # 2^19 / 8 of each
    many = bench.layout_sizes("many-small", 10**7, 0)
    sample = bench.twin_sample(many)
    assert len(sample) == 64 and min(sample) == 0 and max(sample) == 1999  # evenly spaced
    assert sorted(sample) == [round(k * 1999 / 63) for k in range(64)]
    head = 2**19 // 64 // 256 * 256
    assert sample == {i: min(many[i], head) for i in sample}  # whole int8 blocks
    assert sum(sample.values()) <= bench.TWIN_ELEMENTS


def test_twin_on_the_heads_steps_them_as_the_whole_parameters():
    """A twin made over each parameter's first elements (after timing) holds what
    momentum_cuda holds there after the same steps: the check on the heads is exact; and a
    contender one step ahead differs."""
    impls, _ = _modes_impls()
    sizes = [300, 700, 100, 50]
    sample = {1: 256, 2: 100, 3: 50}  # not the first: the sr keys keep each one's place
    data = bench.case_data(sizes, torch.bfloat16, torch.device("cpu"), 7)
    datas = {torch.bfloat16: data, torch.float32: bench.CaseData(
        sizes, *(t.float() for t in (data.init, data.grads, data.grads2)))}
    for name, twin in MODES_TWINS.items():
        impl = impls[name]
        opt, params = bench.build(impl, datas[impl.model], HYPER)
        ref_opt, ref_params = bench.build(impls[twin], bench.sample_data(datas[impl.model],
                                                                         sample), HYPER)
        ref_opt.positions = list(sample)
        for _ in range(3):
            opt.step()
            ref_opt.step()
        assert [p.numel() for p in ref_params] == list(sample.values())
        assert bench.versus_reference(impl, opt, params, ref_opt, ref_params, 0.9, sample) is None
        if name == "mc-sr-cpu":  # numbered from 0 instead, the keys draw other bits
            ref_opt.positions = [0, 1, 2]
            wrong = bench.build(impls[twin], bench.sample_data(datas[impl.model], sample), HYPER)
            wrong[0].positions = [0, 1, 2]
            for _ in range(3):
                wrong[0].step()
            assert bench.versus_reference(impl, opt, params, *wrong, 0.9, sample) is not None
        opt.step()
        diff = bench.versus_reference(impl, opt, params, ref_opt, ref_params, 0.9, sample)
        assert diff is not None and diff["param"]["differing"] == 3, name
        if name.endswith("int8"):
            assert "momentum_scales" in diff


@pytest.fixture(scope="module")
def modes_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("modes")
    code, text = _main_quietly(MODES + ["--out", str(out), "--name", "m"])
    return code, out, text


def test_modes_runs_and_writes_json_csv_png(modes_run):
    code, out, text = modes_run
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["m.csv", "m.json", "m.png"]
    doc = json.loads((out / "m.json").read_text())
    assert doc["mode"] == "modes" and doc["complete"] is True and doc["failures"] == []
    assert doc["config"]["modes"] is True and doc["twin_sample"] == {
        "tensors": bench.TWIN_TENSORS, "elements": bench.TWIN_ELEMENTS}
    assert list(doc["bytes_model"]["implementations"]) == MODES_NAMES
    assert any("a MODEL, not a measurement" in n for n in doc["notes"])
    assert [(c["layout"], c["numel"]) for c in doc["cases"]] == [("few-large", 3000),
                                                                ("gpt2", 3000)]
    for case in doc["cases"]:
        assert list(case["results"]) == MODES_NAMES  # the twins are not timed
        assert case["errors"] == {} and case["mismatches"] == {}
        assert case["steps_per_optimizer"] == 1 + 2
        sizes = bench.layout_sizes(case["layout"], case["numel"], case["data_seed"])
        sample = bench.twin_sample(sizes)  # few-large: all; gpt2: 64 of its 148 tensors
        assert len(sample) == min(len(sizes), 64)
        assert case["twin_check"] == {"tensors": len(sample), "of_tensors": len(sizes),
                                      "elements": sum(sample.values()), "of": 3000,
                                      "per_parameter_max": max(sample.values())}
        for name, r in case["results"].items():
            assert r["reference"] == case["references"][name] == MODES_TWINS.get(
                name, "torch-bf16-forloop" if "bf16" in name and "mdtype" not in name
                else "torch-fp32-forloop")
            if name.startswith("mc-"):
                assert case["bitwise_vs_forloop"][name] is True, name  # checked after timing
                assert r["kernels"] == 1 and r["mc_calls"] == 1, name  # one op a step
            assert len(r["times_ms"]) == 2 and r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
            assert (r["moved"]["read"], r["moved"]["written"]) == MODES_MOVED[name]
            assert r["gbps"] == pytest.approx(
                case["numel"] * r["bytes_per_param"] / (r["median_ms"] * 1e-3) / 1e9)
            for base in bench.MODES_BASES:
                assert r["vs_" + bench.ratio_key(base)] == pytest.approx(
                    case["results"][base]["median_ms"] / r["median_ms"])
            want = _held_expected(name, sizes, True)
            assert r["memory_bytes"] == want == r["memory_formula_bytes"], name
            assert r["memory_matches_formula"] is True
            assert r["memory_per_param"]["total"] == pytest.approx(sum(want.values()) / 3000)
        assert case["results"]["mc-mdtype-cpu-int8"]["momentum_dtype"] == "int8"
        # int8 state: a byte per element and a 4-byte scale per (started) block of 256
        assert 1 + 4 / 256 <= case["results"]["mc-mdtype-cpu-int8"]["memory_per_param"][
            "state"] < 1 + 4 / 256 + 4 * case["tensors"] / 3000
    rows = _csv((out / "m.csv").read_text())
    assert list(rows[0]) == list(bench.MODES_CSV_FIELDS) and len(rows) == 2 * len(MODES_NAMES)
    assert {r["bytes_per_param"] for r in rows if r["implementation"] == "mc-mdtype-cpu-int8"} \
        == {"14.03125"}
    assert {r["memory_matches_formula"] for r in rows} == {"True"}
    for col in ("vs fp32-foreach", "vs fp32-fused", "moved B/p", "state B/p", "held B/p",
                "= formula", "== ref", "mc-sr-cpu", "bandwidth probe (fp32)"):
        assert col in text


class _LrJumpsAfterTwoSteps(momentum_cuda.SGD):
    """A planted bug the 2-step check cannot see: from the third step on, lr is 1.5 times what
    it was (a bf16 parameter rounded stochastically hides a change of 2^-20)."""

    def step(self, closure=None):
        self.steps = getattr(self, "steps", 0) + 1
        if self.steps == 3:
            for g in self.param_groups:
                g["lr"] *= 1.5
        return super().step(closure)


def _off_by_lr(real):
    """A reference with lr 1.5 times off: what a wrong twin would say."""
    def wrong(*a, lr, **kw):
        return real(*a, lr=lr * 1.5, **kw)
    return wrong


@pytest.mark.parametrize("planted,kind,mdtype,phase,summary", [
    # stochastic_rounding not set: the plain flat path runs: the path check says so
    (lambda ps, h: momentum_cuda.SGD(ps, **h), "sr", None, None,
     "did not make exactly one stochastic-rounding kernel call over 3000 elements on backend "
     "cpu"),
    (lambda ps, h: momentum_cuda.SGD(ps, stochastic_rounding=True, sr_seed=1, **h), "sr", None,
     "check", "params differ"),  # other random bits
    (lambda ps, h: _LrJumpsAfterTwoSteps(ps, stochastic_rounding=True, sr_seed=0, **h), "sr",
     None, "after timing", "params differ"),
    (lambda ps, h: _DriftsAfterTwoSteps(ps, momentum_dtype=torch.int8, **h), "qmom",
     torch.int8, "after timing", "params differ"),
    (lambda ps, h: momentum_cuda.SGD(ps, momentum_dtype=torch.bfloat16, **h), "qmom",
     torch.int8, "check", "momentum_buffers differ"),  # bf16 buffers where int8 ones belong
], ids=["no-sr-path", "other-seed", "sr-drifts-after-the-check", "int8-drifts",
        "bf16-for-int8"])
def test_modes_catch_a_wrong_step(monkeypatch, tmp_path, capsys, planted, kind, mdtype, phase,
                                  summary):
    monkeypatch.setattr(bench, "TWIN_ELEMENTS", 1000)  # < 3000: 256 of each tensor checked
    monkeypatch.setattr(bench, "TWIN_TENSORS", 4)  # 4 of 8 (the 1st, 3rd, 6th, 8th)
    model = torch.bfloat16 if kind == "sr" else torch.float32
    _plant(monkeypatch, bench.Impl("mc-planted", "momentum_cuda (planted bug)", planted,
                                   ours=True, model=model, kind=kind, backend="cpu",
                                   momentum_dtype=mdtype), "modes_implementations")
    code = bench.main(MODES + ["--layouts", "few-large", "--impls", "mc-flat-cpu-fp32",
                               "mc-planted", "--formats", "json", "--out", str(tmp_path),
                               "--name", "run"])
    err = capsys.readouterr().err
    assert code == 1 and "mc-planted" in err and summary in err
    (case,) = json.loads((tmp_path / "run.json").read_text())["cases"]
    assert set(case["results"]) == {"mc-flat-cpu-fp32", "torch-fp32-forloop",
                                    "torch-bf16-forloop"}
    assert case["references"]["mc-planted"] == ("ref-sr" if kind == "sr" else "ref-mdtype-int8")
    if phase is None:  # it could not run as a stochastic-rounding step: an error, not timed
        assert summary in case["errors"]["mc-planted"]
    else:
        m = case["mismatches"]["mc-planted"]
        assert (m["phase"], m["steps"]) == (phase, 2 if phase == "check" else 3)
        if phase == "after timing":
            assert case["twin_check"] == {"tensors": 4, "of_tensors": 8, "elements": 256 * 4,
                                          "of": 3000, "per_parameter_max": 256}
            assert m["param"]["differing"] == 4


@pytest.mark.parametrize("which,name", [("sgd_sr_reference_step", "mc-sr-cpu"),
                                        ("sgd_momentum_dtype_reference_step",
                                         "mc-mdtype-cpu-int8")])
def test_modes_a_wrong_reference_is_a_mismatch(monkeypatch, tmp_path, capsys, which, name):
    """The contenders are compared with momentum_cuda.reference's steps: a reference that
    disagrees makes the run fail (exit 1), naming the contender."""
    monkeypatch.setattr(bench, which, _off_by_lr(getattr(bench, which)))
    code = bench.main(MODES + ["--layouts", "few-large", "--impls", name, "--formats", "json",
                               "--out", str(tmp_path), "--name", "run"])
    err = capsys.readouterr().err
    assert code == 1 and f"{name}: bitwise mismatch: check: " in err
    (case,) = json.loads((tmp_path / "run.json").read_text())["cases"]
    assert name not in case["results"] and case["mismatches"][name]["param"]["differing"] >= 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_modes_backend_that_cannot_run_here_is_named(tmp_path, capsys):
    code = bench.main(MODES + ["--layouts", "few-large", "--impls", "mc-sr-cuda",
                               "mc-mdtype-triton-int8", "--formats", "json", "--out",
                               str(tmp_path), "--name", "run"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "ASKED FOR BUT NOT AVAILABLE on cpu: mc-sr-cuda: backend='cuda' cannot run" in out
    assert "mc-mdtype-triton-int8: backend='triton' cannot run on device cpu" in out
    assert "NOT RUN: mc-sr-cuda was asked for but is not available on cpu" in err
    (case,) = json.loads((tmp_path / "run.json").read_text())["cases"]
    assert set(case["results"]) == {"torch-fp32-forloop", "torch-bf16-forloop"}
    assert case["twin_check"] is None  # no twin was needed
