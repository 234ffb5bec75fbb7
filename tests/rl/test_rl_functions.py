"""The registered RL functions against numbers worked out by hand (written in each test).

Array functions are checked on small inputs whose results are computed in the
comments (and for entropy against numpy); text rewards on tables of completions
that real policies write, positives and negatives side by side.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlx_med.rl import functions as F

OPTIONS = {"A": "Aspirin", "B": "Heparin", "C": "Aspirin and heparin", "D": "Warfarin"}
MCQA = {"answer": "B", "options": OPTIONS}


# --------------------------------------------------------------------------------------------- registry

def test_registry_names_and_unknown_name_error():
  assert F.names("advantage") == ["grpo", "drgrpo", "rloo"]
  assert F.names("aggregation") == ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
  assert F.names("kl") == ["k1", "k2", "k3"]
  assert F.names("policy_loss") == ["ppo_clip"]
  assert set(F.names("reward")) == {"mcqa_accuracy", "format", "answer_leak", "math_equivalence", "medrlvr",
                                    "xreasoner"}
  assert F.get("advantage", "rloo") is F.rloo_advantage
  with pytest.raises(ValueError, match=r"^unknown advantage 'x'; known: grpo, drgrpo, rloo$"):
    F.get("advantage", "x")
  with pytest.raises(ValueError, match=r"unknown function kind 'critic'; known: reward, advantage"):
    F.get("critic", "grpo")
  with pytest.raises(ValueError, match="already registered"):
    F.register("advantage", "grpo")(lambda rewards, eps=1e-6: rewards)
  assert F.get("advantage", "grpo") is F.grpo_advantage


# --------------------------------------------------------------------------------------------- advantages

REWARDS = jnp.array([[1.0, 1.0, 1.0, 0.0],    # mean .75, std(ddof=1) = sqrt(.75/3) = .5
                     [1.0, 1.0, 1.0, 1.0],    # no signal
                     [2.0, 0.0, 1.0, 1.0]])   # mean 1, std(ddof=1) = sqrt(2/3)


def test_grpo_advantage_by_hand():
  s = math.sqrt(1.5)  # 1 / sqrt(2/3)
  expected = [[0.5, 0.5, 0.5, -1.5], [0, 0, 0, 0], [s, -s, 0, 0]]
  np.testing.assert_allclose(np.asarray(F.grpo_advantage(REWARDS, eps=0.0))[[0, 2]], np.array(expected)[[0, 2]], rtol=1e-6)
  # default eps = 1e-6 in the denominator; the equal group is exactly zero, not NaN
  np.testing.assert_allclose(F.get("advantage", "grpo")(REWARDS), expected, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(F.grpo_advantage(REWARDS)[1]) == 0.0)
  np.testing.assert_array_equal(F.grpo_advantage(jnp.array([[3.0], [1.0]])), [[0.0], [0.0]])  # G = 1


def test_drgrpo_and_rloo_advantages_by_hand():
  np.testing.assert_allclose(F.drgrpo_advantage(REWARDS),
                             [[.25, .25, .25, -.75], [0, 0, 0, 0], [1, -1, 0, 0]], atol=1e-7)
  # rloo: r_i - mean of the other three; row 3: 2 - 2/3, 0 - 4/3, 1 - 1, 1 - 1
  np.testing.assert_allclose(F.rloo_advantage(REWARDS),
                             [[1 / 3, 1 / 3, 1 / 3, -1], [0, 0, 0, 0], [4 / 3, -4 / 3, 0, 0]], atol=1e-6)
  np.testing.assert_array_equal(F.rloo_advantage(jnp.array([[3.0]])), [[0.0]])


def test_advantages_jit():
  for name in F.names("advantage"):
    fn = jax.jit(functools.partial(F.get("advantage", name), eps=1e-6))
    np.testing.assert_allclose(fn(REWARDS), F.get("advantage", name)(REWARDS), rtol=1e-6, atol=1e-7)


def test_zero_variance_groups():
  np.testing.assert_array_equal(F.zero_variance_groups(REWARDS), [False, True, False])
  np.testing.assert_array_equal(F.zero_variance_groups(jnp.array([[0.0, 1e-8], [0.0, 1e-3]])), [True, False])


# --------------------------------------------------------------------------------------------- policy loss

def _ratios_to_logp(ratios):
  return jnp.log(jnp.array(ratios, jnp.float32)), jnp.zeros(len(ratios), jnp.float32)


def test_ppo_clip_by_hand_with_clip_higher():
  # eps_low .2, eps_high .28: the ratio range is [0.8, 1.28]
  ratios = [1.5, 0.5, 0.5, 1.25, 1.25, 0.75]
  adv = jnp.array([1.0, 1.0, -1.0, -1.0, 1.0, -2.0])
  expected = [-1.28,  # A>0, r above 1.28: -min(1.5, 1.28)
              -0.5,   # A>0, r low: not clipped (the unclipped term is the smaller objective)
              0.8,    # A<0, r below 0.8: max(0.5, 0.8)
              1.25,   # A<0, r inside
              -1.25,  # A>0, r = 1.25 inside [.8, 1.28] (symmetric 0.2 would clip it at 1.2)
              1.6]    # A=-2, r=.75 < .8: max(1.5, 1.6)
  clipped = [True, False, True, False, False, True]
  logp, old = _ratios_to_logp(ratios)
  loss, is_clipped = F.ppo_clip(logp, old, adv, eps_low=0.2, eps_high=0.28)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_array_equal(is_clipped, clipped)
  # the same tokens with symmetric eps = 0.2: token 5 is now clipped at 1.2
  loss_sym, clipped_sym = F.ppo_clip(logp, old, adv, eps_low=0.2, eps_high=0.2)
  assert float(loss_sym[4]) == pytest.approx(-1.2, rel=1e-6) and bool(clipped_sym[4])
  # d loss / d logp = -ratio * A where not clipped, 0 where clipped
  grad = jax.grad(lambda lp: F.ppo_clip(lp, old, adv, eps_low=0.2, eps_high=0.28)[0].sum())(logp)
  np.testing.assert_allclose(grad, [0.0, -0.5, 0.0, 1.25, -1.25, 0.0], atol=1e-6)


def test_ppo_dual_clip_by_hand():
  ratios = [5.0, 2.0, 5.0]
  adv = jnp.array([-1.0, -1.0, 1.0])
  logp, old = _ratios_to_logp(ratios)
  fn = jax.jit(functools.partial(F.get("policy_loss", "ppo_clip"), eps_low=0.2, eps_high=0.2, dual_clip=3.0))
  loss, clipped = fn(logp, old, adv)
  # A<0: min(max(r, 1.2) * 1, 3): 5 -> 3 (dual), 2 -> 2; A>0: -1.2 (ordinary clip)
  np.testing.assert_allclose(loss, [3.0, 2.0, -1.2], rtol=1e-6)
  np.testing.assert_array_equal(clipped, [True, False, True])
  grad = jax.grad(lambda lp: fn(lp, old, adv)[0].sum())(logp)
  np.testing.assert_allclose(grad, [0.0, 2.0, 0.0], atol=1e-6)
  # without the dual clip the exploding ratio passes straight through
  loss, clipped = F.ppo_clip(logp, old, adv, eps_low=0.2, eps_high=0.2)
  np.testing.assert_allclose(loss, [5.0, 2.0, -1.2], rtol=1e-6)
  np.testing.assert_array_equal(clipped, [False, False, True])
  # bf16 inputs: the loss is computed in fp32
  loss16, _ = F.ppo_clip(logp.astype(jnp.bfloat16), old.astype(jnp.bfloat16), adv.astype(jnp.bfloat16))
  assert loss16.dtype == jnp.float32
  np.testing.assert_allclose(loss16, [5.0, 2.0, -1.2], rtol=1e-2)
  with pytest.raises(ValueError, match="dual_clip must be > 1"):
    F.ppo_clip(logp, old, adv, dual_clip=0.5)


def test_garbage_at_padded_positions_stays_out_of_loss_and_grad():
  logp = jnp.array([[-1.0, -2.0, 1e4]])     # the last position is padding with a garbage value
  old = jnp.array([[-1.0, -2.5, -1e4]])
  adv = jnp.ones((1, 3))
  mask = jnp.array([[1.0, 1.0, 0.0]])

  def loss(lp):
    per_token, _ = F.ppo_clip(lp, old, adv, eps_low=0.2, eps_high=0.2)
    kl = F.kl_k3(lp, old)
    s, w = F.token_mean(per_token + 0.1 * kl, mask)
    return s / w

  value, grad = jax.jit(jax.value_and_grad(loss))(logp)
  assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
  assert float(grad[0, 2]) == 0.0
  s, w = F.token_mean(jnp.array([[1.0, jnp.nan]]), jnp.array([[1.0, 0.0]]))
  assert (float(s), float(w)) == (1.0, 1.0)


# --------------------------------------------------------------------------------------------- aggregation

NAN = float("nan")
# four rows of lengths 3, 1, 2, 4 (NaN where masked: it must never reach a sum)
PER_TOKEN = jnp.array([[1.0, 2.0, 3.0, NAN],
                       [4.0, NAN, NAN, NAN],
                       [5.0, 6.0, NAN, NAN],
                       [7.0, 8.0, 9.0, 10.0]])
MASK = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], jnp.float32)


def test_aggregations_by_hand():
  # token-mean: (1+...+10, 10 tokens) -> 5.5
  s, w = F.get("aggregation", "token-mean")(PER_TOKEN, MASK)
  assert (float(s), float(w)) == (55.0, 10.0)
  # seq-mean-token-mean: row means 2, 4, 5.5, 8.5 -> (20, 4 rows) -> 5.0
  s, w = F.get("aggregation", "seq-mean-token-mean")(PER_TOKEN, MASK)
  assert float(s) == pytest.approx(20.0) and float(w) == 4.0
  # seq-mean-token-sum-norm, max_len 8: (55 / 8, 4 rows) -> 1.71875
  s, w = F.get("aggregation", "seq-mean-token-sum-norm")(PER_TOKEN, MASK, max_len=8)
  assert float(s) == pytest.approx(6.875) and float(w) == 4.0
  with pytest.raises(ValueError, match="needs max_len"):
    F.seq_mean_token_sum_norm(PER_TOKEN, MASK)


def test_rows_without_tokens_do_not_count():
  mask = MASK.at[1].set(0.0)  # row 2 becomes a padding row
  s, w = F.seq_mean_token_mean(PER_TOKEN, mask)
  assert float(s) == pytest.approx(16.0) and float(w) == 3.0   # 2 + 5.5 + 8.5
  s, w = F.seq_mean_token_sum_norm(PER_TOKEN, mask, max_len=4)
  assert float(s) == pytest.approx(51.0 / 4) and float(w) == 3.0


@pytest.mark.parametrize("name", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_aggregation_sums_add_over_micro_batches(name):
  fn = jax.jit(functools.partial(F.get("aggregation", name), max_len=4))
  full_s, full_w = fn(PER_TOKEN, MASK)
  (s1, w1), (s2, w2) = fn(PER_TOKEN[:2], MASK[:2]), fn(PER_TOKEN[2:], MASK[2:])
  np.testing.assert_allclose([s1 + s2, w1 + w2], [full_s, full_w], rtol=1e-6)
  np.testing.assert_allclose((s1 + s2) / (w1 + w2), full_s / full_w, rtol=1e-6)
  if name == "token-mean":
    # the halves hold 4 and 6 tokens: averaging their means (2.5, 7.5) would give 5.0, not 5.5 —
    # why aggregations return sums
    assert float(full_s / full_w) == 5.5
    assert float((s1 / w1 + s2 / w2) / 2) == pytest.approx(5.0)


# --------------------------------------------------------------------------------------------- KL

def test_kl_estimators_by_hand():
  logp = jnp.log(jnp.array([0.5, 0.25]))
  ref = jnp.log(jnp.array([0.25, 0.5]))
  log2 = math.log(2.0)
  np.testing.assert_allclose(F.get("kl", "k1")(logp, ref), [log2, -log2], rtol=1e-6)
  np.testing.assert_allclose(F.get("kl", "k2")(logp, ref), [0.5 * log2 ** 2] * 2, rtol=1e-6)
  # k3 = exp(ref - logp) - (ref - logp) - 1: 0.5 + log2 - 1 and 2 - log2 - 1
  np.testing.assert_allclose(F.get("kl", "k3")(logp, ref), [log2 - 0.5, 1.0 - log2], rtol=1e-6)


def test_k3_nonnegative_and_second_order():
  rng = np.random.default_rng(0)
  logp, ref = (jnp.asarray(rng.normal(size=(4, 50)) * 3, jnp.float32) for _ in range(2))
  assert float(F.kl_k3(logp, ref).min()) >= 0.0
  d = jnp.array([1e-2, -1e-2, 3e-3])
  k3 = F.kl_k3(d, jnp.zeros(3))
  # k3 = d^2/2 - d^3/6 + ...: relative error of the second-order term ~ |d|/3
  np.testing.assert_allclose(k3, F.kl_k1(d, jnp.zeros(3)) ** 2 / 2, rtol=5e-3)
  np.testing.assert_array_equal(F.kl_k3(d, d), [0.0, 0.0, 0.0])


# --------------------------------------------------------------------------------------------- entropy

def test_token_entropy_matches_numpy():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 3, 7)).astype(np.float32) * 2
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(F.token_entropy(jnp.asarray(logits)), -(p * np.log(p)).sum(-1), rtol=1e-5)
  # uniform over 4 live entries, 3 masked with -inf: log 4, not NaN
  masked = jnp.array([[[0.0, 0.0, 0.0, 0.0, -jnp.inf, -jnp.inf, -jnp.inf]]])
  np.testing.assert_allclose(F.token_entropy(masked), [[math.log(4.0)]], rtol=1e-6)
  assert F.token_entropy(jnp.asarray(logits, jnp.bfloat16)).dtype == jnp.float32


# --------------------------------------------------------------------------------------------- format

@pytest.mark.parametrize("text, ok", [
  ("<think>reason</think><answer>B</answer>", True),
  ("  <think>\nreason\n</think>\n\n<answer> B </answer>\n", True),
  ("<think>reason</think><answer>B</answer><|im_end|>", True),
  ("<think></think><answer>B</answer>", True),                       # empty thought: a leak matter, not format
  ("<answer>B</answer>", False),                                     # no thought
  ("<think>reason</think>", False),                                  # no answer
  ("<think>reason</think><answer></answer>", False),                 # blank answer
  ("<think>reason</think><answer>B", False),                         # unclosed answer
  ("<think>a <think>b</think></think><answer>B</answer>", False),    # nested
  ("<think>reason <answer>B</answer></think><answer>B</answer>", False),
  ("<think>reason</think><answer>B</answer><answer>C</answer>", False),
  ("Sure! <think>reason</think><answer>B</answer>", False),          # text outside
  ("<think>reason</think> so <answer>B</answer>", False),
  ("<think>reason</think><answer>B</answer> Hope this helps", False),
])
def test_format(text, ok):
  assert F.split_response(text).format_ok is ok
  assert F.get("reward", "format")(text, MCQA) == float(ok)


def test_split_parts_and_think_in_prompt():
  parts = F.split_response("<think>r1</think><answer>B</answer> then <answer>(D)</answer>")
  assert parts == F.ResponseParts("r1", "(D)", False)                 # last answer block
  assert F.split_response("<think>unclosed <answer>C</answer>") == F.ResponseParts("unclosed ", "C", False)
  assert F.split_response("no tags at all") == F.ResponseParts(None, None, False)
  # the prompt ended with "<think>": the completion continues the thought
  tail = "reasoning</think><answer>B</answer>"
  assert F.split_response(tail, think_in_prompt=True) == F.ResponseParts("reasoning", "B", True)
  assert not F.split_response(tail).format_ok
  assert not F.split_response("<think>" + tail, think_in_prompt=True).format_ok   # opened twice
  assert F.format_reward(tail, {"answer": "B", "think_in_prompt": True}) == 1.0


# --------------------------------------------------------------------------------------------- MCQA choice

@pytest.mark.parametrize("completion, choice", [
  ("<think>x</think><answer>B</answer>", "B"),
  ("<think>x</think><answer>(b)</answer>", "B"),
  ("<think>x</think><answer>B.</answer>", "B"),
  ("<think>x</think><answer>[C]</answer>", "C"),
  ("<think>x</think><answer>B) Heparin</answer>", "B"),
  ("<think>x</think><answer>(D) Warfarin</answer>", "D"),
  ("<think>x</think><answer>The answer is (C)</answer>", "C"),
  ("<think>x</think><answer>the answer is c.</answer>", "C"),
  ("<think>x</think><answer>Final answer: **D**</answer>", "D"),
  ("<think>x</think><answer>\\boxed{A}</answer>", "A"),
  ("<think>x</think><answer>Option B</answer>", "B"),
  ("<think>x</think><answer>I choose B</answer>", "B"),
  ("<think>x</think><answer>The correct answer is: B</answer>", "B"),
  ("<think>x</think><answer>The answer is B, I think</answer>", "B"),  # "I" the pronoun is no second option
  ("<think>x</think><answer>The answer is Heparin (B)</answer>", "B"),
  ("<think>x</think><answer>A</answer>", "A"),
  ("<think>x</think><answer>B, a heparin-like drug</answer>", "B"),
  ("<think>x</think><answer>heparin</answer>", "B"),                  # the option text
  ("<think>x</think><answer>Aspirin and heparin.</answer>", "C"),     # not A although it contains "aspirin"
  ("<think>x</think><answer>B</answer><answer>D</answer>", "D"),      # last block wins
  ("<think>x <answer>A</answer></think><answer>C</answer>", "C"),
  ("<think>x</think><answer>C", "C"),                                 # sampler stopped on </answer>
  ("<think>x</think>The answer is D.", "D"),                          # no answer tag: after the thought
  (" B\n\nQuestion: next one ... Answer: C", "B"),                    # plain prompt, base model rambles on
  ("Answer: (a)", "A"),
  # absent or ambiguous -> None
  ("<think>x</think><answer>A or B</answer>", None),
  ("<think>x</think><answer>The answer is B or C</answer>", None),
  ("<think>x</think><answer>(B) and (C)</answer>", None),
  ("<think>x</think><answer>B/C</answer>", None),
  ("<think>x</think><answer>E</answer>", None),                       # not an option
  ("<think>x</think><answer>I am not sure</answer>", None),
  ("<think>x</think><answer></answer>", None),
  ("<think>still thinking, maybe B", None),                           # the thought never ended
  ("<think>x</think><answer>a drug that thins blood</answer>", None),
])
def test_extract_choice(completion, choice):
  assert F.extract_choice_from(completion, MCQA) == choice
  assert F.mcqa_accuracy(completion, MCQA) == float(choice == "B")


def test_extract_choice_letters_and_default_options():
  assert F.extract_choice("<answer>G</answer>") == "G"                # default letters A..J
  assert F.extract_choice("<answer>G</answer>", letters="ABCD") is None
  assert F.extract_choice("<answer>Heparin</answer>") is None         # no options: text is not a letter
  assert F.extract_choice("<answer>Heparin</answer>", options=OPTIONS) == "B"
  # options as a plain list (lettered A, B, ...), as in raw MMLU-Pro rows
  assert F.extract_choice_from("<answer>warfarin</answer>", {"answer": "D", "options": list(OPTIONS.values())}) == "D"


# --------------------------------------------------------------------------------------------- answer leak

@pytest.mark.parametrize("completion, leak", [
  ("<think>Heparin acts fast. The answer is B.</think><answer>B</answer>", True),
  ("<think>Answer: B</think><answer>B</answer>", True),
  ("<think>The correct option is (B), because ...</think><answer>B</answer>", True),
  ("<think>Heparin thins blood. So B.</think><answer>B</answer>", True),
  ("<think>Therefore, (B).</think><answer>B</answer>", True),
  ("<think>B</think><answer>B</answer>", True),                       # minimal "reasoning" = the answer
  ("<think>the answer is heparin</think><answer>B</answer>", True),   # option text stated as the answer
  ("<think>reasoning <answer>B</answer></think><answer>B</answer>", True),   # answer tag inside the thought
  ("<think><answer>B</answer> because</think><answer>B</answer>", True),
  ("<think>x</think>", False),                                        # nothing final to reveal, no statement
  # not a leak: options mentioned while reasoning
  ("<think>Option B is unlikely here; A fits.</think><answer>A</answer>", False),
  ("<think>B and C are both anticoagulants; rule out D.</think><answer>B</answer>", False),
  ("<think>Heparin (B) acts within minutes, warfarin takes days.</think><answer>B</answer>", False),
  ("<think>A patient with a clot needs an anticoagulant.</think><answer>B</answer>", False),
  ("<think>Is the answer B? Consider the timing.</think><answer>B</answer>", False),
  ("<think>the answer is not heparin</think><answer>D</answer>", False),
  ("<think>Answer: B. Hmm, wait, no.</think><answer>D</answer>", False),   # stated a different letter
  ("<answer>B</answer>", False),                                      # no thought at all
  ("<think>unclosed <answer>B</answer>", False),                      # a format failure, not a leak
])
def test_answer_leak(completion, leak):
  assert F.detect_answer_leak(completion, MCQA) is leak
  assert F.get("reward", "answer_leak")(completion, MCQA) == float(leak)


def test_answer_statements():
  assert F.answer_statements("The answer is B. Then again, Answer: C") == ["B", "C"]
  assert F.answer_statements("option B is unlikely, B and C are similar") == []
  assert F.answer_statements("Thus it is D.") == ["D"]
  assert F.answer_statements("I picked a") == []


# --------------------------------------------------------------------------------------------- math

@pytest.mark.parametrize("completion, number", [
  ("<think>x</think><answer>42</answer>", "42"),
  ("<think>x</think><answer>-7</answer>", "-7"),
  ("<think>x</think><answer>3.50.</answer>", "3.5"),
  ("<think>x</think><answer>\\boxed{\\frac{1}{2}}</answer>", "0.5"),
  ("<think>x</think><answer>-\\dfrac{6}{4}</answer>", "-1.5"),
  ("<think>x</think><answer>2/3</answer>", "2/3"),
  ("<think>x</think><answer>1,234,567</answer>", "1234567"),
  ("<think>x</think><answer>50\\%</answer>", "50"),
  ("<think>x</think><answer>x = \\left(5\\right)</answer>", "5"),
  ("<think>x</think><answer>12 cm</answer>", "12"),
  ("<think>x</think><answer>$\\$1{,}000.50$</answer>", "1000.5"),
  ("<think>x</think><answer>1.5 \\times 10^{3}</answer>", "1500"),
  ("<think>x</think><answer>2x+1</answer>", "2x+1"),                   # an expression stays text
  ("<think>try \\boxed{3}</think> so \\boxed{4}", "4"),               # last boxed after the thought
  ("<think>x</think>The answer is 42", "42"),
  ("<think>x</think>no final answer", None),
])
def test_extract_number(completion, number):
  assert F.extract_number(completion) == number


@pytest.mark.parametrize("predicted, reference, same", [
  ("42", "42.0", True),
  ("0.5", "\\frac{1}{2}", True),
  ("1/3", "0.3333333", True),            # rel error 1e-7 < 1e-6
  ("1/3", "0.33333", False),             # rel error 3e-5
  ("1000001", "1000000", True),          # rel error 1e-6 (at the tolerance)
  ("1000002", "1000000", False),
  ("-3", "3", False),
  ("1,234", "1234", True),
  ("50%", "50", True),                   # convention: the percent sign is dropped
  ("50%", "0.5", False),
  ("2x+1", "2x + 1", True),              # texts compared without spaces
  ("2x+1", "2x+2", False),
  ("0", "0.0", True),
  (None, "1", False),
])
def test_numbers_equivalent(predicted, reference, same):
  assert F.numbers_equivalent(predicted, reference) is same


def test_math_rewards():
  example = {"answer": "\\frac{3}{4}", "kind": "math"}
  good = "<think>3 of 4</think><answer>\\boxed{0.75}</answer>"
  bad = "<think>3 of 4</think><answer>\\boxed{0.7}</answer>"
  assert F.math_equivalence(good, example) == 1.0 and F.math_equivalence(bad, example) == 0.0
  assert F.xreasoner_reward(good, example) == 1.0 and F.xreasoner_reward(bad, example) == 0.0
  assert F.math_equivalence("<answer>12</answer>", {"answer": 12}) == 1.0    # a numeric reference


# --------------------------------------------------------------------------------------------- composite rewards

def test_medrlvr_and_xreasoner_rewards():
  medrlvr, xreasoner = F.get("reward", "medrlvr"), F.get("reward", "xreasoner")
  right = "<think>heparin is fast</think><answer>B</answer>"
  wrong = "<think>heparin is fast</think><answer>D</answer>"
  broken = "heparin is fast <answer>B</answer>"
  assert [medrlvr(t, MCQA) for t in (right, wrong, broken)] == [1.0, 0.0, -1.0]
  assert [xreasoner(t, MCQA) for t in (right, wrong, broken)] == [1.0, 0.0, 1.0]


def test_response_stats():
  stats = F.response_stats("<think> The answer is B. </think><answer>B</answer>", MCQA)
  assert stats == {"correct": 1.0, "format_ok": 1.0, "leak": 1.0, "think_chars": 16.0, "response_chars": 51.0}
  stats = F.response_stats("maybe D", MCQA)
  assert stats == {"correct": 0.0, "format_ok": 0.0, "leak": 0.0, "think_chars": 0.0, "response_chars": 7.0}
  assert all(isinstance(v, float) for v in stats.values())


def test_text_functions_are_fast_on_long_completions():
  import time

  body = "Heparin (B) acts fast. Option C is unlikely. " * 400 + "x. " * 2000   # ~24k characters
  completion = f"<think>{body}</think><answer>B</answer>" + "</think>" * 50
  start = time.perf_counter()
  for _ in range(10):
    F.response_stats(completion, MCQA)
    F.extract_number(completion)
  assert time.perf_counter() - start < 2.0
