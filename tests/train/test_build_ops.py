"""`python -m vla_scale.train.build_ops`: the ops `make install` compiles ahead of training."""

import pytest
from deepspeed.ops import op_builder

from vla_scale.train import build_ops


def test_cpu_adam_builds_and_loads():
    assert build_ops.build("cpu_adam") is None  # cached after `make install`; compiled here otherwise
    assert hasattr(op_builder.CPUAdamBuilder().load(verbose=False), "create_adam")


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
