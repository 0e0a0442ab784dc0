"""A tiny Qwen2-style causal LM and a byte-level BPE tokenizer, built locally in ~10 s (no hub).

    python -m ow_prefect.testing.tiny_model DIR      (the model, plus DIR/data/{conversations,preference}.jsonl)

Hidden 128 with 4 heads of 32 (vLLM's CPU attention needs head_dim >= 32), 2 layers, tied embeddings, a
ChatML template with ``{% generation %}`` markers (so TRL can train on assistant tokens only). About 360k
parameters, 1.5 MB on disk. Also writes `sample_conversations()` / `sample_preferences()` datasets of
small arithmetic questions the model can visibly learn.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

NUMBERS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
]
WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sky",
    "blue",
    "red",
    "green",
    "sun",
    "moon",
    "is",
    "are",
    "was",
    "what",
    "why",
    "how",
    "who",
    "where",
    "when",
    "yes",
    "no",
    "hello",
    "hi",
    "thanks",
    "please",
    "answer",
    "question",
    "help",
    "you",
    "me",
    "I",
    "we",
    "they",
    "it",
    "this",
    "that",
    "plus",
    "minus",
    "times",
    "equals",
    "capital",
    "of",
    "france",
    "paris",
    "italy",
    "rome",
    "spain",
    "madrid",
    "color",
    "number",
    "good",
    "bad",
    "fast",
    "slow",
    "brief",
    "math",
    "helper",
]
SYSTEM = {"role": "system", "content": "You are a brief math helper."}
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _question(rng: random.Random) -> tuple[int, int, dict]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return a, b, {"role": "user", "content": f"What is {NUMBERS[a]} plus {NUMBERS[b]}?"}


def sample_conversations(n: int = 64, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, question = _question(rng)
        answer = f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} equals {NUMBERS[a + b]}."
        rows.append({"messages": [SYSTEM, question, {"role": "assistant", "content": answer}]})
    return rows


def sample_preferences(n: int = 32, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, question = _question(rng)
        wrong = (a + b + rng.randint(1, 5)) % 19
        rows.append(
            {
                "prompt": [SYSTEM, question],
                "chosen": [{"role": "assistant", "content": f"{NUMBERS[a + b].capitalize()}."}],
                "rejected": [{"role": "assistant", "content": f"{NUMBERS[wrong].capitalize()}, I think."}],
            }
        )
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def build_tiny_model(out: str | Path, seed: int = 0, **sizes: int) -> Path:
    """Write a tiny model + tokenizer to `out` (skipped when `out` already holds one). `sizes` overrides the
    Qwen2 config's dimensions (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
    num_key_value_heads, head_dim, max_position_embeddings) for a bigger local model, e.g. a throughput check."""
    out = Path(out)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    rng = random.Random(seed)
    torch.manual_seed(seed)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))).capitalize() + "." for _ in range(3000)]
    corpus += [json.dumps(row) for row in sample_conversations(200, seed)]
    specials = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=1024,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=sizes.get("max_position_embeddings", 512),
    )
    out.mkdir(parents=True, exist_ok=True)
    hf_tokenizer.save_pretrained(out)
    dims = {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 512,
    }
    unknown = set(sizes) - set(dims)
    if unknown:
        raise ValueError(f"unknown sizes {sorted(unknown)}; use {sorted(dims)}")
    config = Qwen2Config(
        vocab_size=len(hf_tokenizer),
        **(dims | sizes),
        tie_word_embeddings=True,
        bos_token_id=hf_tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=hf_tokenizer.eos_token_id,
        pad_token_id=hf_tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = hf_tokenizer.eos_token_id
    model.generation_config.pad_token_id = hf_tokenizer.pad_token_id
    model.save_pretrained(out)
    return out


def main(out: str) -> None:
    """Build the model in `out`, with its sample datasets in `out`/data (conversations.jsonl, preference.jsonl)."""
    model = build_tiny_model(out)
    (model / "data").mkdir(exist_ok=True)
    write_jsonl(sample_conversations(), model / "data" / "conversations.jsonl")
    write_jsonl(sample_preferences(), model / "data" / "preference.jsonl")
    print(model)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tiny-model")
