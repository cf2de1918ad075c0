"""`momentum-cuda bench` (momentum_cuda/bench.py): layouts, argument handling, the result files'
schema, and that it refuses to time an implementation whose bits differ from torch's for-loop.
Nothing here is a speed claim: timings are the bench's output, never asserted by a test."""
import csv
import json
import struct

import pytest
import torch

import momentum_cuda
from momentum_cuda import bench

TINY = ["--quick", "--params", "3000", "--layouts", "few-large", "resnet50", "--rounds", "2",
        "--warmup", "1"]


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
    want = {"few-large": 8, "many-small": 2000, "resnet50": 161, "gpt2": 148}[layout]
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


def test_unknown_implementation_names_what_is_available(tmp_path):
    with pytest.raises(SystemExit, match=r"--impls mc-flat-tpu: not available here \(available: "
                                         r".*mc-flat-cpu"):
        bench.main(TINY + ["--impls", "mc-flat-tpu", "--no-files"])


def test_quick_defaults():
    args, device = bench.parse_args(["--quick"])
    assert (args.params, args.rounds, args.warmup, args.wait_idle, args.retries) == (
        [10**6], 5, 1, 0.0, 0)
    assert args.layouts == list(bench.LAYOUTS) and args.dtypes == ["float32", "bfloat16"]


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
    assert set(files) == {".json", ".csv", ".png"}
    png = files[".png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width >= 600 and height >= 400


def test_json_schema(run):
    doc = json.loads(run[1][".json"].read_text())
    assert doc["schema"] == "momentum-cuda-bench/1" and doc["error"] is None
    m = doc["machine"]
    for key in ("date", "device", "commit", "cpu", "torch", "triton", "backends", "momentum_cuda"):
        assert key in m, key
    assert m["device"] == "cpu" and m["torch"]["version"] == torch.__version__
    assert m["cpu"]["model"]
    assert len(doc["cases"]) == 4  # 2 layouts x 2 dtypes x 1 size
    for case in doc["cases"]:
        assert case["numel"] == 3000
        assert case["bandwidth_probe"]["gbps"] > 0
        res = case["results"]
        assert {"mc-flat-cpu", "mc-list-cpu", "torch-forloop", "torch-foreach"} <= set(res)
        for r in res.values():
            assert r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
            assert len(r["times_ms"]) == 2 and r["gbps"] > 0
        # momentum_cuda was checked bitwise (it would have failed the run otherwise)
        assert case["bitwise_vs_forloop"]["mc-flat-cpu"] is True
        assert case["bitwise_vs_forloop"]["mc-list-cpu"] is True


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


# ---- correctness before timing -------------------------------------------------------------
def test_bench_fails_loudly_when_bits_differ(monkeypatch, tmp_path, capsys):
    """A momentum_cuda implementation with lr 2^-20 off (a few fp32 ulps) must stop the run,
    exit 1."""
    real = bench.implementations

    def with_a_wrong_one(device):
        impls, missing = real(device)
        impls.append(bench.Impl("mc-wrong", "momentum_cuda (planted bug: lr off by 2^-20)",
                                lambda ps, h: momentum_cuda.SGD(
                                    ps, **{**h, "lr": h["lr"] * (1 + 2**-20)}),
                                ours=True, flat=True))
        return impls, missing

    monkeypatch.setattr(bench, "implementations", with_a_wrong_one)
    code = bench.main(TINY + ["--dtypes", "float32", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1
    assert "FAILED: momentum_cuda (planted bug: lr off by 2^-20) is NOT bitwise equal to torch " \
           "for-loop" in err
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert "NOT bitwise equal" in doc["error"] and doc["cases"] == []


def test_bench_fails_when_flat_is_not_one_call(monkeypatch, tmp_path, capsys):
    """A 'flat' implementation that takes the per-tensor path is caught by the call check."""
    real = bench.implementations

    def mislabelled(device):
        impls, missing = real(device)
        impls.append(bench.Impl("mc-fake-flat", "momentum_cuda fake flat",
                                lambda ps, h: momentum_cuda.SGD(ps, flat=False, **h),
                                ours=True, flat=True))
        return impls, missing

    monkeypatch.setattr(bench, "implementations", mislabelled)
    assert bench.main(TINY + ["--dtypes", "float32", "--no-files"]) == 1
    assert "did not make exactly one flat kernel call" in capsys.readouterr().err
