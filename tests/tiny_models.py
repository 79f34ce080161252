"""Tiny random-init models, one per architecture in convert/architectures.yaml, built from configs."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 384  # a byte-level BPE trained on data/sample.txt (see tiny_tokenizer)
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

CONFIGS: dict[str, dict] = {
    "llama": dict(_COMMON, hidden_act="silu"),
    "mistral": dict(_COMMON, hidden_act="silu"),
    "qwen2": dict(_COMMON, hidden_act="silu"),
    "qwen3": dict(_COMMON, hidden_act="silu", head_dim=8),
    "olmo2": dict(_COMMON, hidden_act="silu"),
    "granite": dict(_COMMON, hidden_act="silu"),
    "gemma": dict(_COMMON, hidden_act="gelu_pytorch_tanh", head_dim=8),
    "gemma2": dict(_COMMON, hidden_activation="gelu_pytorch_tanh", head_dim=8),
    "gemma3_text": dict(_COMMON, hidden_activation="gelu_pytorch_tanh", head_dim=8),
    "phi3": dict(_COMMON, hidden_act="silu", pad_token_id=0),
    "gpt_neox": dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, hidden_act="gelu", max_position_embeddings=64),
    "gpt2": dict(vocab_size=VOCAB, n_embd=32, n_inner=64, n_layer=2, n_head=4, n_positions=64,
                 activation_function="gelu_new"),
    "falcon": dict(vocab_size=VOCAB, hidden_size=32, ffn_hidden_size=64, num_hidden_layers=2,
                   num_attention_heads=4, activation="gelu", new_decoder_architecture=False),
}


def build_tiny_model(model_type: str, seed: int = 0, **overrides):
    """A random-init causal LM of `model_type` (eval mode, float32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    settings = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None, **CONFIGS[model_type], **overrides}
    config = AutoConfig.for_model(model_type, **settings)
    return AutoModelForCausalLM.from_config(config).eval()


def save_tiny_model(model_type: str, directory: Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny model (safetensors, no tokenizer) and return its directory."""
    build_tiny_model(model_type, seed, **overrides).save_pretrained(directory)
    return directory


def tiny_tokenizer(text_file: Path):
    """A byte-level BPE tokenizer with VOCAB entries, trained in about a second on `text_file`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train([str(text_file)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def save_tiny_checkpoint(model_type: str, directory: Path, text_file: Path, seed: int = 0, **overrides) -> Path:
    """A complete tiny checkpoint: model (safetensors), tokenizer and generation config."""
    save_tiny_model(model_type, directory, seed, **overrides)
    tiny_tokenizer(text_file).save_pretrained(directory)
    return directory


def save_tiny_gguf(path: Path, text_file: Path, seed: int = 0) -> Path:
    """The tiny SiLU Llama and its tokenizer as a float32 GGUF file (llama.cpp's tensor names and metadata,
    written with the `gguf` package), for tests that need a GGUF source without the 100 MB default model."""
    import gguf

    model = build_tiny_model("llama", seed)
    config, tokenizer = model.config, tiny_tokenizer(text_file)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_embedding_length(config.hidden_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_tokenizer_model("gpt2")
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([gguf.TokenType.NORMAL] * len(vocab))
    writer.add_token_merges(_merges(tokenizer))
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        base, _, suffix = name.rpartition(".")
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _merges(tokenizer) -> list[str]:
    import json

    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    return [" ".join(m) if isinstance(m, list) else m for m in merges]


def manual_x1(model, input_ids):
    """x1 of every layer, recomputed by hand from each FFN's input."""
    from relufy.architectures import architecture_for, ffn_modules

    arch = architecture_for(model.config.model_type)
    inputs = []
    handles = [ffn.register_forward_hook(lambda m, args, out: inputs.append(args[0])) for ffn in ffn_modules(model)]
    with torch.no_grad():
        model(input_ids=input_ids)
        for handle in handles:
            handle.remove()
        x1s = []
        for ffn, x in zip(ffn_modules(model), inputs):
            act = getattr(ffn, "act_fn", None) or getattr(ffn, "act", None) or getattr(ffn, "activation_fn")
            if arch.gate_up:
                gate, up = getattr(ffn, arch.gate_up)(x).chunk(2, dim=-1)
                x1s.append(act(gate) * up)
            elif arch.gated:
                x1s.append(act(getattr(ffn, arch.gate)(x)) * getattr(ffn, arch.up)(x))
            else:
                x1s.append(act(getattr(ffn, arch.up)(x)))
    return x1s


def relu_model(seed=0):
    """A tiny ReLU Llama in training mode (no tokenizer): for tests of the loss, the trainer and the threshold."""
    return build_tiny_model("llama", seed=seed, hidden_act="relu").train()


def batch(seed=0, size=(2, 16)):
    """Seeded random token ids as a causal-LM batch (labels = inputs) for the tiny models' vocabulary."""
    ids = torch.randint(0, VOCAB, size, generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}


def assert_grads_close(actual: dict, expected: dict, *, terms: int = VOCAB) -> None:
    """Every gradient in `actual` equals `expected`'s up to float32 summation order, tensor by tensor.

    Two correct computations of a gradient (eager against compiled, fused against unfused) sum the same
    float32 terms in another order: the difference of a sum of n terms is bounded by about n * eps times
    the terms' size, whatever the size of the result. So the tolerance is absolute, n * eps * max|grad|
    of each tensor, with n the longest reduction of the backward (for the tiny models, the LM head's, over
    the vocabulary): an element near zero that is the difference of large terms is judged against the
    tensor's scale, not against itself, and a tensor of tiny gradients is not waved through by a fixed atol.
    """
    assert actual.keys() == expected.keys()
    eps = torch.finfo(torch.float32).eps
    for name, grad in expected.items():
        scale = grad.abs().max().item()
        assert scale > 0, name  # a zero gradient would make the comparison empty
        torch.testing.assert_close(actual[name], grad, rtol=0, atol=terms * eps * scale,
                                   msg=lambda text, name=name: f"{name}: {text}")
