"""Networks and train steps shared by the benchmarks.

``SIZES`` scale AOL-Small so that the quick size keeps the paper size's ratio of rescaling
cost (independent of the batch) to layer cost (proportional to the batch): halving the
channels and the dense width while halving the batch keeps both ``c / batch`` and
``features / batch`` fixed, so quick ratios track paper ratios to first order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx

from aol_jax import aol_init
from aol_jax import AOLConv, AOLDense
from aol_jax import offset_cross_entropy
from aol_jax import AOLNetwork, aol_convnet


@dataclasses.dataclass(frozen=True)
class NetSize:
  batch: int  # images per train step
  channels: int  # conv channels (AOL-Small: 192)
  width: int  # channels kept before the dense part; dense features = 64 * width
  conv_depth: int  # 3x3 conv layers (AOL-Small: 12)
  dense_depth: int  # dense layers (AOL-Small: 14)


SIZES = {
    "tiny": NetSize(batch=8, channels=16, width=2, conv_depth=2, dense_depth=2),
    "quick": NetSize(batch=128, channels=96, width=8, conv_depth=12, dense_depth=14),
    "paper": NetSize(batch=256, channels=192, width=16, conv_depth=12, dense_depth=14),
}


def aol_net(size: NetSize, *, seed: int = 0) -> AOLNetwork:
  """AOL-Small (at ``paper``) or its scaled copy, on 32x32x3 CIFAR-shaped inputs."""
  return aol_convnet(10, width=size.width, channels=size.channels,
                     conv_depth=size.conv_depth, dense_depth=size.dense_depth,
                     rngs=nnx.Rngs(seed))


def replace_layers(model: AOLNetwork, conv: Callable[[AOLConv], nnx.Module],
                   dense: Callable[[AOLDense], nnx.Module]) -> AOLNetwork:
  """The same network with each AOLConv replaced by ``conv(layer)``, each AOLDense by ``dense``."""
  layers = []
  for layer in model.layers:
    if isinstance(layer, AOLConv):
      layer = conv(layer)
    elif isinstance(layer, AOLDense):
      layer = dense(layer)
    layers.append(layer)
  return AOLNetwork(layers)


def plain_net(model: AOLNetwork, *, seed: int = 0) -> AOLNetwork:
  """The identical network with plain ``nnx.Conv`` / ``nnx.Linear``: same shapes, no rescaling."""
  rngs = nnx.Rngs(seed)
  return replace_layers(
      model,
      lambda l: nnx.Conv(l.in_features, l.out_features, l.kernel_size, padding="SAME",
                         kernel_init=aol_init(), rngs=rngs),
      lambda l: nnx.Linear(l.in_features, l.out_features, kernel_init=aol_init(), rngs=rngs))


def with_gram_method(model: AOLNetwork, method: str, *, seed: int = 0) -> AOLNetwork:
  """The same network whose AOLConv layers use Gram formulation ``method``."""
  rngs = nnx.Rngs(seed)
  return replace_layers(
      model,
      lambda l: AOLConv(l.in_features, l.out_features, l.kernel_size, padding="SAME",
                        gram_method=method, rngs=rngs),
      lambda l: l)


def batch(size: NetSize, *, seed: int = 0) -> tuple[jax.Array, jax.Array]:
  """Random CIFAR-shaped images in [0, 1] and labels."""
  kx, ky = jax.random.split(jax.random.key(seed))
  return (jax.random.uniform(kx, (size.batch, 32, 32, 3)),
          jax.random.randint(ky, (size.batch,), 0, 10))


def sgd() -> optax.GradientTransformation:
  """The paper's optimiser: SGD, Nesterov momentum 0.9."""
  return optax.sgd(1e-3, momentum=0.9, nesterov=True)


@dataclasses.dataclass
class TrainStep:
  """A jitted, donating train step over a model's ``nnx.Param`` state."""
  fn: Callable[..., Any]  # (params, opt_state, rest, x, y) -> (params, opt_state, loss)
  params: Any
  opt_state: Any
  rest: Any
  compiled: Any  # the compiled executable, for memory_analysis()

  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    self.params, self.opt_state, loss = self.fn(self.params, self.opt_state, self.rest, x, y)
    return loss


def train_step(model: nnx.Module, x: jax.Array, y: jax.Array,
               tx: optax.GradientTransformation | None = None,
               loss: Callable[[jax.Array, jax.Array], jax.Array] = offset_cross_entropy,
               ) -> TrainStep:
  """Forward, backward and optimiser update of ``model`` on one batch, as one jitted call.

  ``loss(model(x), y)`` is minimised with ``tx`` (default: :func:`sgd`).
  """
  tx = sgd() if tx is None else tx
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params, rest, x, y):
    return loss(nnx.merge(graphdef, params, rest)(x), y)

  def step(params, opt_state, rest, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, rest, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  jitted = jax.jit(step, donate_argnums=(0, 1))
  compiled = jitted.lower(params, opt_state, rest, x, y).compile()
  return TrainStep(compiled, params, opt_state, rest, compiled)


def peak_bytes(compiled: Any) -> int:
  """Peak device memory of one call, from XLA's buffer assignment.

  Arguments + outputs + temporaries, minus outputs that alias (donated) arguments.
  """
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes)


def flops(compiled: Any) -> float:
  """Floating-point operations of one call, from XLA's cost analysis of the compiled program."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def forward(model: nnx.Module) -> Callable[[jax.Array], jax.Array]:
  """A jitted forward pass closing over ``model``'s state."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def fwd(state, x):
    return nnx.merge(graphdef, state)(x)

  return lambda x: fwd(state, x)

