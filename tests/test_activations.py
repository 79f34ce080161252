"""The activation registry: names, parameters, and registration with transformers."""

from __future__ import annotations

import copy as copy_module
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

from relufy.activations import Activation, make_activation, module_class, parse_activation
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


def test_import_relufy_is_light_and_register_activations_teaches_transformers():
    script = textwrap.dedent("""
        import sys
        import relufy
        assert "torch" not in sys.modules and "transformers" not in sys.modules
        relufy.register_activations()
        relufy.register_activations()  # idempotent
        from transformers.activations import ACT2FN, get_activation
        assert "fatrelu_0.3" in ACT2FN
        assert ACT2FN["fatrelu_0.3"].threshold == 0.3
        assert get_activation("shifted_relu_0.1").shift == 0.1
        assert "silu" in ACT2FN and "nonsense_1" not in ACT2FN
    """)
    subprocess.run([sys.executable, "-c", script], check=True)


def test_transformers_knows_nothing_of_relufy_until_asked():
    script = textwrap.dedent("""
        import relufy
        from transformers.activations import ACT2FN
        assert "fatrelu_0.3" not in ACT2FN and type(ACT2FN).__name__ == "ClassInstantier"
    """)
    subprocess.run([sys.executable, "-c", script], check=True)


def _hook(module, args, output):
    return None


def test_modules_survive_pickling_with_their_parameter_and_hooks():
    fatrelu = make_activation("fatrelu", threshold=0.25).module()
    fatrelu.register_forward_hook(_hook)
    for copy in (pickle.loads(pickle.dumps(fatrelu)), copy_module.deepcopy(fatrelu)):
        assert type(copy) is module_class("fatrelu") and copy.threshold == 0.25 and len(copy._forward_hooks) == 1
    shifted = pickle.loads(pickle.dumps(make_activation("shifted_relu", shift=0.5).module()))
    assert type(shifted) is module_class("shifted_relu") and shifted.shift == 0.5
