import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")



WORDS = ("alpha", "beta", "gamma", "delta")
EXAMPLES = [{"prompt": f"say {w}", "completion": w} for w in WORDS] * 4
"""A toy prompt/completion set for the tiny models' training tests."""

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    """A tiny random decoder LM of the given family, built offline from its config class."""
    import transformers
    configs = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}
    kwargs = dict(TINY, **overrides)
    if family == "qwen3":
        kwargs.setdefault("head_dim", kwargs["hidden_size"] // kwargs["num_attention_heads"])
    config = configs[family](**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.eval()
    return model


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def embedded():
    from efx.model.loading import load_model
    return load_model()


def char_tokenizer():
    """A character-level fast tokenizer built in memory (for tiny-model training tests)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars[:94])}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
