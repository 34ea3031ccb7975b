"""certified_radii: the same decision as certify_dataset at every radius, and no attack
inside a certified radius flips a prediction."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import aol_jax
from aol_jax._src.certification.certifier import float_radii
from support.certification import digits_like, tiny_std_model, trained_like


def _model():
  return trained_like(tiny_std_model(), 0.3, seed=11)


@pytest.mark.parametrize("rounding", ["float32_statistical", "float64"])
def test_radii_reproduce_certify_dataset_at_every_radius(rounding):
  """For every eps, sum(pred == labels & radii > eps) is certify_dataset's count, radii
  included as eps (the boundary) and their float neighbours, float64 images included."""
  model = _model()
  images, labels = digits_like(45, seed=2)
  if rounding == "float32_statistical":
    images = images.astype(np.float64) + 1e-9  # certified at eps + ||x - x32||
  preds, radii = aol_jax.certified_radii(model, images, batch_size=16, rounding=rounding)
  assert preds.shape == radii.shape == (45,) and radii.dtype == np.float64
  assert np.all(radii >= 0) and np.sum(radii > 0) > 0
  positive = radii[radii > 0]
  eps = np.unique(np.concatenate([
      [0.0, 1e-3, 36 / 255, 1.0], positive, np.nextafter(positive, 0),
      np.nextafter(positive, np.inf), float_radii(positive * 0.999, np.float32)]))
  result = aol_jax.certify_dataset(model, images, labels, eps_list=eps, batch_size=16,
                                   rounding=rounding)
  ours = tuple(int(np.sum((preds == labels) & (radii > e))) for e in eps)
  assert ours == result.num_certified
  assert len(set(ours)) > 3  # the radii are spread over the list, not all above or below


def test_radii_of_a_tie_and_of_a_batch_are_consistent():
  """A batch split differently (and a mesh) gives the same predictions and radii up to the
  float32 rounding of the logits; an example whose logits tie gets radius 0."""
  model = _model()
  images, _ = digits_like(20, seed=3)
  a = aol_jax.certified_radii(model, images, batch_size=7)
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  b = aol_jax.certified_radii(model, images, batch_size=5, mesh=mesh)
  np.testing.assert_array_equal(a[0], b[0])
  # Another batch shape may sum the float32 logits in another order (it does with
  # --xla_cpu_max_isa=SSE4_2): the margins then move by a few ulps of the logits, and a
  # radius by that over sqrt(2) L (its allowance, computed from the activations, moves by
  # ulps of itself): far inside the allowance the radii are certified with.
  logits = np.asarray(aol_jax.freeze(model)(jnp.asarray(images)))
  ulps = 16 * 2.0 ** -24 * float(np.max(np.abs(logits)))
  np.testing.assert_allclose(a[1], b[1], rtol=1e-5, atol=ulps / math.sqrt(2))
  zero = aol_jax.certified_radii(aol_jax.AOLNetwork([aol_jax.Flatten(), aol_jax.FirstChannels(2)]),
                                 np.zeros((3, 2, 2, 1), np.float32), batch_size=2)
  np.testing.assert_array_equal(zero[1], 0.0)


def test_pgd_inside_the_radius_flips_no_certified_prediction():
  """PGD at 0.98 x each certified radius, from every certified example: no flip."""
  model = _model()
  images, _ = digits_like(40, seed=4)
  preds, radii = aol_jax.certified_radii(model, images, batch_size=20)
  keep = radii > 0
  assert keep.sum() >= 10
  frozen = aol_jax.freeze(model, dtype=jnp.float32)
  x, y, r = jnp.asarray(images[keep]), jnp.asarray(preds[keep]), 0.98 * radii[keep]
  with jax.default_matmul_precision("highest"):
    adv, margin = aol_jax.pgd_l2(frozen, x, y, jnp.asarray(r, jnp.float32), steps=50,
                                 clip=(0.0, 1.0))
    dist = np.linalg.norm(np.asarray(adv - x).reshape(len(r), -1), axis=1)
    assert np.all(dist <= r * (1 + 1e-5))
    assert np.all(np.asarray(margin) > 0)
    # The same attack does flip predictions once allowed far enough: it is not toothless.
    _, far = aol_jax.pgd_l2(frozen, x, y, jnp.asarray(30 * r, jnp.float32), steps=50,
                            clip=(0.0, 1.0))
  print("smallest margin inside 0.98 r:", float(np.min(margin)), "flips at 30 r:",
        int(np.sum(np.asarray(far) <= 0)), "of", len(r))
  assert np.any(np.asarray(far) <= 0)


def test_certified_radii_rejects_bad_input():
  model = _model()
  images, _ = digits_like(4, seed=1)
  with pytest.raises(ValueError, match="rounding"):
    aol_jax.certified_radii(model, images, batch_size=2, rounding="exact")
  with pytest.raises(ValueError, match="batch_size"):
    aol_jax.certified_radii(model, images, batch_size=0)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    aol_jax.certified_radii(model, images * 3, batch_size=2)
