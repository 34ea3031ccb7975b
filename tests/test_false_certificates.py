"""The six false certificates of issue 17, each reproduced: every one certified an example that
an input inside the radius flips, or accepted a bound that is false. Now each is refused or
certified honestly."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import aol_jax
def _tiny_std(**kw) -> aol_jax.AOLNetwork:
  return aol_jax.aol_std(10, rngs=nnx.Rngs(0), channels=8, num_stages=1, blocks_per_stage=1,
                        dense_width=32, dense_depth=2, image_size=8, **kw)


def test_grayscale_images_with_three_channel_normalisation_are_refused():
  """(N, H, W, 1) images and a 3-channel mean / std: the normalisation broadcast the image to
  3 identical channels, multiplying the true constant by up to sqrt(3) behind L's back."""
  model = _tiny_std(in_channels=3, input_mean=(0.5, 0.5, 0.5), input_std=(0.25, 0.3, 0.35))
  x = np.random.default_rng(0).uniform(size=(8, 8, 8, 1)).astype(np.float32)
  y = np.zeros(8, np.int32)
  with pytest.raises(ValueError, match="input_mean.*3 channels.*1"):
    model(jnp.asarray(x))
  with pytest.raises(ValueError, match="input_mean.*3 channels.*1"):
    aol_jax.certify_dataset(model, x, y, batch_size=8)
  # The broadcast really raised the constant: the map from the grey image to the first
  # layer's input has norm sqrt(sum_c 1 / std_c^2) > max(1 / std) = 4.
  true_gain = math.sqrt(sum(1 / s ** 2 for s in (0.25, 0.3, 0.35)))
  assert true_gain > 1.2 * max(1 / s for s in (0.25, 0.3, 0.35))


