"""Zero-shot trajectories/s: the batched KV-cached evaluator vs recomputing the prefix each token.

Both sides run the same decoder (random weights: speed does not depend on what was learnt)
on the same patients' contexts (held-out timelines of a synthetic cohort, cut at random
prediction times, left-padded), sampling at temperature 1 exactly `--new` tokens per
trajectory (no stop tokens, so both do the same amount of work). Ours is
`mlx_med.ehr.evaluate.zero_shot_risk`, the code path `mlx-med ehr evaluate` uses (one
prefill, then a while-loop of single-token decode steps over a static KV cache). The peer
is what a simple implementation does: every new token runs the whole sequence so far
through the decoder (one fixed-shape jitted forward per token, no cache). Compile time is
excluded on both sides (one warm-up call each).

  python bench/zero_shot_throughput.py            # CPU: smoke-size model, 8 patients x 8 trajectories x 64 tokens
  python bench/zero_shot_throughput.py --gpu      # ETHOS's setting: 20 trajectories x 750 tokens per patient

ETHOS reports about 12 s per patient for 20 trajectories of ~750 tokens on one H100; --gpu
prints our seconds per patient beside it (goal: at least 20x faster). --gpu skips the
recompute peer (quadratic in length; it would take the whole budget).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

ETHOS_S_PER_PATIENT = 12.0  # 20 trajectories x ~750 tokens, one H100 (ETHOS paper)


class _Run:
  """The two fields zero_shot_risk reads from a LoadedRun."""

  def __init__(self, model_cfg, params):
    self.model_cfg, self.params = model_cfg, params


def patient_contexts(num_patients: int, context: int, seed: int = 0):
  """Held-out timelines of a small synthetic cohort, each cut at a random point: (inputs [N, context], lengths, vocab size)."""
  from mlx_med.ehr.dataset import tokenize_split
  from mlx_med.ehr.meds import MEDSReader
  from mlx_med.ehr.synth import generate_cohort
  from mlx_med.ehr.tokenizer import PAD_ID, TimelineTokenizer

  with tempfile.TemporaryDirectory() as tmp:
    root = os.path.join(tmp, "meds")
    generate_cohort(max(400, 12 * num_patients), seed=seed, out_dir=root, progress=False)
    reader = MEDSReader(root)
    tokenizer = TimelineTokenizer().fit(reader)
    stream, _ = tokenize_split(reader, tokenizer, "held_out", os.path.join(tmp, "cache"))
  rng = np.random.default_rng(seed)
  inputs = np.full((num_patients, context), PAD_ID, np.int32)
  lengths = np.zeros(num_patients, np.int32)
  for i in range(num_patients):
    tokens, _ = stream.subject(int(rng.integers(len(stream))))
    cut = int(rng.integers(min(len(tokens) - 1, 8), len(tokens) - 1))  # never the [TIMELINE_END]
    hist = tokens[max(0, cut - context):cut]
    inputs[i, :len(hist)] = hist
    lengths[i] = len(hist)
  return inputs, lengths, tokenizer.vocab_size


def recompute_prefix_sampler(cfg, batch: int, total: int):
  """Samples one token per call by running the whole [batch, total] buffer through the decoder (no cache)."""
  import jax
  import jax.numpy as jnp

  from mlx_med.core.transformer import Decoder

  model = Decoder(cfg)

  @jax.jit
  def step(params, buf, seg, pos, t, key):
    logits = model.apply({"params": params}, buf, positions=pos, segment_ids=seg)
    nxt = jax.random.categorical(key, logits[:, t - 1].astype(jnp.float32))
    buf = jax.lax.dynamic_update_slice_in_dim(buf, nxt[:, None].astype(buf.dtype), t, axis=1)
    seg = jax.lax.dynamic_update_slice_in_dim(seg, jnp.ones((batch, 1), seg.dtype), t, axis=1)
    return buf, seg

  def run(params, prompts_left_padded: np.ndarray, prompt_lens: np.ndarray, new: int, seed: int):
    p = prompts_left_padded.shape[1]
    buf = np.zeros((batch, total), np.int32)
    buf[:, :p] = prompts_left_padded
    seg = np.zeros((batch, total), np.int32)
    seg[:, :p] = (np.arange(p)[None] >= (p - prompt_lens)[:, None])
    pos = np.clip(np.arange(total)[None] - (p - prompt_lens)[:, None], 0, None).astype(np.int32)
    buf, seg, pos = jnp.asarray(buf), jnp.asarray(seg), jnp.asarray(pos)
    key = jax.random.key(seed)
    for t in range(p, p + new):
      buf, seg = step(params, buf, seg, pos, jnp.asarray(t, jnp.int32), jax.random.fold_in(key, t))
    return np.asarray(buf[:, p:p + new])

  return run


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gpu", action="store_true", help="ETHOS's setting on an accelerator (no recompute peer)")
  parser.add_argument("--patients", type=int, default=None)
  parser.add_argument("--trajectories", type=int, default=None)
  parser.add_argument("--new", type=int, default=None, help="tokens per trajectory")
  parser.add_argument("--context", type=int, default=None, help="history tokens per patient (at most)")
  parser.add_argument("--batch", type=int, default=None, help="trajectories per device call")
  args = parser.parse_args()

  import flax.linen as nn
  import jax

  from mlx_med.core.lm_task import decoder_init_fn
  from mlx_med.core.sampler import Sampler, bucket
  from mlx_med.core.transformer import DecoderConfig
  from mlx_med.ehr import evaluate
  from mlx_med.ehr.tokenizer import PAD_ID

  if args.gpu:
    # ETHOS-like size: 6 layers, d_model 768 (~45M non-embedding params), bf16.
    patients, k, new, context, batch = args.patients or 32, args.trajectories or 20, args.new or 750, args.context or 1024, args.batch or 640
    layers, d_model, heads, kv, mlp, dtype = 6, 768, 12, 12, 3072, "bfloat16"
  else:
    patients, k, new, context, batch = args.patients or 8, args.trajectories or 8, args.new or 64, args.context or 64, args.batch or 64
    layers, d_model, heads, kv, mlp, dtype = 2, 64, 4, 2, 192, "float32"  # configs/ehr/pretrain.py:smoke
  inputs, lengths, vocab = patient_contexts(patients, context)
  cfg = DecoderConfig(vocab_size=-(-vocab // 64) * 64, num_layers=layers, d_model=d_model, num_heads=heads,
                      num_kv_heads=kv, mlp_dim=mlp, max_seq_len=context + new, dtype=dtype)
  params = nn.unbox(jax.jit(decoder_init_fn(cfg))(jax.random.key(0)))
  run = _Run(cfg, params)
  no_stop = evaluate.OutcomeTokens(evaluate.OutcomeSpec("event"), frozenset(), frozenset(), -1, {})
  rows_per_call = max(1, batch // k)
  sampler = Sampler(cfg, pad_id=PAD_ID, min_prompt_bucket=context, min_new_bucket=new,
                    min_batch_bucket=bucket(rows_per_call * k, minimum=1))
  elapsed = np.zeros(patients)
  n_traj = patients * k
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; load average {os.getloadavg()}")
  print(f"model: {layers} layers, d_model {d_model}, vocab {cfg.vocab_size}, {dtype}; {patients} patients x {k} trajectories "
        f"x {new} tokens, contexts {int(lengths.min())}-{int(lengths.max())} tokens, {rows_per_call * k} trajectories per call")

  def ours():
    evaluate.zero_shot_risk(run, inputs, lengths, elapsed, no_stop, num_trajectories=k, max_new_tokens=new,
                            batch_trajectories=batch, sampler=sampler)

  ours_one = lambda: evaluate.zero_shot_risk(run, inputs[:rows_per_call], lengths[:rows_per_call], elapsed, no_stop,  # noqa: E731
                                             num_trajectories=k, max_new_tokens=new, batch_trajectories=batch, sampler=sampler)
  ours_one()  # compile
  t0 = time.perf_counter()
  ours()
  ours_s = time.perf_counter() - t0
  print(f"batched KV-cached evaluator: {n_traj / ours_s:.1f} trajectories/s ({ours_s:.2f} s, {ours_s / patients:.3f} s/patient, "
        f"{n_traj * new / ours_s:.0f} tokens/s)")
  if args.gpu:
    print(f"ETHOS: ~{ETHOS_S_PER_PATIENT:.0f} s/patient (20 x ~750 tokens, one H100); ours {ours_s / patients:.3f} s/patient: "
          f"{ETHOS_S_PER_PATIENT / (ours_s / patients):.1f}x faster (goal >= 20x)")
    print(f"load average after: {os.getloadavg()}")
    return

  peer_batch = rows_per_call * k
  peer = recompute_prefix_sampler(cfg, peer_batch, context + new)

  def peer_all():
    for lo in range(0, patients, rows_per_call):
      idx = np.repeat(np.arange(lo, min(lo + rows_per_call, patients)), k)
      idx = np.concatenate([idx, np.full(peer_batch - len(idx), idx[0])])
      left = np.zeros((peer_batch, context), np.int32)
      for j, r in enumerate(idx):
        left[j, context - lengths[r]:] = inputs[r, :lengths[r]]
      peer(params, left, lengths[idx], new, seed=lo)

  peer(params, np.zeros((peer_batch, context), np.int32), np.full(peer_batch, context, np.int32), 1, seed=0)  # compile
  t0 = time.perf_counter()
  peer_all()
  peer_s = time.perf_counter() - t0
  print(f"recompute-the-prefix peer:   {n_traj / peer_s:.1f} trajectories/s ({peer_s:.2f} s)")
  print(f"ratio (ours / peer): {peer_s / ours_s:.2f}x; load average after {os.getloadavg()}")


if __name__ == "__main__":
  main()
