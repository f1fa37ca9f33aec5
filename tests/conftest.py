"""Shared test set-up.

* Triton kernels run on CPU tensors under the interpreter, which must be switched on before
  triton is first imported; on machines with a GPU the real kernels run instead.
* Hypothesis: no per-example deadline (the machine is shared and timings are noisy), and a
  derandomized profile on CI so a red run reproduces.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "default", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci", deadline=None, max_examples=60, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci" if os.environ.get("CI") else "default")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def single_thread():
    """Tiny-tensor test modules run on one thread: OpenMP barriers cost more than they save there."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_llama():
    """Builder of tiny random Llama causal LMs (hidden 64, MLP 128, 4 query / 2 KV heads), in eval mode;
    a test passes the knobs it varies: ``tiny_llama(vocab=128, layers=3, tie=True, init=0.1, seed=1)``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(vocab: int = 96, layers: int = 2, tie: bool = False, init: float = 0.02, seed: int = 0,
              max_positions: int = 64):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                          tie_word_embeddings=tie, initializer_range=init, architectures=["LlamaForCausalLM"])
        return LlamaForCausalLM(cfg).eval()

    return build
