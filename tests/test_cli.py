"""The command line (prunekit.cli), python -m prunekit, and the demo."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HERE = Path(__file__).resolve().parent


def make_model() -> nn.Module:
    """The factory the summary tests import by name."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def make_not_a_model():
    return [1, 2, 3]


def make_broken_model():
    raise RuntimeError("this factory is broken\nsecond line")


@pytest.fixture
def factory_prefix(monkeypatch) -> str:
    """``MODULE`` that names this test module, importable whichever way pytest imported it."""
    monkeypatch.syspath_prepend(str(HERE.parent))  # for "tests.test_cli"
    monkeypatch.syspath_prepend(str(HERE))  # for "test_cli"
    assert sys.modules.get(__name__) is not None
    return __name__


def _one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("prunekit: error: ")
    return lines[0]


# ----------------------------------------------------------------------------- --version, no command


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"prunekit {pk.__version__}"


def test_python_dash_m_version():
    done = subprocess.run(
        [sys.executable, "-m", "prunekit", "--version"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"prunekit {pk.__version__}"


def test_console_script_version():
    script = Path(sys.executable).with_name("prunekit")
    if not script.exists():
        pytest.skip("the prunekit console script is not installed next to this Python")
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"prunekit {pk.__version__}"


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "summary" in out


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "choose a command" in _one_line_error(capsys.readouterr().err)


def test_unknown_command_is_a_usage_error(capsys):
    assert main(["frobnicate"]) == 2
    assert "frobnicate" in _one_line_error(capsys.readouterr().err)


# ----------------------------------------------------------------------------- summary


def test_summary_of_a_factory(capsys, factory_prefix):
    assert main(["summary", f"{factory_prefix}:make_model"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Sequential from ")
    lines = out.strip().splitlines()
    total = [line for line in lines if line.startswith("total")]
    assert len(total) == 1
    params = sum(p.numel() for p in make_model().parameters())
    assert f"{params:,}" in total[0]
    assert any(line.startswith("0 ") and "Conv2d" in line for line in lines)
    assert " - " in out  # conv MACs are unknown without an input shape


def test_summary_with_input_shape_counts_conv_macs(capsys, factory_prefix):
    assert main(["summary", f"{factory_prefix}:make_model", "--input-shape", "2,3,8,8"]) == 0
    out = capsys.readouterr().out
    assert "input shape (2, 3, 8, 8)" in out
    expected = pk.summary(make_model(), example_inputs=torch.randn(2, 3, 8, 8))
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert f"{expected.macs:,}" in total
    conv_row = next(line for line in out.splitlines() if line.startswith("0 "))
    assert f"{expected.layers[0].macs:,}" in conv_row


def test_summary_imports_from_the_current_directory(tmp_path, monkeypatch, capsys):
    name = "pk_cli_test_factory_module"
    (tmp_path / f"{name}.py").write_text(
        "from torch import nn\n\ndef build():\n    return nn.Linear(8, 3)\n", encoding="utf-8"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, name, raising=False)
    try:
        assert main(["summary", f"{name}:build", "--input-shape", "4,8"]) == 0
    finally:
        sys.modules.pop(name, None)
    out = capsys.readouterr().out
    assert out.startswith("Linear from ")
    assert "27" in next(line for line in out.splitlines() if line.startswith("total"))
    assert str(tmp_path) not in sys.path


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon_here", "expected MODULE:FACTORY"),
        (":make_model", "expected MODULE:FACTORY"),
        ("prunekit_no_such_module_xyz:make", "cannot import 'prunekit_no_such_module_xyz'"),
        ("prunekit_no_such_package_xyz.models:make", "no module named 'prunekit_no_such_package_xyz'"),
        ("{prefix}:no_such_factory", "has no attribute 'no_such_factory'"),
        ("{prefix}:make_not_a_model", "returned a list, not a torch.nn.Module"),
        ("{prefix}:make_broken_model", "RuntimeError: this factory is broken"),
        ("{prefix}:PNG_SIGNATURE", "is a bytes, not a callable"),
    ],
)
def test_summary_bad_factory_is_a_one_line_error(spec, message, capsys, factory_prefix):
    assert main(["summary", spec.format(prefix=factory_prefix)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in _one_line_error(captured.err)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ("1,3,x,8", "comma-separated whole numbers"),
        ("1,0,8,8", "must be positive"),
        ("1,5,8,8", "running the model on an input of shape (1, 5, 8, 8) failed"),
    ],
)
def test_summary_bad_input_shape_is_a_one_line_error(shape, message, capsys, factory_prefix):
    assert main(["summary", f"{factory_prefix}:make_model", "--input-shape", shape]) == 2
    assert message in _one_line_error(capsys.readouterr().err)


# ----------------------------------------------------------------------------- demo


def test_demo_bad_sparsity_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "d.png"
    assert main(["demo", "--sparsity", "90", "--out", str(out), "--quiet"]) == 2
    assert "sparsity must be a fraction in (0, 1)" in _one_line_error(capsys.readouterr().err)
    assert not out.exists()


def test_demo_bad_plot_format_fails_before_training(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d.docx"), "--quiet"]) == 2
    assert "cannot save a plot as '.docx'" in _one_line_error(capsys.readouterr().err)


def test_demo_without_the_extras_says_how_to_install_them(tmp_path, capsys, monkeypatch):
    for name in ("sklearn", "sklearn.datasets", "sklearn.model_selection"):
        monkeypatch.setitem(sys.modules, name, None)  # makes importing them fail, even if already imported
    assert main(["demo", "--out", str(tmp_path / "d.png"), "--quiet"]) == 2
    assert 'pip install "prunekit[demo]"' in _one_line_error(capsys.readouterr().err)


def test_run_demo_short(tmp_path, capsys):
    from prunekit.demo import run_demo

    out = tmp_path / "plots" / "short.png"
    result = run_demo(sparsity=0.8, steps=200, out=out, seed=1, quiet=True)
    assert capsys.readouterr().out == ""
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    assert result["plot"] == str(out)
    assert result["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert 0.0 <= result["pruned_accuracy"] <= 1.0 and 0.0 <= result["dense_accuracy"] <= 1.0
    assert result["dense_latency_ms"] > 0 and result["fast_latency_ms"] > 0
    # the compressed file of the 80%-pruned model is several times smaller than the dense state dict
    assert result["pruned_file_bytes"] * 3 < result["dense_file_bytes"]
    assert all(kernel in ("csr", "csr-linear", "bsr", "dense") for kernel in result["fast_kernels"].split(", "))
    curve = result["gradual_curve"]
    assert [p["step"] for p in curve] == sorted(p["step"] for p in curve)
    assert curve[0]["sparsity"] == 0.0 and curve[-1]["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert all(0.0 <= p["recovered_accuracy"] <= 1.0 for p in curve)
    assert [p["sparsity"] for p in result["oneshot_curve"]] == pytest.approx(
        [0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95], abs=1e-3
    )
    assert result["pruned_summary"].sparsity > 0.75


def test_run_demo_leaves_the_global_rng_alone(tmp_path):
    from prunekit.demo import run_demo

    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    run_demo(steps=100, out=tmp_path / "d.png", quiet=True)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "d.png"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    assert out.stat().st_size > 1000
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    printed = capsys.readouterr().out
    match = re.fullmatch(
        r"dense accuracy ([\d.]+)%, pruned accuracy ([\d.]+)% at sparsity ([\d.]+)%; plot written to (.+)",
        printed.strip(),
    )
    assert match, printed
    dense, pruned, sparsity = (float(match.group(i)) for i in (1, 2, 3))
    assert match.group(4) == str(out)
    assert dense > 90
    assert pruned >= dense - 3
    assert sparsity == pytest.approx(90.0, abs=0.1)


@pytest.mark.slow
def test_demo_prints_summaries_and_accuracies(tmp_path, capsys):
    from prunekit.demo import run_demo

    result = run_demo(out=tmp_path / "d.png", seed=3)
    printed = capsys.readouterr().out
    assert printed.count("\ntotal ") == 2  # the dense and the pruned summary tables
    assert f"test accuracy {result['dense_accuracy']:.1%}" in printed
    assert f"test accuracy {result['pruned_accuracy']:.1%}" in printed
    assert result["pruned_accuracy"] >= result["dense_accuracy"] - 0.03
    assert result["sparsity"] == pytest.approx(0.9, abs=1e-3)


def test_run_demo_restores_the_thread_count(tmp_path):
    from prunekit.demo import run_demo

    before = torch.get_num_threads()
    run_demo(steps=100, out=tmp_path / "d.png", quiet=True)
    assert torch.get_num_threads() == before
