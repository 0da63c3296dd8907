"""`python -m vla_scale.train.build_ops`: the ops `make install` compiles ahead of training."""

import sys

import pytest
from deepspeed.ops import op_builder

from vla_scale.train import build_ops


def test_cpu_adam_builds_and_loads(monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    folder = build_ops.use_environment_extensions_dir()  # as `make install` and training do
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(folder))  # (so that the variable is removed after the test)
    assert build_ops.build("cpu_adam") is None  # cached after `make install`; compiled here otherwise
    assert hasattr(op_builder.CPUAdamBuilder().load(verbose=False), "create_adam")
    assert list((folder / "cpu_adam").glob("cpu_adam*.so"))  # in this environment's folder, not a shared one


def test_each_python_environment_has_its_own_extensions_folder(monkeypatch, tmp_path):
    """Two environments with the same Python (two checkouts) must not rebuild each other's ops."""
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    here = build_ops.extensions_dir()
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "other-venv"))
    assert build_ops.extensions_dir() != here
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    assert build_ops.extensions_dir() == tmp_path / "mine"  # an explicit choice wins


def test_a_build_failure_is_a_warning_not_a_failed_install(monkeypatch, capsys):
    def no_compiler(self, verbose=True):  # noqa: ANN001, ANN202
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(op_builder.CPUAdamBuilder, "load", no_compiler)
    assert build_ops.main([]) == 0
    err = capsys.readouterr().err
    assert "DeepSpeed op cpu_adam not built" in err and "no C++ compiler found" in err


def test_unknown_op_is_refused_naming_the_known_ones(capsys):
    with pytest.raises(SystemExit) as exc:
        build_ops.main(["fused_lamb"])
    assert exc.value.code == 2 and "known: ['cpu_adam']" in capsys.readouterr().err
