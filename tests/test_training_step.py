"""aol_jax.training.step and .mesh: the sharded train step on 1 and 8 simulated devices.

The jitted steps are built once per module (fixtures) so each compiles once.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from aol_jax import training
from aol_jax._src.losses import offset_cross_entropy
from aol_jax import aol_convnet

STEPS, BATCH, LR = 4, 16, 0.1


def tiny_model(seed: int = 0) -> nnx.Module:
  return aol_convnet(10, width=4, channels=8, conv_depth=1, dense_depth=2, pool=4,
                     image_size=8, rngs=nnx.Rngs(seed))


def batches(n: int = STEPS, batch: int = BATCH, seed: int = 0):
  rng = np.random.default_rng(seed)
  return [(rng.integers(0, 256, (batch, 8, 8, 3), dtype=np.uint8),
           rng.integers(0, 10, (batch,)).astype(np.int32)) for _ in range(n)]


def flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(p)) for p in jax.tree.leaves(tree)])


class Setup:
  """A mesh, a fresh-state factory and the jitted steps over it."""

  def __init__(self, num_devices: int):
    self.mesh = training.make_data_mesh(num_devices)
    self.optimizer = training.make_optimizer(training.paper_schedule(LR, 2, 2))
    self.graphdef, _ = self.fresh()
    self.step = training.make_train_step(self.graphdef, self.optimizer, self.mesh)
    self.plain_step = training.make_train_step(self.graphdef, self.optimizer, self.mesh,
                                               augment=False)

  def fresh(self, **kw):
    return training.create_train_state(tiny_model(), self.optimizer, key=jax.random.key(42),
                                       mesh=self.mesh, **kw)

  def train(self, data, *, augment=True):
    step = self.step if augment else self.plain_step
    state = self.fresh()[1]
    history = []
    for images, labels in data:
      state, metrics = step(state, *training.global_batch(self.mesh, images, labels))
      history.append({k: float(v) for k, v in metrics.items()})
    return state, history


@pytest.fixture(scope="module")
def eight():
  return Setup(8)


def test_one_and_eight_devices_agree(eight):
  data = batches()
  state1, hist1 = Setup(1).train(data)
  state8, hist8 = eight.train(data)
  for leaf in jax.tree.leaves(state8):
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
  # The reductions over the batch are split differently: agreement up to float32 rounding.
  for key in ("loss", "accuracy", "grad_norm"):
    np.testing.assert_allclose([h[key] for h in hist8], [h[key] for h in hist1],
                               rtol=2e-6, atol=1e-7, err_msg=key)
  assert all(h["finite"] for h in hist1 + hist8)
  assert np.abs(flat(state1.params) - flat(eight.fresh()[1].params)).max() > 1e-3  # it trained
  np.testing.assert_allclose(flat(state8.params), flat(state1.params), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(flat(state8.opt_state), flat(state1.opt_state), rtol=1e-5, atol=1e-6)
  assert int(state8.step) == int(state1.step) == STEPS


def _collectives(step, setup):
  import re
  state = setup.fresh()[1]
  images, labels = training.global_batch(setup.mesh, *batches(1)[0])
  with jax.set_mesh(setup.mesh):
    hlo = step.jitted.lower(state, images, labels).compile().as_text()
  found = re.findall(r"= (f32\[[\d,]*\]|\([^)]*\))\S* (all-reduce|all-gather|reduce-scatter|"
                     r"all-to-all|collective-permute)\(", hlo)
  return hlo, found


def _reduced_shapes(found) -> list[str]:
  """The shapes of every operand of the all-reduces (XLA combines several into tuples)."""
  return sorted(re.sub(r"\{[^}]*\}", "", shape) for text, kind in found if kind == "all-reduce"
                for shape in re.findall(r"f32\[[\d,]*\]\{?[\d,]*\}?", text))


def test_step_is_data_parallel(eight):
  """Each device convolves only its share of the batch; the batch is never gathered. The
  only collectives are all-reduces. With the rescaling split (the default on 8 devices) they
  carry what the replicated rescaling's carry (the gradients) plus, per AOL kernel, two
  vectors: the factors' row and column sums of the ``n`` input features, padded to 8 blocks
  of ``ceil(n / 8)``, and the cotangent of the ``n`` factors (never a kernel-sized one)."""
  hlo, found = _collectives(eight.step, eight)
  assert {kind for _, kind in found} == {"all-reduce"}
  kernels = [leaf for leaf in jax.tree.leaves(eight.fresh()[1].params) if leaf.ndim >= 2]
  assert kernels
  conv_batches = {int(m) for m in re.findall(r"= f32\[(\d+),[\d,]*\]\{[^}]*\} convolution\(", hlo)}
  assert BATCH // 8 in conv_batches and BATCH not in conv_batches
  replicated = training.make_train_step(eight.fresh(split_rescaling=False)[0], eight.optimizer,
                                        eight.mesh)
  rep_found = _collectives(replicated, eight)[1]
  assert {kind for _, kind in rep_found} == {"all-reduce"}
  sums = [v for k in kernels for v in (f"f32[{-(-k.shape[-2] // 8) * 8}]", f"f32[{k.shape[-2]}]")]
  assert _reduced_shapes(found) == sorted(_reduced_shapes(rep_found) + sums)


def test_step_matches_an_unsharded_reference(eight):
  """One step without augmentation equals plain optax on the merged model, outside jit."""
  images, labels = batches(1)[0]
  state, hist = eight.train([(images, labels)], augment=False)
  graphdef, params, rest = nnx.split(tiny_model(), nnx.Param, ...)

  def loss_fn(p):
    model = nnx.merge(graphdef, p, rest)
    return offset_cross_entropy(model(jnp.asarray(images, jnp.float32) / 255.0), labels)

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)  # one device, no mesh
  updates, _ = eight.optimizer.update(grads, eight.optimizer.init(params), params)
  np.testing.assert_allclose(hist[0]["loss"], float(loss), rtol=1e-6)
  np.testing.assert_allclose(hist[0]["grad_norm"], float(optax.tree.norm(grads)), rtol=1e-5)
  np.testing.assert_allclose(flat(state.params), flat(optax.apply_updates(params, updates)),
                             rtol=1e-5, atol=1e-6)


def test_augmentation_is_applied(eight):
  data = batches(1)
  _, plain = eight.train(data, augment=False)
  _, augmented = eight.train(data, augment=True)
  assert abs(plain[0]["loss"] - augmented[0]["loss"]) > 1e-4


def test_batch_not_divisible_by_devices_is_a_clear_error(eight):
  images, labels = batches(1, batch=12)[0]
  with pytest.raises(ValueError, match=r"global batch size 12 .* 8 devices.*multiple of 8"):
    training.global_batch(eight.mesh, images, labels)
  with pytest.raises(ValueError, match=r"global batch size 12 .* 8 devices"):
    eight.step(eight.fresh()[1], jnp.asarray(images), jnp.asarray(labels))


def test_eval_step_and_merge_model_give_the_model_logits(eight):
  images, labels = batches(1)[0]
  state, _ = eight.train([(images, labels)])
  eval_step = training.make_eval_step(eight.graphdef, eight.mesh)
  logits = eval_step(state, training.global_batch(eight.mesh, images)[0])
  assert logits.shape == (BATCH, 10)
  assert logits.sharding.spec == jax.sharding.PartitionSpec("data")
  expected = training.merge_model(eight.graphdef, state)(jnp.asarray(images, jnp.float32) / 255.0)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=1e-5, atol=1e-6)


def test_non_finite_loss_is_reported_and_leaves_the_state_unchanged(eight):
  images, labels = batches(1)[0]
  good = images.astype(np.float32) / 255.0
  bad = good.copy()
  bad[3, 0, 0, 0] = np.nan
  state = eight.fresh()[1]
  before = [np.asarray(x) for x in jax.tree.leaves(state)]
  state, metrics = eight.plain_step(state, *training.global_batch(eight.mesh, bad, labels))
  assert not bool(metrics["finite"]) and not np.isfinite(float(metrics["loss"]))
  for b, a in zip(before, jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), b)
  with pytest.raises(training.NonFiniteLossError, match="step 7"):
    training.check_finite(metrics, step=7)
  # The same batch without the NaN: a finite step that updates the state.
  state, metrics = eight.plain_step(state, *training.global_batch(eight.mesh, good, labels))
  assert bool(metrics["finite"]) and int(state.step) == 1
  training.check_finite(metrics)


def test_to_inputs_scales_uint8_images_only():
  x = np.array([[0, 51, 255]], np.uint8)
  np.testing.assert_allclose(training.to_inputs(jnp.asarray(x)), x / 255.0, rtol=1e-7)
  f = jnp.asarray([[0.5]], jnp.float32)
  assert training.to_inputs(f) is f
  for dtype in (np.int32, np.uint16, np.int8):
    with pytest.raises(ValueError, match=f"uint8 images.*got dtype {np.dtype(dtype).name}"):
      training.to_inputs(jnp.asarray(x.astype(dtype)))


def test_make_data_mesh(monkeypatch):
  with pytest.raises(ValueError, match="9 devices"):
    training.make_data_mesh(9)
  mesh = training.make_data_mesh()
  assert mesh.axis_names == ("data",) and mesh.devices.size == jax.device_count()
  assert mesh.axis_types == (jax.sharding.AxisType.Explicit,)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ValueError, match="must span all 8 devices"):
    training.make_data_mesh(4)


# ---- split (sharded) against replicated rescaling ----------------------------------------

SPLIT_STEPS = 5


def _run(setup, step, data, state=None):
  state = setup.fresh()[1] if state is None else state
  losses = []
  for images, labels in data:
    state, metrics = step(state, *training.global_batch(setup.mesh, images, labels))
    losses.append(float(metrics["loss"]))
  return state, losses


def _assert_states_close(a, b):
  # Different per-device splits of the same sums: float32 rounding, nothing more.
  np.testing.assert_allclose(flat(a.params), flat(b.params), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(flat(a.opt_state), flat(b.opt_state), rtol=1e-5, atol=1e-6)
  assert int(a.step) == int(b.step)
  np.testing.assert_array_equal(np.asarray(a.key), np.asarray(b.key))


@pytest.fixture(scope="module")
def replicated_step(eight):
  return training.make_train_step(eight.fresh(split_rescaling=False)[0], eight.optimizer,
                                  eight.mesh)


def test_split_and_replicated_rescaling_train_alike(eight, replicated_step):
  """5 steps with the rescaling split over 8 devices (the default) and computed whole on
  each: the same losses, parameters and optimiser state to float32 rounding."""
  data = batches(SPLIT_STEPS, seed=3)
  split_state, split_losses = _run(eight, eight.step, data)
  rep_state, rep_losses = _run(eight, replicated_step, data)
  np.testing.assert_allclose(split_losses, rep_losses, rtol=2e-6, atol=1e-7)
  assert np.abs(flat(split_state.params) - flat(eight.fresh()[1].params)).max() > 1e-3
  _assert_states_close(split_state, rep_state)


@pytest.mark.parametrize("first", ["split", "replicated"])
def test_checkpoint_resumes_across_rescaling_modes(eight, replicated_step, tmp_path, first):
  """A checkpoint written after 2 split (replicated) steps resumes in the other mode and
  reaches the state of 5 uninterrupted steps."""
  steps = {"split": eight.step, "replicated": replicated_step}
  second = "replicated" if first == "split" else "split"
  data = batches(SPLIT_STEPS, seed=4)
  state, _ = _run(eight, steps[first], data[:2])
  with training.Checkpointer(tmp_path) as ckpt:
    ckpt.save(2, state)
    ckpt.wait()
    restored, step, _ = ckpt.restore_latest(eight.fresh()[1])
  assert step == 2
  resumed, _ = _run(eight, steps[second], data[2:], state=restored)
  uninterrupted, _ = _run(eight, steps[first], data)
  _assert_states_close(resumed, uninterrupted)


# ---- Gram precision in the compiled step -------------------------------------------------

def _highest_ops(gram_precision: str) -> int:
  """Dot and conv ops at HIGHEST in the lowered (StableHLO) AOL train step on 8 devices."""
  mesh = training.make_data_mesh(8)
  optimizer = training.make_optimizer(training.paper_schedule(LR, 2, 2))
  graphdef, state = training.create_train_state(tiny_model(), optimizer, key=0, mesh=mesh,
                                                gram_precision=gram_precision)
  step = training.make_train_step(graphdef, optimizer, mesh)
  images = jax.ShapeDtypeStruct((16, 8, 8, 3), jnp.uint8, sharding=training.data_sharding(mesh))
  labels = jax.ShapeDtypeStruct((16,), jnp.int32, sharding=training.data_sharding(mesh))
  with jax.set_mesh(mesh):
    text = step.jitted.trace(state, images, labels).lower().as_text()
  ops = [line for line in text.splitlines()
         if "stablehlo.dot_general" in line or "stablehlo.convolution" in line]
  assert ops, "no dot or convolution found: the counter reads the wrong text"
  return sum("HIGHEST" in line for line in ops)


def test_default_gram_precision_puts_no_op_at_highest():
  """The training step at gram_precision='default' holds no HIGHEST dot or conv; at
  'highest' its Gram products are (so the count can fail)."""
  assert _highest_ops("default") == 0
  assert _highest_ops("highest") >= 4  # 3 AOL layers: a forward Gram product each, + backward
