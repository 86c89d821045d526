"""Build a tiny Qwen3-MoE checkpoint locally (random weights, a locally trained tokenizer).

Run with the vLLM environment's Python (it has torch, transformers and tokenizers):

    .venv-vllm/bin/python tests/tiny_moe.py OUT_DIR

Nothing is downloaded. The tokenizer is a byte-level BPE trained here on a small built-in
corpus, with a ChatML chat template, so vLLM's chat endpoint works; the model is a real
``Qwen3MoeForCausalLM`` (8 experts, 2 active per token) with seeded random weights: it
produces gibberish, at the speed and with the accounting of a real sparse-MoE model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus() -> list[str]:
    words = ("energy joule gateway tier model token budget tenant route request answer the a "
             "python function return value list string number expert sparse dense hello world "
             "what is how why write explain short sentence please thanks").split()
    lines = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 20
    lines += [f"{a} + {b} = {a + b}." for a in range(50) for b in range(0, 50, 7)]
    return lines


def build(out: Path, seed: int = 0) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=len(fast), hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=64,  # vLLM's CPU attention has no kernel for head_dim 16
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
        max_position_embeddings=32768, tie_word_embeddings=True,
        eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=fast.convert_tokens_to_ids("<|endoftext|>"), bos_token_id=None,
        torch_dtype="bfloat16",
    )
    model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    gen = {"eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id,
           "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen))


if __name__ == "__main__":
    build(Path(sys.argv[1]))
