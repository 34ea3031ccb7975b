"""aol_jax.training.augment: the paper's augmentation, checked piece by piece against numpy, and
the paper's parameters checked at the dm_pix calls that run them."""

import colorsys
import dataclasses
import math

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aol_jax import training
from aol_jax._src.training.augment import NONE, AugmentConfig, affine_warp, augment

# Everything under test runs jitted; the config is a pytree of arrays, so one compile per shape.
augment_jit = jax.jit(augment)
warp, to_hsv, to_rgb = jax.jit(affine_warp), jax.jit(pix.rgb_to_hsv), jax.jit(pix.hsv_to_rgb)

N = 32
# The paper's augmentation (AOL, Prach & Lampert 2022, section 5: Keras RandomRotation(5/360),
# RandomTranslation(0.1, 0.1), tf.image colour jitter, random_flip_left_right).
PAPER = dict(flip=True, translate=0.1, rotate_degrees=5.0, hue=0.02, saturation=(0.3, 2.0),
             brightness=0.1, contrast=(0.5, 2.0))


def images(n=N, size=12, channels=3, lo=0.0, hi=1.0, seed=0):
  return jax.random.uniform(jax.random.key(seed), (n, size, size, channels), jnp.float32, lo, hi)


def only(**kwargs) -> AugmentConfig:
  return dataclasses.replace(NONE, **kwargs)


@pytest.mark.parametrize("channels, dtype", [(1, jnp.float32), (3, jnp.float32), (3, jnp.bfloat16)])
def test_paper_config_keeps_shape_dtype_and_range(channels, dtype):
  x = images(channels=channels).astype(dtype)
  y = augment_jit(jax.random.key(1), x)
  assert y.shape == x.shape and y.dtype == x.dtype
  assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
  assert float(jnp.abs(y.astype(jnp.float32) - x.astype(jnp.float32)).mean()) > 0.01


def test_deterministic_per_key_and_independent_per_image():
  x = jnp.broadcast_to(images(1), (N, 12, 12, 3))  # copies of one image
  a = augment_jit(jax.random.key(3), x)
  np.testing.assert_array_equal(a, augment_jit(jax.random.key(3), x))
  assert not np.array_equal(a, augment_jit(jax.random.key(4), x))
  flat = np.asarray(a).reshape(N, -1)
  assert len({row.tobytes() for row in flat}) == N  # every copy augmented differently


@pytest.mark.parametrize("channels", [1, 3])
def test_zero_strength_is_identity(channels):
  x = images(channels=channels)
  # Exact for geometry; the HSV round trip of RGB images costs float32 rounding only.
  np.testing.assert_allclose(augment_jit(jax.random.key(0), x, config=NONE), x, atol=2e-6, rtol=0)


def test_flip_is_exact_and_random():
  x = images()
  y = np.asarray(augment_jit(jax.random.key(0), x, config=only(flip=True)))
  xs = np.asarray(augment_jit(jax.random.key(0), x, config=NONE))  # HSV round trip only
  flipped = [np.array_equal(yi, xi[:, ::-1]) for yi, xi in zip(y, xs)]
  kept = [np.array_equal(yi, xi) for yi, xi in zip(y, xs)]
  assert all(f or k for f, k in zip(flipped, kept))
  assert 4 < sum(flipped) < N - 4  # about half


def test_integer_translation_is_a_reflect_padded_shift():
  x = np.asarray(images(1))[0]
  for dy, dx in [(2, -3), (-4, 1), (0, 0)]:
    y = warp(jnp.asarray(x), jnp.float32(0.0), jnp.asarray([dy, dx], jnp.float32))
    p = 5  # numpy's 'symmetric' is d c b a | a b c d | d c b a
    padded = np.pad(x, ((p, p), (p, p), (0, 0)), mode="symmetric")
    expected = padded[p - dy:p - dy + 12, p - dx:p - dx + 12]
    np.testing.assert_array_equal(np.asarray(y), expected)


def test_half_pixel_translation_is_bilinear():
  x = np.asarray(images(1))[0]
  y = np.asarray(warp(jnp.asarray(x), jnp.float32(0.0), jnp.asarray([0.0, 0.5])))
  np.testing.assert_allclose(y[:, 1:], (x[:, 1:] + x[:, :-1]) / 2, rtol=1e-6, atol=1e-7)


def test_quarter_turn_rotation():
  x = np.asarray(images(1))[0]
  y = np.asarray(warp(jnp.asarray(x), jnp.float32(math.pi / 2), jnp.zeros(2)))
  # out[i, j] = in[n - 1 - j, i] (cos(pi/2) is 4e-8 in float32, hence the tolerance).
  np.testing.assert_allclose(y, np.rot90(x, k=-1), atol=1e-5)


