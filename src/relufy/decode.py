"""relufy's decode loop: greedy decode with a static KV cache, one step captured as a CUDA graph.

HF `generate` spends more host time per token than a sparse FFN saves, so its number hides the FFN
savings. Like gpt-fast, relufy decodes in its own loop, in gpt-fast's shape: `prefill` runs the
prompt eagerly, `decode_one_token` is one step (forward, greedy argmax, next token and position
written back on the device) and `decode_n_tokens` captures that step as a CUDA graph and replays it
once per new token, timed (`step_runner` is that captured step, also what `step_profile.py`
profiles). `speed.py` measures with it; nothing here knows about sparse FFNs.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import DataError
from .timing import Timer, capture

# cuDNN attention, PyTorch's first choice for masked bf16 attention on Hopper, gave different tokens
# from one run of the same decode to the next on an H200 (eagerly too); with the other backends
# repeated runs are bit-identical, which the dense/sparse token comparison needs.
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def cache_kwarg(model) -> str:
    """The forward's name for the KV cache: `cache` since transformers 5.24 (`past_key_values` before,
    kept there as a deprecated alias)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class DecodeLoop:
    """Greedy decode of `batch_size` prompts with every tensor the step touches allocated once.

    The step reads the next input token, its position and a 4D attention mask computed on the device
    from that position, and writes the argmax back into the input buffer and into `tokens` at a
    device-side step counter: nothing in it depends on host values, so a CUDA graph of one step is
    the whole decode. A 4D mask is returned as-is by transformers' mask builder, which skips its
    data-dependent Python paths. The cache's own write index (`cumulative_length`) is a device tensor
    in transformers >= 5.17 and advances in step with `position`.
    """

    def __init__(self, model, batch_size: int, prompt_tokens: int, new_tokens: int, compile: bool = False,
                 compile_mode: str = "default"):
        from transformers import StaticCache

        self.model, self.new_tokens = model, new_tokens
        self.device = next(model.parameters()).device
        length = prompt_tokens + new_tokens
        self.cache = StaticCache(config=model.config, max_cache_len=length)
        short = [layer.max_cache_len for layer in self.cache.layers if layer.max_cache_len < length]
        if short:
            raise DataError(f"the model's sliding-window layers keep {min(short)} tokens, fewer than prompt + new "
                            f"tokens ({length}); lower --prompt-tokens/--new-tokens")
        self.kwargs = {cache_kwarg(model): self.cache, "use_cache": True}
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            self.kwargs["logits_to_keep"] = 1
        self.mask_values = _mask_values(model, self.device)
        make = functools.partial(torch.zeros, dtype=torch.long, device=self.device)
        self.token, self.position = make(batch_size, 1), make(batch_size, 1)
        self.step_index, self.tokens = make(1), make(batch_size, new_tokens + 1)
        self.key_positions = torch.arange(length, device=self.device).view(1, 1, 1, length)
        # compiled without Inductor's own CUDA graphs (`options.CompileMode`): the captured step is the only graph
        compiled = compile and self.device.type == "cuda"
        self.compile_options = {"dynamic": False, "mode": compile_mode} if compiled else None
        self.decode_logits = torch.compile(self.logits, **self.compile_options) if compiled else self.logits

    def logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, **self.kwargs)
        return out.logits[:, -1]

    def prefill(self, prompt: torch.Tensor) -> None:
        """Empty the cache, run the prompt eagerly, and set the buffers for the first decode step."""
        self.cache.reset()
        batch, length = prompt.shape
        positions = torch.arange(length, device=self.device).expand(batch, length)
        with sdpa_kernel(ATTENTION_BACKENDS):
            first = self.logits(prompt, positions, None).argmax(-1)
        self.token.copy_(first[:, None])
        self.tokens.zero_()
        self.tokens[:, 0] = first
        self.position.fill_(length)
        self.step_index.fill_(1)

    def decode_one_token(self, eager: bool = False) -> None:
        """One greedy decode step, entirely on the device; `eager` bypasses torch.compile, so module hooks
        registered after the compilation run (Dynamo does not guard on hooks and would reuse the graph)."""
        mask = self.key_positions <= self.position.view(-1, 1, 1, 1)
        if self.mask_values is not None:  # eager attention adds the mask: 0 where allowed, dtype min elsewhere
            mask = torch.where(mask, *self.mask_values)
        logits = self.logits if eager else self.decode_logits
        with sdpa_kernel(ATTENTION_BACKENDS):
            next_token = logits(self.token, self.position, mask).argmax(-1)
        self.token.copy_(next_token[:, None])
        self.tokens.index_copy_(1, self.step_index, next_token[:, None])
        self.position.add_(1)
        self.step_index.add_(1)

    def step_runner(self, prompt: torch.Tensor, warmup: int = 3):
        """The decode step ready to run `new_tokens` times from `prompt`: on CUDA the replay of its graph,
        elsewhere the eager step. The warm-up steps of a capture advanced the cache, so the prompt is
        prefilled again after it."""
        self.prefill(prompt)
        if self.device.type != "cuda":
            return self.decode_one_token
        graph = capture(self.decode_one_token, warmup)
        self.prefill(prompt)
        return graph.replay

    def decode_n_tokens(self, prompt: torch.Tensor, warmup: int = 3) -> tuple[torch.Tensor, float]:
        """(tokens [batch, new_tokens + 1] on the CPU, seconds of the `new_tokens` decode steps), the step
        captured as a CUDA graph and replayed on CUDA, run eagerly elsewhere (`step_runner`)."""
        run = self.step_runner(prompt, warmup)
        with Timer(self.device) as timer:
            for _ in range(self.new_tokens):
                run()
        return self.tokens.cpu(), timer.seconds


def _mask_values(model, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """None for a boolean mask (sdpa); (0, dtype min) for an additive one (eager attention)."""
    implementation = getattr(model.config, "_attn_implementation", None) or "eager"
    if implementation == "sdpa":
        return None
    if implementation == "eager":
        dtype = next(model.parameters()).dtype
        return (torch.zeros((), dtype=dtype, device=device),
                torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device))
    raise DataError(f"the decode loop passes an explicit attention mask, which needs attn_implementation 'sdpa' "
                    f"or 'eager'; this model uses '{implementation}'")




def random_prompts(model, batch_size: int, prompt_tokens: int, seed: int, device: torch.device) -> torch.Tensor:
    """Seeded random token ids, [batch_size, prompt_tokens]; a smaller batch uses the first rows."""
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch_size, prompt_tokens), generator=generator).to(device)


def weight_bytes(model) -> int:
    """Bytes of every parameter, counted once, that a decode step reads.

    The input embedding table is left out (a step reads one row of it) unless it is tied to the
    lm_head, which reads all of it."""
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight.data_ptr() == embedding.data_ptr()
    seen, total = set(), 0
    for parameter in model.parameters():
        if parameter.data_ptr() in seen or (parameter is embedding and not tied):
            continue
        seen.add(parameter.data_ptr())
        total += parameter.numel() * parameter.element_size()
    return total


def recompile_limit(count: int):
    """Room for `count` compilations of the decode forward: each loop (batch size, dense or sparse)
    compiles it once more, and past the limit torch.compile would silently fall back to eager."""
    settings = torch._dynamo.config
    name = "recompile_limit" if hasattr(settings, "recompile_limit") else "cache_size_limit"
    return settings.patch(**{name: max(getattr(settings, name), count)})

