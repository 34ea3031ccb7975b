"""Splitting the AOL rescaling over a mesh axis: same values and gradients, 1/n of the work,
decided by the layers' static ``rescaling_axis`` (``nnx.view``) and nothing else.

Runs on the 8 simulated CPU devices of ``conftest.py``. Compiler counts (FLOPs from
``cost_analysis()``) stand in for timings.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from aol_jax import training
from aol_jax._src import rescaled_apply, rescaling
from aol_jax._src.losses import offset_cross_entropy
from aol_jax import AOLConv, AOLDense, aol_convnet

# Factors of float32 Gram rows summed in different blocks: a few ulp, far below any slip.
RTOL, ATOL = 1e-5, 1e-7


@pytest.fixture(scope="module")
def mesh():
  return training.make_data_mesh(8)


# (kernel shape, feature_group_count or None for dense): input features 12 and 5 are not
# multiples of 8 (zero-padded blocks), 3 of them fewer than the devices.
CASES = [((3, 3, 16, 10), 1), ((3, 3, 5, 7), 1), ((2, 3), None), ((20, 9), None),
         ((3, 6, 8), 2), ((1, 1, 48, 16), 1), ((2, 2, 2, 3, 4), 1)]


def _rescale(g):
  if g is None:
    return lambda k, **kw: rescaling.rescale_dense(k, **kw)
  return lambda k, **kw: rescaling.rescale_conv(k, feature_group_count=g, **kw)


def _loss_and_grad(fn, weights):
  return jax.jit(jax.value_and_grad(lambda k: jnp.sum(jnp.sin(fn(k) * weights))))


def _in_shard_map(mesh, fn):
  """``fn(k, axis_name='data')`` on every device of ``mesh``: each device's result stacked."""
  return jax.shard_map(lambda k: fn(k, axis_name="data")[None], mesh=mesh, in_specs=P(),
                       out_specs=P("data"))


@pytest.mark.parametrize("shape,g", CASES)
def test_split_rescaling_matches_the_unsplit(mesh, shape, g):
  """Values (on every device) and gradients with ``axis_name=`` inside a ``shard_map``
  equal the unsplit rescaling's."""
  rng = np.random.default_rng(sum(shape))
  kernel = jnp.asarray(rng.normal(size=shape), jnp.float32)
  weights = jnp.asarray(rng.normal(size=shape), jnp.float32)
  rescale = _rescale(g)
  want_loss, want_grad = _loss_and_grad(rescale, weights)(kernel)
  want_value = rescale(kernel)

  def loss_in_shard_map(k):
    # Each device holds the whole rescaled kernel; 1/8 of the loss each, summed.
    local = lambda k: jax.lax.psum(jnp.sum(jnp.sin(rescale(k, axis_name="data") * weights)) / 8,
                                   "data")
    return jax.shard_map(local, mesh=mesh, in_specs=P(), out_specs=P())(k)

  with jax.set_mesh(mesh):
    replicated = jax.device_put(kernel, NamedSharding(mesh, P()))
    values = jax.jit(_in_shard_map(mesh, rescale))(replicated)
    assert values.shape == (8, *shape)
    for value in values:
      np.testing.assert_allclose(value, want_value, rtol=RTOL, atol=ATOL)
    loss, grad = jax.jit(jax.value_and_grad(loss_in_shard_map))(replicated)
    np.testing.assert_allclose(loss, want_loss, rtol=RTOL)
    np.testing.assert_allclose(grad, want_grad, rtol=RTOL, atol=ATOL)


def test_split_does_a_share_of_the_gram_work(mesh):
  """The split gradient of one 3x3 192-channel kernel costs ~1/8 of the unsplit's FLOPs."""
  kernel = jnp.zeros((3, 3, 192, 192), jnp.float32)
  whole = lambda k: jnp.sum(rescaling.rescale_conv(k) ** 2)
  split = jax.shard_map(lambda k: jax.lax.psum(jnp.sum(rescaling.rescale_conv(
      k, axis_name="data") ** 2) / 8, "data"), mesh=mesh, in_specs=P(), out_specs=P())
  flops = {}
  with jax.set_mesh(mesh):
    replicated = jax.device_put(kernel, NamedSharding(mesh, P()))
    for name, f in (("whole", whole), ("split", split)):
      flops[name] = jax.jit(jax.grad(f)).lower(replicated).compile().cost_analysis()["flops"]
  assert flops["split"] <= flops["whole"] / 8 * 1.1, flops