def test_rotation_and_translation_stay_within_the_paper_ranges():
  """Warp a 'coordinate image' and read back the per-image angle and shift."""
  n, size = 64, 41
  yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
  centre = (size - 1) / 2
  coords = np.stack([yy, xx, np.zeros_like(xx)], -1).astype(np.float32) / size
  x = jnp.broadcast_to(jnp.asarray(coords), (n, size, size, 3))
  y = np.asarray(augment_jit(jax.random.key(5), x, config=only(rotate_degrees=5.0, translate=0.1,
                                                               saturation=(1.0, 1.0))))
  # The centre pixel samples c + R(-a)(-shift): its source coordinates give the shift.
  src = y[:, int(centre), int(centre), :2] * size - centre
  shift = np.linalg.norm(src, axis=-1)
  assert shift.max() <= 0.1 * size * math.sqrt(2) + 1e-3 and shift.max() > 0.05 * size
  # Angle from the direction of the image's y axis in source space: two points on the row.
  d = y[:, int(centre) + 5, int(centre), :2] - y[:, int(centre) - 5, int(centre), :2]
  angle = np.degrees(np.arctan2(d[:, 1], d[:, 0]))
  assert np.abs(angle).max() <= 5.0 + 0.2 and np.abs(angle).max() > 2.5


def test_hsv_matches_colorsys():
  px = np.asarray(images(1))[0].reshape(-1, 3)
  hsv = np.asarray(to_hsv(jnp.asarray(px)))
  expected = np.array([colorsys.rgb_to_hsv(*p) for p in px])
  np.testing.assert_allclose(hsv, expected, atol=2e-6)
  np.testing.assert_allclose(np.asarray(to_rgb(jnp.asarray(expected, jnp.float32))), px, atol=2e-6)


def test_brightness_is_one_offset_per_image_in_range():
  x = images(lo=0.3, hi=0.7)
  y = augment_jit(jax.random.key(0), x, config=only(brightness=0.1))
  d = np.asarray(y - x).reshape(N, -1)
  np.testing.assert_allclose(d, np.broadcast_to(d[:, :1], d.shape), atol=2e-6)
  assert np.abs(d[:, 0]).max() <= 0.1 + 1e-6 and d[:, 0].std() > 0.02


def test_contrast_scales_about_the_channel_mean():
  x = images(lo=0.4, hi=0.6)
  y = np.asarray(augment_jit(jax.random.key(0), x, config=only(contrast=(0.5, 2.0))))
  xc = np.asarray(x) - np.asarray(x).mean(axis=(1, 2), keepdims=True)
  yc = y - y.mean(axis=(1, 2), keepdims=True)
  factor = (yc * xc).sum(axis=(1, 2, 3)) / (xc * xc).sum(axis=(1, 2, 3))
  np.testing.assert_allclose(yc, factor[:, None, None, None] * xc, atol=3e-6)
  assert factor.min() >= 0.5 - 1e-4 and factor.max() <= 2.0 + 1e-4 and factor.std() > 0.1


def test_hue_and_saturation():
  x = images(lo=0.2, hi=0.8)
  hx = np.asarray(to_hsv(x))
  hue = np.asarray(to_hsv(augment_jit(jax.random.key(0), x, config=only(hue=0.02))))
  d = (hue[..., 0] - hx[..., 0] + 0.5) % 1.0 - 0.5  # circular hue difference
  per_image = d.reshape(N, -1)
  np.testing.assert_allclose(per_image, np.broadcast_to(per_image.mean(1, keepdims=True),
                                                        per_image.shape), atol=1e-4)
  assert np.abs(per_image).max() <= 0.02 + 1e-4 and np.abs(per_image).max() > 0.01
  np.testing.assert_allclose(hue[..., 1:], hx[..., 1:], atol=2e-6)  # s and v untouched
  sat = np.asarray(to_hsv(augment_jit(jax.random.key(0), x, config=only(saturation=(0.3, 2.0)))))
  ratio = sat[..., 1] / hx[..., 1]
  unclipped = sat[..., 1] < 1.0
  factor = np.array([np.median(r[u]) for r, u in zip(ratio, unclipped)])
  assert factor.min() >= 0.3 - 1e-4 and factor.max() <= 2.0 + 1e-4 and factor.std() > 0.1
  np.testing.assert_allclose(sat[..., 2], hx[..., 2], atol=2e-6)  # value untouched


def test_greyscale_skips_hue_and_saturation():
  x = images(channels=1)
  y = augment_jit(jax.random.key(0), x, config=only(hue=0.5, saturation=(0.3, 2.0)))
  np.testing.assert_array_equal(y, x)


