"""Serving load test: continuous against static batching in `mlx-med serve` (and vLLM when it runs here).

For each batching mode it starts one server process (`python -m mlx_med.cli serve
--batching MODE`) on the same checkpoint, fires an untimed warm-up burst, then for each
concurrency C (default 64 and 256) a timed closed-loop burst: C asyncio clients (httpx,
streaming chat completions with usage) each send `--rounds` requests one after another,
so C requests are in flight from the start and a client sends its next request as soon
as its previous one ends. Every request has its own prompt (8-48 words) and its own
`max_tokens` drawn uniformly from [--min-tokens, --max-tokens] (default 16-128; `--lengths
skewed`: 80% from the lowest eighth of that range, 20% from its upper half) with a fixed seed, greedy, `ignore_eos` (a random model must not stop early: the lengths are
the workload). Mixed lengths are what continuous batching is for: a static batch runs
until its longest row ends, while a continuous batch refills a finished row's slot at
the next decode step.

Per mode and C it reports request latency p50/p99, time to first token p50/p99 (first
streamed content), output tokens/s (completion tokens / wall time of the burst) and
requests/s; then continuous/static ratios and whether the goal holds at the largest C
(>= 2x tokens/s and <= 0.5x p99 latency). The load average is printed before and after
(other processes share the CPUs), and everything is written as JSON (--json).

  python bench/serve_load.py                          # random Qwen2-shaped model, both modes, C = 64, 256
  python bench/serve_load.py --model DIR              # any local HF chat model directory
  python bench/serve_load.py --modes static --concurrency 64
  python bench/serve_load.py --lengths skewed --max-tokens 512 --max-model-len 640
  python bench/serve_load.py --peer vllm --peer-python /tmp/vllm_venv/bin/python

The default model is built in a temporary directory: a chat tokenizer trained by
`mlx_med.rl.tokenizer.train_chat_tokenizer` and a random Qwen2-shaped decoder
(transformers writes it; d_model 384, 6 layers, 6 heads / 2 KV heads, MLP 1024, vocab
of the tokenizer). Random weights generate gibberish; throughput and latency do not
depend on that. Both modes get the same number of concurrent rows (--max-num-seqs; the
static engine's --max-batch-rows) and the same context limit (--max-model-len, default 256:
prompts of at most about 80 tokens plus 128 new ones; the continuous engine's KV slots are
that long, the static engine pads each batch to its own longest request).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("static", "continuous")
WORDS = ("patient", "fever", "cough", "dyspnea", "chest", "pain", "biopsy", "carcinoma", "adenocarcinoma", "staging",
         "lymph", "node", "metastasis", "tumor", "margin", "ECOG", "performance", "status", "chemotherapy",
         "radiation", "resection", "CT", "MRI", "PET", "lesion", "nodule", "history", "medication", "dose",
         "follow-up", "pathology", "report", "impression", "findings", "negative", "positive")


# --------------------------------------------------------------------------- model


def build_default_model(directory: str, *, d_model: int = 384, num_layers: int = 6, seed: int = 0) -> str:
  """A random Qwen2-shaped HF directory with the project's trained chat tokenizer (see the module docstring)."""
  sys.path.insert(0, str(ROOT / "tests"))
  from torch_peers import import_torchvision

  from mlx_med.rl.tokenizer import train_chat_tokenizer

  import_torchvision()  # transformers' model classes import torchvision, whose compiled ops a CPU torch lacks
  import transformers
  from generate_throughput import save_random_qwen2  # bench/ is the script's directory

  rng = np.random.default_rng(seed)
  texts = [" ".join(rng.choice(WORDS, 40)) for _ in range(400)] + ["system\nuser\nassistant\n"]
  tokenizer = train_chat_tokenizer(texts, directory, vocab_size=1024)
  vocab = -(-len(tokenizer) // 64) * 64
  cfg = transformers.Qwen2Config(vocab_size=vocab, hidden_size=d_model, intermediate_size=1024,
                                 num_hidden_layers=num_layers, num_attention_heads=6, num_key_value_heads=2,
                                 max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=None,
                                 eos_token_id=tokenizer.eos_token_ids[0], pad_token_id=tokenizer.pad_token_id)
  return save_random_qwen2(directory, cfg, seed)


# --------------------------------------------------------------------------- workload


LENGTHS = ("uniform", "skewed")


def _max_tokens(rng: np.random.Generator, lengths: str, lo: int, hi: int) -> int:
  """uniform: [lo, hi]; skewed: 80% short (uniform over the lowest eighth of [lo, hi]), 20% long (upper half)."""
  if lengths == "uniform":
    return int(rng.integers(lo, hi + 1))
  if rng.random() < 0.8:
    return int(rng.integers(lo, lo + max(1, (hi - lo) // 8) + 1))
  return int(rng.integers((lo + hi) // 2, hi + 1))


def make_workload(n: int, *, seed: int, min_tokens: int, max_tokens: int, lengths: str = "uniform") -> list[dict]:
  """`n` requests (messages, max_tokens), fixed by `seed`: prompts of 8-48 words, max_tokens by `lengths`."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    words = " ".join(rng.choice(WORDS, int(rng.integers(8, 49))))
    out.append({"messages": [{"role": "system", "content": "You are a careful clinician."},
                             {"role": "user", "content": f"Case {i}: {words}. Summarise."}],
                "max_tokens": _max_tokens(rng, lengths, min_tokens, max_tokens)})
  return out


def _percentile(values: list[float], q: float) -> float:
  return float(np.percentile(np.asarray(values, np.float64), q)) if values else float("nan")


async def _one(client, url: str, model: str, req: dict) -> dict:
  """One streamed chat completion: latency, time to first content token, completion tokens."""
  body = {"model": model, "messages": req["messages"], "max_tokens": req["max_tokens"], "temperature": 0.0,
          "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
  start = time.perf_counter()
  ttft, tokens, chunks = None, None, 0
  async with client.stream("POST", url, json=body) as resp:
    if resp.status_code != 200:
      text = (await resp.aread()).decode(errors="replace")
      raise RuntimeError(f"HTTP {resp.status_code}: {text[:200]}")
    async for line in resp.aiter_lines():
      if not line.startswith("data: ") or line == "data: [DONE]":
        continue
      event = json.loads(line[6:])
      if "error" in event:
        raise RuntimeError(f"stream error: {str(event['error'])[:200]}")
      for choice in event.get("choices") or []:
        if (choice.get("delta") or {}).get("content"):
          chunks += 1
          if ttft is None:
            ttft = time.perf_counter() - start
      if event.get("usage"):
        tokens = int(event["usage"]["completion_tokens"])
  latency = time.perf_counter() - start
  return {"latency": latency, "ttft": ttft if ttft is not None else latency, "tokens": tokens or 0,
          "max_tokens": req["max_tokens"]}


async def _closed_loop(base_url: str, model: str, workload: list[dict], concurrency: int) -> dict:
  """`concurrency` clients share the workload (client k sends requests k, k + C, ...), each sequentially."""
  import httpx

  limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
  results, errors = [], []
  async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as client:
    url = f"{base_url}/v1/chat/completions"

    async def worker(k: int):
      for i in range(k, len(workload), concurrency):
        try:
          results.append(await _one(client, url, model, workload[i]))
        except Exception as e:
          errors.append(f"{type(e).__name__}: {e}")

    start = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    wall = time.perf_counter() - start
  lat = [r["latency"] for r in results]
  ttft = [r["ttft"] for r in results]
  tokens = sum(r["tokens"] for r in results)
  return {"concurrency": concurrency, "requests": len(workload), "succeeded": len(results), "failed": len(errors),
          "errors": errors[:5], "wall_s": wall, "completion_tokens": tokens,
          "requested_tokens": sum(r["max_tokens"] for r in workload),
          "latency_p50_s": _percentile(lat, 50), "latency_p99_s": _percentile(lat, 99),
          "ttft_p50_s": _percentile(ttft, 50), "ttft_p99_s": _percentile(ttft, 99),
          "output_tokens_per_s": tokens / wall, "requests_per_s": len(results) / wall}


# --------------------------------------------------------------------------- servers


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _serve_help() -> str:
  out = subprocess.run([sys.executable, "-m", "mlx_med.cli", "serve", "--help"], capture_output=True, text=True,
                       check=False)
  return out.stdout + out.stderr


def server_command(mode: str, model_dir: str, port: int, max_num_seqs: int, *, has_batching_flag: bool,
                   peer_python: str | None = None, max_model_len: int = 0, chunk_size: int = 0) -> list[str]:
  """The command that serves `model_dir` on `port` in `mode` (static, continuous or vllm)."""
  limit = ["--max-model-len", str(max_model_len)] if max_model_len else []
  if mode == "vllm":
    return [peer_python or sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
            "--port", str(port), "--host", "127.0.0.1", "--max-num-seqs", str(max_num_seqs), "--dtype", "float32",
            "--served-model-name", "bench", "--disable-log-requests", *limit]
  cmd = [sys.executable, "-m", "mlx_med.cli", "serve", "--model", model_dir, "--port", str(port),
         "--served-model-name", "bench", "--log-level", "warning", *limit]
  if mode == "static":
    cmd += ["--max-batch-rows", str(max_num_seqs)]
    if has_batching_flag:
      cmd += ["--batching", "static"]
  else:
    cmd += ["--batching", "continuous", "--max-num-seqs", str(max_num_seqs)]
    if chunk_size:
      cmd += ["--chunk-size", str(chunk_size)]
  return cmd


def _wait_ready(base_url: str, proc: subprocess.Popen, log_path: str, timeout_s: float) -> None:
  import httpx

  deadline = time.monotonic() + timeout_s
  while True:
    try:
      if httpx.get(f"{base_url}/v1/models", timeout=5).status_code == 200:
        return
    except httpx.HTTPError:
      pass
    if proc.poll() is not None or time.monotonic() > deadline:
      with open(log_path, errors="replace") as f:
        tail = f.read()[-2000:]
      why = f"exited with {proc.returncode}" if proc.poll() is not None else f"not ready after {timeout_s:.0f}s"
      raise RuntimeError(f"server {why}; last log lines:\n{tail}")
    time.sleep(0.5)


def _loadavg() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def run_mode(mode: str, model_dir: str, args, tmp: str, *, has_batching_flag: bool) -> dict:
  """Starts the server for `mode`, warms it up, runs each concurrency; the server is stopped after."""
  port = _free_port()
  log_path = os.path.join(tmp, f"server_{mode}.log")
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  if mode == "vllm":
    env.setdefault("VLLM_TARGET_DEVICE", "cpu")
  cmd = server_command(mode, model_dir, port, args.max_num_seqs, has_batching_flag=has_batching_flag,
                       peer_python=args.peer_python, max_model_len=args.max_model_len,
                       chunk_size=args.chunk_size)
  out: dict = {"mode": mode, "command": " ".join(cmd), "loadavg_before": _loadavg(), "runs": []}
  with open(log_path, "w") as log:
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
  base_url = f"http://127.0.0.1:{port}"
  try:
    started = time.monotonic()
    _wait_ready(base_url, proc, log_path, args.start_timeout)
    out["startup_s"] = time.monotonic() - started
    warm = make_workload(args.warmup_requests, seed=args.seed + 1000, min_tokens=args.min_tokens,
                         max_tokens=args.max_tokens, lengths=args.lengths)
    t = time.perf_counter()
    asyncio.run(_closed_loop(base_url, "bench", warm, min(args.warmup_requests, args.max_num_seqs)))
    out["warmup_s"] = time.perf_counter() - t
    for c in args.concurrency:
      workload = make_workload(c * args.rounds, seed=args.seed + c, min_tokens=args.min_tokens,
                               max_tokens=args.max_tokens, lengths=args.lengths)
      run = asyncio.run(_closed_loop(base_url, "bench", workload, c))
      run["loadavg_after"] = _loadavg()
      out["runs"].append(run)
      print(f"  {mode:10s} C={c:4d}: {run['succeeded']}/{run['requests']} ok, wall {run['wall_s']:.1f}s, "
            f"latency p50 {run['latency_p50_s']:.2f}s p99 {run['latency_p99_s']:.2f}s, "
            f"TTFT p50 {run['ttft_p50_s']:.2f}s, {run['output_tokens_per_s']:.1f} tok/s, "
            f"{run['requests_per_s']:.2f} req/s (load {run['loadavg_after'][0]:.2f})", flush=True)
      for e in run["errors"]:
        print(f"    error: {e}", file=sys.stderr)
    if mode != "vllm":
      import httpx

      try:
        out["server_stats"] = httpx.get(f"{base_url}/stats", timeout=10).json()
      except httpx.HTTPError:
        pass
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
  out["loadavg_after"] = _loadavg()
  return out


def compare(results: dict[str, dict], concurrency: list[int], *, base: str = "static",
            other: str = "continuous") -> dict:
  """other/base ratios per concurrency (tokens/s, requests/s, p50/p99 latency, TTFT) and the goal at the largest C."""
  if base not in results or other not in results:
    return {}
  by_c = {m: {r["concurrency"]: r for r in results[m]["runs"]} for m in (base, other)}
  ratios = {}
  for c in concurrency:
    if c in by_c[base] and c in by_c[other]:
      a, b = by_c[base][c], by_c[other][c]
      ratios[c] = {k: b[k] / a[k] if a[k] else float("nan")
                   for k in ("output_tokens_per_s", "requests_per_s", "latency_p50_s", "latency_p99_s", "ttft_p50_s")}
  out = {"ratios": ratios}
  top = max(concurrency)
  if top in ratios:
    r = ratios[top]
    out["goal"] = {"concurrency": top, "tokens_per_s_ratio": r["output_tokens_per_s"],
                   "p99_ratio": r["latency_p99_s"],
                   "met": bool(r["output_tokens_per_s"] >= 2.0 and r["latency_p99_s"] <= 0.5)}
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default=None, help="HF chat model directory (default: a random Qwen2-shaped model)")
  parser.add_argument("--modes", default="static,continuous", help="comma-separated: static, continuous")
  parser.add_argument("--concurrency", default="64,256", help="comma-separated concurrent clients")
  parser.add_argument("--rounds", type=int, default=1, help="requests each client sends in turn (closed loop)")
  parser.add_argument("--min-tokens", type=int, default=16)
  parser.add_argument("--max-tokens", type=int, default=128)
  parser.add_argument("--lengths", choices=LENGTHS, default="uniform",
                      help="max_tokens per request: uniform over [min, max], or skewed (80%% short, 20%% long)")
  parser.add_argument("--max-num-seqs", type=int, default=64, help="concurrent rows in the server (both modes)")
  parser.add_argument("--max-model-len", type=int, default=256,
                      help="context limit of every server (the continuous engine's KV slots are this long; "
                           "0 = the model's own, 1024 for the default model)")
  parser.add_argument("--chunk-size", type=int, default=0,
                      help="decode steps between admissions of the continuous engine (0 = the server's default)")
  parser.add_argument("--warmup-requests", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--start-timeout", type=float, default=600.0)
  parser.add_argument("--peer", choices=("vllm",), default=None, help="also run the load against vLLM")
  parser.add_argument("--peer-python", default="/tmp/vllm_venv/bin/python", help="python of the vLLM venv")
  parser.add_argument("--json", default="bench/out/serve_load.json", help="write the results here")
  args = parser.parse_args(argv)
  args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
  modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  bad = sorted(set(modes) - set(MODES))
  if bad:
    parser.error(f"--modes: unknown {bad}; choose from {list(MODES)}")
  if args.min_tokens < 1 or args.max_tokens < args.min_tokens:
    parser.error(f"--min-tokens {args.min_tokens} / --max-tokens {args.max_tokens}: need 1 <= min <= max")

  help_text = _serve_help()
  has_batching_flag = "--batching" in help_text
  report: dict = {"loadavg_before": _loadavg(), "cpu_cores": len(os.sched_getaffinity(0)),
                  "client": "closed loop, asyncio + httpx, streamed", "args": vars(args), "modes": {}}
  print(f"load average before: {' '.join(f'{x:.2f}' for x in report['loadavg_before'])} "
        f"({report['cpu_cores']} cores; other processes share the CPUs)")
  with tempfile.TemporaryDirectory() as tmp:
    model_dir = args.model or build_default_model(os.path.join(tmp, "qwen2-random"))
    report["model"] = args.model or "random Qwen2-shaped (d_model 384, 6 layers, trained 1024-token tokenizer)"
    print(f"model {report['model']}; max_tokens {args.lengths} {args.min_tokens}-{args.max_tokens}, greedy, ignore_eos; "
          f"{args.max_num_seqs} server rows, context {args.max_model_len or 'of the model'}; closed loop "
          f"x{args.rounds}; seed {args.seed}")
    for mode in modes + ([args.peer] if args.peer else []):
      if mode == "continuous" and not has_batching_flag:
        print(f"  {mode}: skipped: this `mlx-med serve` has no --batching flag")
        report["modes"][mode] = {"mode": mode, "skipped": "serve has no --batching flag"}
        continue
      try:
        report["modes"][mode] = run_mode(mode, model_dir, args, tmp, has_batching_flag=has_batching_flag)
      except Exception as e:
        line = str(e).strip().splitlines()
        print(f"  {mode}: FAILED: {line[0] if line else type(e).__name__}", file=sys.stderr)
        report["modes"][mode] = {"mode": mode, "error": str(e)[-3000:]}
  done = {m: r for m, r in report["modes"].items() if r.get("runs")}
  report["continuous_vs_static"] = compare(done, args.concurrency)
  if "vllm" in done:
    report["continuous_vs_vllm"] = compare(done, args.concurrency, base="vllm", other="continuous")
  for c, r in report["continuous_vs_static"].get("ratios", {}).items():
    print(f"continuous/static at C={c}: tokens/s {r['output_tokens_per_s']:.2f}x, requests/s "
          f"{r['requests_per_s']:.2f}x, p50 {r['latency_p50_s']:.2f}x, p99 {r['latency_p99_s']:.2f}x, "
          f"TTFT p50 {r['ttft_p50_s']:.2f}x")
  goal = report["continuous_vs_static"].get("goal")
  if goal:
    print(f"goal at C={goal['concurrency']} (>= 2x tokens/s and <= 0.5x p99): tokens/s {goal['tokens_per_s_ratio']:.2f}x, "
          f"p99 {goal['p99_ratio']:.2f}x -> {'MET' if goal['met'] else 'NOT met'}")
  for c, r in report.get("continuous_vs_vllm", {}).get("ratios", {}).items():
    print(f"continuous/vLLM at C={c}: tokens/s {r['output_tokens_per_s']:.2f}x, p99 {r['latency_p99_s']:.2f}x")
  report["loadavg_after"] = _loadavg()
  print(f"load average after: {' '.join(f'{x:.2f}' for x in report['loadavg_after'])}")
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    tmp_path = args.json + ".tmp"
    with open(tmp_path, "w") as f:
      json.dump(report, f, indent=2, default=str)
    os.replace(tmp_path, args.json)
    print(f"wrote {args.json}")
  failed = any(r.get("error") for m, r in report["modes"].items() if m != "vllm")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