def test_custom_derivative_matches_autodiff_of_the_reference():
  """The hand-written backward of the factors equals autodiff of the reference formulas
  (self-convolution Gram for conv, the ``q``-path's autodiff for dense)."""
  rng = np.random.default_rng(0)
  conv = jnp.asarray(rng.normal(size=(3, 3, 6, 5)), jnp.float32)
  dense = jnp.asarray(rng.normal(size=(7, 4)), jnp.float32)
  pairs = [
      (lambda k: rescaling.conv_factors(k), lambda k: rescaling.conv_factors(k, method="conv"),
       conv),
      (lambda k: rescaling.conv_factors(k), lambda k: rescaling.conv_factors(k, q=jnp.ones(6)),
       conv),
      (lambda k: rescaling.dense_factors(k), lambda k: rescaling.dense_factors(k, q=jnp.ones(7)),
       dense),
  ]
  for fast, reference, kernel in pairs:
    w = jnp.asarray(rng.normal(size=fast(kernel).shape), jnp.float32)
    got = jax.jit(jax.grad(lambda k: jnp.sum(jnp.cos(fast(k) * w))))(kernel)
    want = jax.jit(jax.grad(lambda k: jnp.sum(jnp.cos(reference(k) * w))))(kernel)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6)


def tiny_model():
  return aol_convnet(10, width=4, channels=12, conv_depth=1, dense_depth=2, pool=2,
                     image_size=8, rngs=nnx.Rngs(0))


def _aol_layers(model):
  return [m for _, m in nnx.iter_modules(model) if isinstance(m, (AOLConv, AOLDense))]


def test_nnx_view_sets_the_axis_on_a_copy_and_checks_it():
  model = tiny_model()
  split = nnx.view(model, rescaling_axis="data")
  assert {m.rescaling_axis for m in _aol_layers(split)} == {"data"}
  assert {m.rescaling_axis for m in _aol_layers(model)} == {None}  # the original is unchanged
  assert {m.rescaling_axis for m in _aol_layers(nnx.view(split, rescaling_axis=None))} == {None}
  assert {m.rescaling_axis for m in _aol_layers(nnx.view(split, gram_precision="high"))} == {
      "data"}  # a view that does not name the axis keeps it
  with pytest.raises(ValueError, match="rescaling_axis must be a mesh axis name or None"):
    nnx.view(model, rescaling_axis=3)
  with pytest.raises(ValueError, match="gram_precision='fp8' is not one of"):
    nnx.view(model, gram_precision="fp8")
  scaled = nnx.view(split, scaled_operand="input")
  assert {(m.rescaling_axis, m.scaled_operand) for m in _aol_layers(scaled)} == {("data", "input")}
  assert {m.scaled_operand for m in _aol_layers(model)} == {"kernel"}
  with pytest.raises(ValueError, match=r"scaled_operand must be one of \('kernel', 'input', "
                                       r"'smaller'\), got 'output'"):
    nnx.view(model, scaled_operand="output")
  layer = _aol_layers(nnx.view(model, rescaling_axis=None))[0]
  layer.scaled_operand = "output"  # set after the view: refused at the call, not ignored
  with pytest.raises(ValueError, match=r"AOLConv.scaled_operand is 'output'; it must be one "
                                       r"of \('kernel', 'input', 'smaller'\)"):
    layer(jnp.ones((1, 4, 4, 12)))


@pytest.mark.parametrize("batch,scaled", [(1, "input"), (8, "input"), (9, "kernel")])
def test_the_smaller_operand_is_the_input_up_to_twice_the_kernels_size(batch, scaled):
  """'smaller' scales the input where it has at most INPUT_TO_KERNEL (2) times the kernel's
  elements: a (batch, 4) input against a 4 x 4 kernel. The kernel path names the rescaled
  kernel it recomputes in the backward pass; the input path forms none."""
  assert rescaled_apply.INPUT_TO_KERNEL == 2
  layer = nnx.view(AOLDense(4, 4, rngs=nnx.Rngs(0)), scaled_operand="smaller")
  jaxpr = str(jax.make_jaxpr(layer)(jnp.ones((batch, 4))))
  assert ("name=aol_rescaled_kernel" in jaxpr) == (scaled == "kernel"), jaxpr
  want = nnx.view(layer, scaled_operand=scaled)
  assert str(jax.make_jaxpr(want)(jnp.ones((batch, 4)))) == jaxpr