def test_sharded_batch_gives_the_same_draws():
  mesh = training.make_data_mesh(8)
  x = images()
  expected = augment_jit(jax.random.key(7), x)
  (sharded,) = training.global_batch(mesh, np.asarray(x))
  with jax.sharding.use_mesh(mesh) if hasattr(jax.sharding, "use_mesh") else jax.set_mesh(mesh):
    y = augment_jit(jax.random.key(7), sharded)
  assert y.sharding.spec[0] == "data"
  # dm_pix computes the sample coordinates with a float32 matmul whose rounding depends on the
  # per-device batch (a few ulp of a coordinate < 2 * size); with pixel values in [0, 1] the
  # output moves by at most that. Different draws would differ by ~0.1.
  atol = 4 * float(np.spacing(np.float32(2 * x.shape[1])))
  np.testing.assert_allclose(np.asarray(y), np.asarray(expected), atol=atol, rtol=0)
  assert float(jnp.abs(augment_jit(jax.random.key(8), x) - expected).max()) > 100 * atol


def test_rejects_bad_inputs():
  with pytest.raises(ValueError, match="N, H, W, C"):
    augment(jax.random.key(0), jnp.zeros((4, 4, 3)))
  with pytest.raises(ValueError, match="float"):
    augment(jax.random.key(0), jnp.zeros((1, 4, 4, 3), jnp.uint8))


def test_defaults_are_the_papers():
  assert dataclasses.asdict(AugmentConfig()) == PAPER
  assert AugmentConfig() == AugmentConfig(**PAPER)


def test_paper_parameters_are_what_runs(monkeypatch):
  """Spy on the dm_pix calls: the paper's strengths are what they receive, the warp's matrix is
  a rotation within +-5 degrees and a shift within +-10 %, with reflect fill."""
  calls, warps = {}, []

  def spy(name):
    real = getattr(pix, name)

    def wrapper(*args, **kwargs):
      calls.setdefault(name, []).append((args[2:], kwargs))  # what follows (key, image)
      return real(*args, **kwargs)
    monkeypatch.setattr(pix, name, wrapper)

  for name in ["random_hue", "random_saturation", "random_brightness", "random_contrast",
               "random_flip_left_right"]:
    spy(name)
  real_affine = pix.affine_transform

  def affine(image, matrix, **kwargs):
    calls.setdefault("affine_transform", []).append(((), {k: v for k, v in kwargs.items()
                                                          if k in ("order", "mode")}))
    jax.debug.callback(lambda m, o: warps.append((np.asarray(m), np.asarray(o))), matrix,
                       kwargs["offset"])
    return real_affine(image, matrix, **kwargs)
  monkeypatch.setattr(pix, "affine_transform", affine)

  n, size = 64, 20
  jax.block_until_ready(augment(jax.random.key(0), images(n, size)))  # eager: plain floats
  assert calls == {
      "random_hue": [((), dict(max_delta=0.02))],
      "random_saturation": [((0.3, 2.0), {})],
      "random_brightness": [((), dict(max_delta=0.1))],
      "random_contrast": [((0.5, 2.0), {})],
      "random_flip_left_right": [((), dict(probability=0.5))],
      "affine_transform": [((), dict(order=1, mode="reflect"))],  # bilinear, d c b a | a b c d
  }
  m = np.concatenate([a.reshape(-1, 3, 3) for a, _ in warps])  # one callback per batch
  offset = np.concatenate([o.reshape(-1, 3) for _, o in warps])
  assert len(m) == n
  np.testing.assert_allclose(m[:, 2], np.broadcast_to([0, 0, 1], (n, 3)))  # channels kept
  np.testing.assert_allclose(m[:, :2, 2], 0)
  np.testing.assert_allclose(offset[:, 2], 0)
  rotation = m[:, :2, :2]
  np.testing.assert_allclose(rotation @ rotation.transpose(0, 2, 1),
                             np.broadcast_to(np.eye(2), (n, 2, 2)), atol=1e-6)
  angle = np.degrees(np.arctan2(rotation[:, 1, 0], rotation[:, 0, 0]))
  assert np.abs(angle).max() <= 5.0 + 1e-4 and angle.min() < -4.0 and angle.max() > 4.0
  # Input sample = M p + offset = c + M (p - shift - c)  =>  shift = M^T (c - offset) - c.
  centre = np.full(2, (size - 1) / 2)
  shift = np.einsum("nji,nj->ni", rotation, centre - offset[:, :2]) - centre
  assert np.abs(shift).max() <= 0.1 * size + 1e-4
  assert (shift.min(0) < -0.08 * size).all() and (shift.max(0) > 0.08 * size).all()  # y and x
