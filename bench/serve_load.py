"""Load test: 64 concurrent chat requests through the openai client against `mlx-med serve`.

Starts `mlx-med serve` (as `python -m mlx_med.cli serve`) on a free loopback port,
fires one untimed burst to compile the batch shapes, then a timed burst of N
concurrent chat completions, and prints success count, p50/p99 latency and
aggregate completion tokens/s.

  python bench/serve_load.py                    # random ~40M Qwen2-style model + tiny tokenizer
  python bench/serve_load.py --model DIR        # any local HF chat model directory

Random weights generate gibberish; throughput and latency do not depend on that.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

from generate_throughput import random_qwen2_checkpoint  # bench/ is on sys.path when run as a script


def _build_model(directory: str) -> str:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(["The patient presents with fever, cough and shortness of breath."] * 50, trainer)
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
               "pad_token": "<|endoftext|>", "chat_template": template}, f)
  return random_qwen2_checkpoint(directory, eos_token_id=2)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _burst(client, model: str, n: int, max_tokens: int, seed0: int):
  def one(i):
    start = time.perf_counter()
    resp = client.chat.completions.create(
        model=model, max_tokens=max_tokens, temperature=0.7, seed=seed0 + i,
        messages=[{"role": "system", "content": "You are a careful clinician."},
                  {"role": "user", "content": f"Case {i}: fever and cough for {i % 7 + 1} days. Next step?"}])
    return time.perf_counter() - start, resp.usage.completion_tokens

  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(n) as pool:
    futures = [pool.submit(one, i) for i in range(n)]
    results, failures = [], 0
    for f in futures:
      try:
        results.append(f.result())
      except Exception as e:  # noqa: BLE001 - counted and reported
        failures += 1
        print(f"request failed: {type(e).__name__}: {e}", file=sys.stderr)
  return time.perf_counter() - start, results, failures


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default=None, help="HF model directory (default: build a random ~40M model)")
  parser.add_argument("--requests", type=int, default=64)
  parser.add_argument("--max-tokens", type=int, default=64)
  parser.add_argument("--max-batch-rows", type=int, default=32)
  args = parser.parse_args(argv)

  import openai

  with tempfile.TemporaryDirectory() as tmp:
    model_dir = args.model or _build_model(os.path.join(tmp, "qwen2-40m-random"))
    port = _free_port()
    log_path = os.path.join(tmp, "server.log")
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    with open(log_path, "w") as log:
      # `python -m mlx_med.cli serve` is `mlx-med serve` without relying on the installed script's PATH.
      proc = subprocess.Popen([sys.executable, "-m", "mlx_med.cli", "serve", "--model", model_dir, "--port", str(port),
                               "--max-batch-rows", str(args.max_batch_rows), "--log-level", "warning"],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
      client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=600, max_retries=0)
      deadline = time.monotonic() + 300
      while True:
        try:
          model = client.models.list().data[0].id
          break
        except openai.APIConnectionError:
          if proc.poll() is not None or time.monotonic() > deadline:
            print(open(log_path).read()[-3000:], file=sys.stderr)
            raise SystemExit("server did not start")
          time.sleep(0.5)
      _burst(client, model, args.requests, args.max_tokens, seed0=10_000)  # warm-up: compiles the shapes
      wall, results, failures = _burst(client, model, args.requests, args.max_tokens, seed0=0)
      import httpx
      stats = httpx.get(f"http://127.0.0.1:{port}/stats").json()
      latencies = np.array([r[0] for r in results])
      tokens = sum(r[1] for r in results)
      print(f"{args.requests} concurrent chat requests, max_tokens={args.max_tokens}, server batch <= "
            f"{args.max_batch_rows} rows; model {os.path.basename(model_dir)}")
      print(f"succeeded {len(results)}/{args.requests}; wall {wall:.2f}s; latency p50 {np.percentile(latencies, 50):.2f}s "
            f"p99 {np.percentile(latencies, 99):.2f}s; {tokens} completion tokens, {tokens / wall:.1f} tok/s aggregate")
      print(f"server batches over both bursts: {stats['batches']} for {stats['requests']} requests "
            f"(largest {stats['max_batch_rows_seen']} rows)")
      client.close()
      return 0 if failures == 0 else 1
    finally:
      proc.terminate()
      proc.wait(timeout=30)


if __name__ == "__main__":
  sys.exit(main())
