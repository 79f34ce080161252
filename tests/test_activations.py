"""The activation registry: names, parameters, and registration with transformers."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from relufy.activations import Activation, make_activation, parse_activation
from relufy.errors import ActivationError


@pytest.mark.parametrize("value,expected", [
    ("relu", Activation("relu")), ("relu2", Activation("relu2")),
    ("fatrelu_0.01", Activation("fatrelu", 0.01)), ("shifted_relu_0.25", Activation("shifted_relu", 0.25)),
    ("silu", None), ("gelu_pytorch_tanh", None), ("fatrelu_abc", None), ("", None),
])
def test_config_values_parse_to_relu_family_or_none(value, expected):
    assert parse_activation(value) == expected


def test_config_value_round_trips():
    for activation in (make_activation("fatrelu", threshold=0.015), make_activation("shifted_relu", shift=1e-3)):
        assert parse_activation(activation.config_value) == activation


@pytest.mark.parametrize("name,kwargs", [("gelu", {}), ("fatrelu", {"threshold": -1.0}),
                                         ("fatrelu", {"threshold": float("inf")}), ("relu", {"shift": 0.1})])
def test_bad_activations_are_refused(name, kwargs):
    with pytest.raises(ActivationError):
        make_activation(name, **kwargs)


def test_modules_compute_their_formulas():
    x = torch.tensor([-1.0, 0.0, 0.005, 0.01, 0.5])
    torch.testing.assert_close(make_activation("fatrelu", threshold=0.01).module()(x),
                               torch.tensor([0.0, 0.0, 0.0, 0.01, 0.5]))
    torch.testing.assert_close(make_activation("shifted_relu", shift=0.1).module()(x),
                               torch.tensor([0.0, 0.0, 0.0, 0.0, 0.4]))
    torch.testing.assert_close(make_activation("relu2").module()(x), x.clamp_min(0) ** 2)


def test_import_relufy_is_light_and_registers_once_transformers_loads():
    script = textwrap.dedent("""
        import sys
        import relufy
        assert "torch" not in sys.modules and "transformers" not in sys.modules
        from transformers.activations import ACT2FN, get_activation
        assert "fatrelu_0.3" in ACT2FN
        assert ACT2FN["fatrelu_0.3"].threshold == 0.3
        assert get_activation("shifted_relu_0.1").shift == 0.1
        assert "silu" in ACT2FN and "nonsense_1" not in ACT2FN
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