@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16, jnp.int32])
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_scaling_the_input_keeps_the_dtypes_and_bfloat16_kernels_keep_their_rounding(
    x_dtype, param_dtype):
  """Every scaled operand gives the output dtype of 'kernel' for any input dtype. A
  bfloat16 kernel is rescaled and rounded to bfloat16 (the kernel ``applied_kernel`` and
  the stated bound describe); scaling the input instead would apply the unrounded product,
  so it keeps the kernel path for every operand."""
  layers = {m: nnx.view(AOLDense(4, 3, param_dtype=param_dtype, rngs=nnx.Rngs(0)),
                        scaled_operand=m) for m in ("kernel", "input", "smaller")}
  x = jnp.arange(8).reshape(2, 4).astype(x_dtype)
  want = layers["kernel"](x)
  for m, layer in layers.items():
    y = layer(x)
    assert y.dtype == want.dtype, (m, y.dtype, want.dtype)
    kernel_path = "name=aol_rescaled_kernel" in str(jax.make_jaxpr(layer)(x))
    assert kernel_path == (m == "kernel" or param_dtype == jnp.bfloat16), m
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want, np.float32),
                               rtol=1e-5, atol=1e-6)


def test_training_scales_the_smaller_operand_on_a_tpu_and_merge_model_the_kernel(monkeypatch):
  """create_train_state's choice by the mesh's platform (a TPU: 'smaller'; the CPU:
  'kernel'), and merge_model's model, used for bounds and certification, applies the
  kernels whatever the steps used."""
  from types import SimpleNamespace
  from aol_jax._src.training import step as step_lib
  on = lambda platform: SimpleNamespace(devices=np.array([SimpleNamespace(platform=platform)]))
  assert step_lib._scaled_operand(on("tpu")) == "smaller"
  assert step_lib._scaled_operand(on("gpu")) == step_lib._scaled_operand(on("cpu")) == "kernel"
  assert step_lib._scaled_operand(None) == "kernel"  # this machine's default device, a CPU
  monkeypatch.setattr(step_lib, "_scaled_operand", lambda mesh: "smaller")
  optimizer = training.make_optimizer(training.paper_schedule(0.1, 2, 2))
  graphdef, state = training.create_train_state(tiny_model(), optimizer, key=0)
  assert {m.scaled_operand for m in _aol_layers(nnx.merge(graphdef, state.params,
                                                           state.rest))} == {"smaller"}
  merged = training.merge_model(graphdef, state)
  assert {m.scaled_operand for m in _aol_layers(merged)} == {"kernel"}


def test_a_split_layer_traced_without_its_mesh_axis_is_a_clear_error(mesh):
  """The split is decided by the layer's attribute alone: traced outside a mesh (or under
  one without the axis) it raises one line naming the axis and both fixes; it never
  silently computes the whole rescaling."""
  x = jnp.ones((8, 8, 8, 3))
  model = nnx.view(tiny_model(), rescaling_axis="data")
  fixes = r"call it under jax.set_mesh\(mesh\) with a mesh axis 'data', or take " \
          r"nnx.view\(model, rescaling_axis=None\)"
  with pytest.raises(ValueError, match=r"^AOLConv splits its rescaling over mesh axis 'data' "
                                       r".* traced outside any mesh: " + fixes) as e:
    jax.jit(lambda x: model(x))(x)
  assert "\n" not in str(e.value)
  other = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Explicit,))
  with jax.set_mesh(other), pytest.raises(
      ValueError, match=r"traced under a mesh with axes \('batch',\): " + fixes):
    jax.jit(lambda x: model(x))(x)
  nnx.view(model, rescaling_axis=None)(x)  # the fix the message names