def _rotations(key, shape, dtype):
  """Block-diagonal 2x2 rotations by random angles: AOL keeps such a kernel (its Gram is a
  multiple of the identity) and bfloat16 then rounds each entry."""
  theta = np.asarray(jax.random.uniform(key, (shape[0] // 2,), minval=0.0, maxval=6.28))
  k = np.zeros(shape, np.float32)
  for i, t in enumerate(theta):
    k[2 * i:2 * i + 2, 2 * i:2 * i + 2] = [[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]]
  return jnp.asarray(k, dtype)


def _bf16_dense_net(seed: int) -> aol_jax.AOLNetwork:
  layer = aol_jax.AOLDense(64, 64, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16,
                           kernel_init=_rotations, rngs=nnx.Rngs(seed))
  return aol_jax.AOLNetwork([aol_jax.Flatten(), layer, aol_jax.FirstChannels(10)])


def test_a_bfloat16_model_frozen_by_the_user_is_certified_from_its_applied_kernel():
  """freeze(bf16 model) rounds the rescaled kernels to bfloat16 (norm above 1), and
  certify_dataset then widened them exactly: L must bound that kernel, not the AOL 1."""
  frozen = None
  for seed in range(20):
    candidate = aol_jax.freeze(_bf16_dense_net(seed))
    kernel = np.asarray(candidate.layers[1].kernel[...], np.float64)
    true = np.linalg.svd(kernel, compute_uv=False)[0]
    if true > 1 + 1e-4:
      frozen = candidate
      break
  assert frozen is not None, "no bfloat16 kernel above 1: the test would be vacuous"
  x = np.random.default_rng(1).uniform(size=(16, 8, 8, 1)).astype(np.float32)
  y = np.asarray(jnp.argmax(frozen(jnp.asarray(x)).astype(jnp.float32), axis=-1))
  for rounding in ("float32_statistical", "float64"):
    result = aol_jax.certify_dataset(frozen, x, y, batch_size=16, rounding=rounding)
    print(f"{rounding}: exact norm {true:.6f}, L used {result.lipschitz_constant:.6f}")
    assert result.lipschitz_constant >= true
  assert frozen.lipschitz_bound() >= true


class _LinearHead(aol_jax.AOLNetwork):
  """A subclass whose __call__ applies a module held outside ``layers``."""

  def __init__(self, layers, rngs):
    super().__init__(layers)
    self.head = nnx.Linear(10, 10, kernel_init=nnx.initializers.normal(10.0), rngs=rngs)

  def __call__(self, x):
    return self.head(super().__call__(x))


class _Doubled(aol_jax.AOLNetwork):
  """A subclass whose __call__ doubles the logits: no module outside ``layers``."""

  def __call__(self, x):
    return 2 * super().__call__(x)


def test_a_module_outside_layers_or_an_overridden_call_is_refused():
  x = np.random.default_rng(2).uniform(size=(8, 8, 8, 1)).astype(np.float32)
  y = np.zeros(8, np.int32)
  layers = lambda: [aol_jax.Flatten(), aol_jax.AOLDense(64, 10, rngs=nnx.Rngs(0))]
  head = _LinearHead(layers(), nnx.Rngs(1))
  with pytest.raises(aol_jax.certification.UndeclaredBoundError, match=r"Linear at path \('head',\)"):
    aol_jax.certify_dataset(head, x, y, batch_size=8)
  with pytest.raises(aol_jax.certification.UndeclaredBoundError, match="head"):
    head.lipschitz_bound()
  doubled = _Doubled(layers())
  with pytest.raises(aol_jax.certification.UndeclaredBoundError, match="overrides __call__"):
    aol_jax.certify_dataset(doubled, x, y, batch_size=8)
  # Nested inside a plain network, still refused, with the full path.
  outer = aol_jax.AOLNetwork([head])
  with pytest.raises(aol_jax.certification.UndeclaredBoundError, match=r"\('layers', 0, 'head'\)"):
    outer.lipschitz_bound()


@pytest.mark.parametrize("eps", [-1e-3, float("nan"), float("inf"), -float("inf")])
def test_aol_layers_refuse_a_stabiliser_eps_that_breaks_the_bound(eps):
  with pytest.raises(ValueError, match="eps"):
    aol_jax.AOLDense(4, 4, eps=eps, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="eps"):
    aol_jax.AOLConv(4, 4, (3, 3), eps=eps, rngs=nnx.Rngs(0))


def test_a_negative_eps_did_break_the_bound():
  """Why the refusal above: with eps < 0 the factors grow and the norm exceeds 1."""
  p = jnp.eye(4)
  k = aol_jax.rescale_dense(p, eps=-0.5)
  assert np.linalg.svd(np.asarray(k, np.float64), compute_uv=False)[0] > 1.4


@pytest.mark.parametrize("name,value", [("eps", -0.5), ("eps", float("nan")),
                                        ("allowance", -1.0), ("allowance", float("nan"))])
def test_the_public_rule_refuses_negative_or_nan_radii_and_allowances(name, value):
  """A misclassified example (margin -1) was 'certified' with eps or allowance < 0."""
  logits = np.array([[0.0, 1.0]], np.float32)
  labels = np.array([0])
  kwargs = {"eps": 0.0, "allowance": 0.0, name: value}
  with pytest.raises(ValueError, match=name):
    aol_jax.certify(logits, labels, kwargs["eps"], allowance=kwargs["allowance"])
  with pytest.raises(ValueError, match=name):
    aol_jax.certified_robust_accuracy(logits, labels, [kwargs["eps"]],
                                      allowance=kwargs["allowance"])


def test_worst_case_mode_certifies_around_the_float64_image_not_its_rounding():
  """The margin of a float64 image lies just below sqrt(2) eps; rounded to float32 it lay
  just above, so the float32 image was certified and a point inside the ball of the float64
  image flips it."""
  net = aol_jax.AOLNetwork([aol_jax.Flatten(), aol_jax.FirstChannels(2)])
  eps = (0.25 - 1e-10) / math.sqrt(2)
  x = np.zeros((1, 2, 2, 1), np.float64)
  x[0, 0, 0, 0], x[0, 0, 1, 0] = 0.75 - 2e-10, 0.5
  y = np.array([0])
  assert np.float32(x[0, 0, 0, 0]) == 0.75  # float32 rounds the margin up to 0.25
  for rounding in ("float64", "float32_statistical"):
    result = aol_jax.certify_dataset(net, x, y, eps_list=(eps,), batch_size=1,
                                     rounding=rounding)
    assert result.num_correct == 1 and result.num_certified == (0,), rounding
  # The flip: move mass from channel 0 to channel 1 by eps, in float64.
  x_adv = x.copy()
  x_adv[0, 0, 0, 0] -= eps / math.sqrt(2)
  x_adv[0, 0, 1, 0] += eps / math.sqrt(2)
  assert np.linalg.norm(x_adv - x) <= eps * (1 + 1e-15)
  assert x_adv[0, 0, 0, 0] <= x_adv[0, 0, 1, 0]
  # And the certificate comes back at a radius the float64 margin allows.
  ok = aol_jax.certify_dataset(net, x, y, eps_list=(0.9 * eps,), batch_size=1,
                               rounding="float64")
  assert ok.num_certified == (1,)



def test_probabilistic_mode_certifies_float64_images_at_the_radius_their_rounding_adds():
  """The float64 margin is 2.9e-8 below what float32 rounds it to, 1e-8 below sqrt(2) eps:
  certifying the rounded image at eps would be false; at eps + ||x - x32|| it is refused."""
  net = aol_jax.AOLNetwork([aol_jax.Flatten(), aol_jax.FirstChannels(2)])
  a32, b32 = np.float32(0.75), np.float32(0.75) - np.float32(2.0 ** -13)
  x = np.zeros((1, 2, 2, 1), np.float64)
  x[0, 0, 0, 0], x[0, 0, 1, 0] = float(a32) - 2.9e-8, float(b32)
  assert np.float32(x[0, 0, 0, 0]) == a32  # rounds up to a32
  m64 = x[0, 0, 0, 0] - x[0, 0, 1, 0]
  eps = (m64 + 1e-8) / math.sqrt(2)
  result = aol_jax.certify_dataset(net, x, np.array([0]), eps_list=(eps, 0.5 * eps),
                                   batch_size=1)
  assert result.num_certified == (0, 1)
  # The float32 image a float32 evaluation may see flips within eps of the float64 image.
  x_adv = x.copy()
  x_adv[0, 0, 0, 0] -= eps / math.sqrt(2)
  x_adv[0, 0, 1, 0] += eps / math.sqrt(2)
  assert x_adv[0, 0, 0, 0] < x_adv[0, 0, 1, 0]
