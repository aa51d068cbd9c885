"""The `fastticket` command: help, one-line errors for bad input, and a tiny search + report end to end."""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from fastticket.app import cli
from fastticket.lottery.presets import get_preset

ONE_THREAD_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
TINY = ["--levels", "1", "--iterations", "20", "--eval-every", "10", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_main(argv, capsys):
    """(exit code, stdout, stderr) of cli.main, whether it returns or exits through argparse."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *fragments):
    assert code not in (0, None), err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("argv, expected", [
    (["--help"], ["search", "report", "bench"]),
    (["search", "--help"], ["--preset", "--rewind-iter", "--granularity", "--resume", "examples:", "runs/<preset>"]),
    (["report", "--help"], ["RUN_DIR", "examples:", "--out"]),
    (["bench", "--help"], ["--suite", "--quick", "--dtype"]),
])
def test_help(argv, expected, capsys):
    code, out, err = run_main(argv, capsys)
    assert code == 0
    for text in expected:
        assert text in out


def test_no_command_prints_help(capsys):
    code, out, _ = run_main([], capsys)
    assert code == 2 and "search" in out


@pytest.mark.parametrize("argv, fragments", [
    (["search", "--rate", "1.5"], ["(0, 1)"]),
    (["search", "--rate", "0"], ["(0, 1)"]),
    (["search", "--rate", "abc"], ["not a number"]),
    (["search", "--preset", "nope"], ["unknown preset", "lenet-mnist5k"]),
    (["search", "--model", "resnet9000"], ["unknown model"]),
    (["search", "--dataset", "imagenet"], ["unknown dataset"]),
    (["search", "--granularity", "block:4"], ["granularity"]),
    (["search", "--granularity", "tiles"], ["granularity"]),
    (["search", "--levels", "-1"], [">= 0"]),
    (["search", "--iterations", "0"], ["positive"]),
    (["search", "--controls", "reinit,shuffle"], ["unknown control"]),
    (["search", "--rewind-iter", "5000"], ["rewind_iter"]),
    (["search", "--optimizer", "sgd"], ["unrecognized arguments"]),
])
def test_bad_search_input_is_one_line(argv, fragments, capsys, tmp_path):
    code, _, err = run_main(argv + ["--out", str(tmp_path / "run"), "--no-progress"], capsys)
    assert_one_line_error(code, err, *fragments)
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu(capsys, tmp_path):
    code, _, err = run_main(["search", "--device", "cuda", "--out", str(tmp_path / "r")], capsys)
    assert_one_line_error(code, err, "no CUDA GPU", "--device cpu")


def test_nonempty_out_without_resume(capsys, tmp_path):
    (tmp_path / "something.txt").write_text("mine")
    code, _, err = run_main(["search", "--out", str(tmp_path)] + TINY, capsys)
    assert_one_line_error(code, err, "not empty", "--resume", "another --out")
    assert os.listdir(tmp_path) == ["something.txt"]


def test_resume_with_a_different_config(capsys, tmp_path):
    saved = get_preset("lenet-mnist5k").replace(levels=1, iterations=20, eval_every=10, lr=0.5)
    (tmp_path / "config.json").write_text(saved.to_json())
    code, _, err = run_main(["search", "--out", str(tmp_path), "--resume"] + TINY, capsys)
    assert_one_line_error(code, err, "differs", "lr")


def test_missing_data_offline(capsys, tmp_path, monkeypatch):
    import fastticket.lottery.data

    def offline(name, root):
        raise OSError("network is unreachable")
    monkeypatch.setattr(fastticket.lottery.data, "_download", offline)
    code, _, err = run_main(["search", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"),
                             "--out", str(tmp_path / "run")] + TINY, capsys)
    assert_one_line_error(code, err, "--data-dir")
    assert not os.path.exists(tmp_path / "run")  # a corrected command can reuse the same --out


def test_foreign_mask_on_resume(capsys, tmp_path):
    config = get_preset("lenet-mnist5k").replace(levels=1, iterations=20, eval_every=10)
    (tmp_path / "config.json").write_text(config.to_json())
    level0 = tmp_path / "levels" / "level_00" / "ticket_trial0"
    level0.mkdir(parents=True)
    torch.save({"fc.0": torch.ones(300, 5, dtype=torch.bool), "fc.1": torch.ones(100, 300, dtype=torch.bool),
                "output": torch.ones(10, 100, dtype=torch.bool)}, level0 / "mask.pt")
    # A mask.pt fastticket did not write fails verification: recomputed, with one line naming it.
    code, _, err = run_main(["search", "--out", str(tmp_path), "--resume"] + TINY, capsys)
    assert code == 0 and "Traceback" not in err
    assert "mask.pt failed verification" in err and "recomputing it" in err


def test_report_of_missing_dir(capsys, tmp_path):
    code, _, err = run_main(["report", str(tmp_path / "nothing")], capsys)
    assert_one_line_error(code, err, "no run directory")


def test_rate_scales_the_preset_ratios():
    parser = cli.build_parser()
    config = cli.config_from_args(parser.parse_args(["search", "--rate", "0.4"]))
    assert (config.rate, config.output_rate, config.conv_rate) == (0.4, 0.2, None)
    config = cli.config_from_args(parser.parse_args(["search", "--preset", "conv2-cifar10", "--rate", "0.3"]))
    assert (config.rate, config.conv_rate, config.output_rate) == (0.3, 0.15, 0.15)
    config = cli.config_from_args(parser.parse_args(["search", "--controls", "none", "--trials", "2"]))
    assert config.controls == () and config.trials == 2
    assert cli.config_from_args(parser.parse_args(["search"])) == get_preset("lenet-mnist5k")


def test_every_config_field_is_a_flag_or_listed_as_not_one():
    import dataclasses

    from fastticket.lottery.config import SearchConfig
    from fastticket.lottery.presets import DEFAULT_PRESET, get_preset
    fields = {f.name for f in dataclasses.fields(SearchConfig)}
    from fastticket.app import cli_flags
    assert set(cli_flags.SEARCH_FLAGS) | cli_flags.NOT_FLAGS == fields
    assert not set(cli_flags.SEARCH_FLAGS) & cli_flags.NOT_FLAGS
    search = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "search")[1]
    by_dest = {a.dest: a for a in search._actions}
    for name in cli_flags.SEARCH_FLAGS:
        # Reachable: the flag exists, parses into the field, and shows the field's own help and the default
        # preset's value (--data is the short spelling of --dataset).
        assert by_dest[name].option_strings == [cli_flags.flag_name(name)] + (["--data"] if name == "dataset" else [])
        default = getattr(get_preset(DEFAULT_PRESET), name)
        assert by_dest[name].help == SearchConfig.__dataclass_fields__[name].metadata["help"] + \
            f" (default: {default})"
    # A field with neither a flag nor a NOT_FLAGS entry stops the parser from being built.
    original = cli_flags.NOT_FLAGS
    try:
        cli_flags.NOT_FLAGS = original - {"criterion"}
        with pytest.raises(RuntimeError, match="criterion"):
            cli.build_parser()
    finally:
        cli_flags.NOT_FLAGS = original


def test_flags_override_the_preset_fields(capsys):
    parser = cli.build_parser()
    argv = ["search", "--model", "conv2", "--dataset", "cifar10", "--data-dir", "/d", "--levels", "3",
            "--iterations", "50", "--batch-size", "8", "--lr", "0.5", "--eval-every", "5", "--rewind-iter", "2",
            "--controls", "random,reinit", "--trials", "2", "--granularity", "block:2x4", "--device", "cpu",
            "--seed", "7"]
    config = cli.config_from_args(parser.parse_args(argv))
    assert (config.model, config.dataset, config.data_dir, config.levels, config.iterations, config.batch_size,
            config.lr, config.eval_every, config.rewind_iter, config.controls, config.trials, config.granularity,
            config.device, config.seed) == ("conv2", "cifar10", "/d", 3, 50, 8, 0.5, 5, 2, ("random", "reinit"), 2,
                                             "block:2x4", "cpu", 7)
    assert config.compile is False  # an absent switch keeps the preset's value
    assert cli.config_from_args(parser.parse_args(["search", "--compile"])).compile is True


def test_search_then_report_end_to_end(tmp_path):
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "fastticket", "search", "--levels", "1", "--iterations", "20", "--eval-every",
           "10", "--controls", "reinit", "--out", out]
    done = subprocess.run(cmd, capture_output=True, text=True, env=ONE_THREAD_ENV, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "ticket acc@stop" in done.stdout and f"run directory: {out}" in done.stdout
    results = sorted(glob.glob(os.path.join(out, "levels", "*", "*", "result.json")))
    assert [os.path.relpath(p, out) for p in results] == [
        os.path.join("levels", "level_00", "ticket_trial0", "result.json"),
        os.path.join("levels", "level_01", "reinit_trial0", "result.json"),
        os.path.join("levels", "level_01", "ticket_trial0", "result.json")]
    for p in results:
        with open(p) as f:
            assert json.load(f)["status"] == "ok"
    pngs = glob.glob(os.path.join(out, "report", "*.png"))
    assert len(pngs) >= 2 and all(os.path.getsize(p) > 1000 for p in pngs)

    shutil.rmtree(os.path.join(out, "report"))
    exe = shutil.which("fastticket")
    report_cmd = [exe, "report", out] if exe else [sys.executable, "-m", "fastticket", "report", out]
    done = subprocess.run(report_cmd, capture_output=True, text=True, env=ONE_THREAD_ENV, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "reinit acc@stop" in done.stdout and ".png" in done.stdout
    assert len(glob.glob(os.path.join(out, "report", "*.png"))) >= 2


@pytest.mark.parametrize("flags, both", [
    (["--early-bird", "0.1", "--rewind", "none"], ("early_bird", "rewind is none")),
    (["--early-bird", "0.1", "--levels", "0"], ("early_bird", "levels is 0")),
])
def test_contradictory_flags_are_one_line_naming_both(flags, both, tmp_path, capsys):
    from fastticket.app import cli
    try:
        code = cli.main(["search", "--out", str(tmp_path / "run"), "--iterations", "20", "--no-progress", *flags])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code not in (0, None) and len(err.strip().splitlines()) == 1 and all(b in err for b in both), err
    assert not (tmp_path / "run").exists()