@pytest.mark.parametrize("operand", ["kernel", "input"])
def test_layers_split_in_a_users_jit(mesh, operand):
  """A user's own jit under jax.set_mesh on a model viewed with rescaling_axis='data' (and
  either scaled operand): the same logits and gradients as the unsplit model with its
  kernels scaled, and the compiled program sums the factors' row sums over the devices (it
  did split)."""
  model = tiny_model()
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.uniform(size=(16, 8, 8, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, 16), jnp.int32)

  def make(axis, scaled_operand="kernel"):
    graphdef, params = nnx.split(nnx.view(model, rescaling_axis=axis,
                                          scaled_operand=scaled_operand))

    def loss_fn(params, x, y):
      logits = nnx.merge(graphdef, params)(x)
      return offset_cross_entropy(logits, y), logits
    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True)), params

  with jax.set_mesh(mesh):
    split, params = make("data", operand)
    whole, _ = make(None)
    x, y = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (x, y))
    params = jax.device_put(params, NamedSharding(mesh, P()))
    (loss, logits), grads = split(params, x, y)
    (want_loss, want_logits), want_grads = whole(params, x, y)
    np.testing.assert_allclose(logits, want_logits, rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(loss, want_loss, rtol=RTOL)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
      np.testing.assert_allclose(g, w, rtol=RTOL, atol=1e-6)
    reduced = lambda f: re.findall(r"all-reduce\(", f.lower(params, x, y).compile().as_text())
    # Whole: the gradients' all-reduce only. Split: the factors' sums are reduced too.
    assert len(reduced(split)) > len(reduced(whole)) >= 1
    with pytest.raises(ValueError, match="batch of 12: use a batch that is a multiple of 8"):
      split.trace(params, jax.ShapeDtypeStruct((12, 8, 8, 3), jnp.float32),
                  jax.ShapeDtypeStruct((12,), jnp.int32))


def test_create_train_state_decides_the_split(mesh):
  """``create_train_state`` is where the split is decided: on by default on 8 devices, off on
  one or when asked, refused without a 'data' axis; ``merge_model`` gives the unsplit model.
  On the CPU the factors scale the kernels (the input on a TPU: test_compile_targets)."""
  optimizer = training.make_optimizer(training.paper_schedule(0.1, 2, 2))
  axes = lambda graphdef, state: {m.rescaling_axis for m in _aol_layers(
      nnx.merge(graphdef, state.params, state.rest))}
  assert axes(*training.create_train_state(tiny_model(), optimizer, key=0, mesh=mesh)) == {
      "data"}
  for kw in (dict(mesh=mesh, split_rescaling=False), dict(mesh=training.make_data_mesh(1)),
             dict()):
    assert axes(*training.create_train_state(tiny_model(), optimizer, key=0, **kw)) == {None}
  graphdef, state = training.create_train_state(tiny_model(), optimizer, key=0, mesh=mesh,
                                                gram_precision="bfloat16")
  merged = training.merge_model(graphdef, state)
  assert {(m.rescaling_axis, m.gram_precision, m.scaled_operand)
          for m in _aol_layers(merged)} == {(None, "bfloat16", "kernel")}
  other = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Explicit,))
  with pytest.raises(ValueError, match=r"split_rescaling needs a mesh axis 'data' to split "
                                       r"over, got a mesh with axes \('batch',\)"):
    training.create_train_state(tiny_model(), optimizer, key=0, mesh=other)
  with pytest.raises(ValueError, match="got no mesh; pass mesh=make_data_mesh()"):
    training.create_train_state(tiny_model(), optimizer, key=0, split_rescaling=True)


def _train_flops(num_devices: int) -> float:
  mesh = training.make_data_mesh(num_devices)
  optimizer = training.make_optimizer(training.paper_schedule(0.1, 2, 2))
  # Rescaling-heavy on purpose (batch 16): unsplit, the rescaling alone would keep the
  # per-device FLOPs of 8 devices near those of 4.
  model = aol_convnet(10, width=8, channels=32, conv_depth=2, dense_depth=2, pool=2,
                      image_size=16, rngs=nnx.Rngs(0))
  graphdef, state = training.create_train_state(model, optimizer, key=0, mesh=mesh)
  step = training.make_train_step(graphdef, optimizer, mesh)
  images = jax.ShapeDtypeStruct((16, 16, 16, 3), jnp.uint8, sharding=training.data_sharding(mesh))
  labels = jax.ShapeDtypeStruct((16,), jnp.int32, sharding=training.data_sharding(mesh))
  with jax.set_mesh(mesh):
    compiled = step.jitted.trace(state, images, labels).lower().compile()
  return float(compiled.cost_analysis()["flops"])


def test_train_step_flops_per_device_scale_with_devices():
  """Compiler-counted per-device FLOPs of make_train_step: 8 devices do <= 0.6x of what
  4 devices do, at the same global batch."""
  four, eight = _train_flops(4), _train_flops(8)
  assert eight <= 0.6 * four, (eight, four)
