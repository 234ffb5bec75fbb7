"""Zero-shot prompts, classifier (CLIP prompt ensembling) and scores against scipy/numpy references."""

import hashlib

import numpy as np
import pytest
from scipy.special import expit, softmax

from mlx_med.embed import zeroshot as zs

E = 12


def fake_embed_texts(texts):
  """A deterministic, unnormalised vector per string (scaled differently to test normalisation)."""
  out = []
  for t in texts:
    seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    out.append(rng.normal(size=E) * (1 + len(t) % 5))
  return np.stack(out)


def test_parse_and_prompts():
  assert zs.parse_list(" xray/nodule; ct/mass ;;") == ["xray/nodule", "ct/mass"]
  with pytest.raises(zs.ZeroShotInputError, match="no labels given"):
    zs.parse_list(" ; ")
  with pytest.raises(zs.ZeroShotInputError, match="repeats 'a'"):
    zs.parse_list("a;b;a")
  templates = zs.parse_templates("a {domain} showing {finding}.;{finding}.")
  assert zs.prompts_for("xray/pleural_effusion", templates) == ["a chest x-ray showing pleural effusion.",
                                                                  "pleural effusion."]
  assert zs.prompts_for("mri/lesion", templates, {"mri": "brain mri"})[0] == "a brain mri showing lesion."
  assert zs.prompts_for("mri/lesion", templates)[0] == "a mri showing lesion."
  assert zs.prompts_for("pneumonia", templates)[0] == "a medical image showing pneumonia."
  with pytest.raises(zs.ZeroShotInputError, match="has no {finding}"):
    zs.parse_templates("a {domain} image")
  with pytest.raises(zs.ZeroShotInputError, match=r"unknown field\(s\) \['organ'\]"):
    zs.parse_templates("{finding} in the {organ}")
  assert len(zs.parse_templates(None)) == len(zs.DEFAULT_TEMPLATES) >= 3


def test_text_classifier_is_the_renormalised_mean():
  labels = ["xray/nodule", "ct/mass", "melanoma"]
  classifier = zs.text_classifier(fake_embed_texts, "xray/nodule;ct/mass;melanoma")
  assert classifier.shape == (3, E)
  for k, label in enumerate(labels):
    emb = fake_embed_texts(zs.prompts_for(label, zs.DEFAULT_TEMPLATES))
    mean = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).mean(axis=0)
    np.testing.assert_allclose(classifier[k], mean / np.linalg.norm(mean), rtol=1e-6, atol=1e-7)
  with pytest.raises(zs.ZeroShotInputError, match="returned shape"):
    zs.text_classifier(lambda texts: np.zeros((1, E)), labels)


def test_scores_softmax_and_sigmoid():
  rng = np.random.default_rng(0)
  img = rng.normal(size=(9, E)) * 3
  cls = zs.text_classifier(fake_embed_texts, ["a/x", "a/y", "b/z", "w"])
  scale = np.log(1 / 0.07)
  cos = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ cls.T.astype(np.float64)
  out = zs.zeroshot_scores(img, cls, scale)
  np.testing.assert_allclose(out.logits, cos / 0.07, rtol=1e-5)
  np.testing.assert_allclose(out.probs, softmax(cos / 0.07, axis=1), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(out.probs.sum(axis=1), 1, rtol=1e-6)
  sig = zs.zeroshot_scores(img, cls, np.log(10.0), logit_bias=-10.0, mode="sigmoid")
  np.testing.assert_allclose(sig.probs, expit(10 * cos - 10), rtol=1e-5, atol=1e-7)
  with pytest.raises(zs.ZeroShotInputError, match="same E"):
    zs.zeroshot_scores(img[:, :5], cls, scale)
  with pytest.raises(zs.ZeroShotInputError, match="unknown mode"):
    zs.zeroshot_scores(img, cls, scale, mode="max")


class FakeEmbedder:
  """Texts mentioning a finding point along that finding's axis; images carry their class axis."""

  findings = ["nodule", "mass", "drusen"]
  logit_scale = float(np.log(50.0))
  logit_bias = None

  def embed_texts(self, texts):
    rng = np.random.default_rng(1)
    out = rng.normal(scale=0.1, size=(len(texts), 8))
    for i, t in enumerate(texts):
      for j, f in enumerate(self.findings):
        out[i, j] += f in t
    return out / np.linalg.norm(out, axis=1, keepdims=True)

  def embed_images(self, classes):
    rng = np.random.default_rng(2)
    out = rng.normal(scale=0.3, size=(len(classes), 8))
    out[np.arange(len(classes)), classes] += 1.0
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_embedder_form_classifies():
  classes = np.repeat(np.arange(3), 20)
  out = zs.zeroshot_scores(FakeEmbedder(), classes, "xray/nodule;ct/mass;oct/drusen")
  assert out.probs.shape == (60, 3)
  assert np.mean(out.probs.argmax(axis=1) == classes) > 0.9
