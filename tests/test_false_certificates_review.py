"""Red-team review of issue 22's certification: each test is one attack that, on the code it
was written against (branch cert, 51cac76), obtains a false certificate or an understated
bound. Each asserts what a sound library must do (refuse, or certify honestly), so it fails
while the hole is open and passes once it is closed whichever of the two the fix chooses.

The docstring of each test states the attack, the numbers it produced, and the minimal fix
proposed."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import aol_jax
from aol_jax.certification import UndeclaredBoundError


def _eye(key, shape, dtype):
  del key
  return jnp.eye(*shape, dtype=dtype)


def _frozen_dense(kernel, bias=None) -> aol_jax.AOLDense:
  """An AOLDense holding ``kernel`` as its frozen kernel (any values: the certificate must
  bound what is stored) and ``bias``."""
  kernel = np.asarray(kernel, np.float32)
  layer = aol_jax.AOLDense(*kernel.shape, use_bias=bias is not None, rngs=nnx.Rngs(0))
  layer.kernel = aol_jax.RescaledKernel(jnp.asarray(kernel))
  if bias is not None:
    layer.bias = nnx.Param(jnp.asarray(bias, jnp.float32))
  return layer


def _refused_or_certified(fn):
  """``fn()``, or ``None`` where the library refuses (the sound outcome for these models)."""
  try:
    return fn()
  except (UndeclaredBoundError, ValueError, TypeError):
    return None


def _certified_class_is_the_own_pass(net, x, what: str) -> None:
  """Where ``certified_radii`` certifies ``x`` (radius > 0), the model's own frozen forward
  pass on ``x`` as given predicts the certified class."""
  out = _refused_or_certified(lambda: aol_jax.certified_radii(net, x, batch_size=1))
  if out is None:
    return
  pred, radii = out
  own = np.asarray(aol_jax.freeze(net)(jnp.asarray(x)).astype(jnp.float32))
  print(f"certified class {pred[0]} at radius {radii[0]}; own frozen pass logits {own[0]}")
  if radii[0] > 0:
    assert np.argmax(own[0]) == pred[0], (
        f"{what} is certified class {pred[0]} at radius {radii[0]}, but the model's own "
        f"frozen forward pass on it gives logits {own[0]}")


# -- 1. Overflow inside the ball ---------------------------------------------------------------


def _overflow_net() -> aol_jax.AOLNetwork:
  """h = 2^127 x + 2^127 (finite at x = 0, overflows to +inf at x = 1), then logits
  (1000 - 2^-126 h, 2^-126 h): in exact arithmetic class 0 everywhere on [0, 1] (margin
  >= 992), L = 2^127 * sqrt(2) 2^-126 = 2 sqrt(2)."""
  return aol_jax.AOLNetwork([
      _frozen_dense([[2.0 ** 127]], [2.0 ** 127]),
      _frozen_dense([[-2.0 ** -126, 2.0 ** -126]], [1000.0, 0.0]),
  ])


def test_an_activation_that_overflows_inside_the_ball_flips_a_certified_image(tmp_path):
  """The rigorous chain (rigorous.py) bounds the rounding of the float32 evaluation at every
  x' of the ball from Higham's model, which holds only while nothing overflows; only the
  activations at x itself are required finite. Here, with weights and biases all finite,
  normal float32 values (2^127, 2^-126):

  * at x = 0 every activation is finite (h = 2^127), and certified_radii certifies class 0
    at radius 232.0, certify_dataset at eps = 1 (allowance 67.9), the artifact alike;
  * at x' = 1 (an image in [0, 1], at distance 1) the first layer computes 2^128 = +inf, the
    logits are (-inf, +inf): the frozen forward pass and the certified evaluation itself
    predict class 1. The exact map still gives class 0 (logits (996, 4)).

  Fix: an overflow guard in the rigorous modes, as the statistical mode has
  (modes.OVERFLOW_GUARD): per step, bound the largest |value| any evaluation can reach inside
  the ball, e.g. ``(A^(z_k) + tau) / (1 - gamma_N) * (1 + gamma_N) + B_k (P_k eps + e_k +
  e'_k)`` for the abs pass ``A^`` (an affine step) or ``||z_k|| + P_k eps + e_k + e'_k``, and
  refuse the radius where it reaches the format's largest finite value. (The same guard also
  covers a partial sum that overflows at x in another summation order.)
  """
  net = _overflow_net()
  x = np.zeros((1, 1), np.float32)
  x_adv = np.ones((1, 1), np.float32)
  distance = float(np.linalg.norm(x_adv - x))
  # The exact map keeps class 0 at x': the flip below is the overflow, not the bound.
  with jax.enable_x64(True):
    exact = np.asarray(aol_jax.freeze(net)(jnp.asarray(x_adv, jnp.float64)))
  assert np.argmax(exact) == 0 and np.all(np.isfinite(exact))
  forward = np.asarray(aol_jax.freeze(net)(jnp.asarray(x_adv)))
  pred_adv, _ = aol_jax.certified_radii(net, x_adv, batch_size=1)
  flips = [int(np.argmax(forward[0])), int(pred_adv[0])]

  out = _refused_or_certified(lambda: aol_jax.certified_radii(net, x, batch_size=1))
  if out is not None:
    pred, radii = out
    print(f"certified_radii: class {pred[0]} at radius {radii[0]}; at x' (distance "
          f"{distance}) forward logits {forward[0]}, certified evaluation class {pred_adv[0]}")
    if radii[0] > distance:
      assert flips == [pred[0]] * 2, (
          f"certified_radii certifies class {pred[0]} at radius {radii[0]}, but at x' "
          f"(distance {distance}) the frozen forward pass and the certified evaluation "
          f"predict {flips} (float32 overflow to {forward[0]})")
  result = _refused_or_certified(lambda: aol_jax.certify_dataset(
      net, x, np.zeros(1, np.int32), eps_list=[distance], batch_size=1))
  if result is not None and result.num_certified[0]:
    assert flips == [0, 0], (
        f"certify_dataset certifies x at eps={distance} (allowance {result.max_allowance}), "
        f"but x' at that distance predicts {flips}")
  path = tmp_path / "overflow.jaxexport"
  exported = _refused_or_certified(lambda: aol_jax.export_certified(
      net, path, input_shape=(1,)))
  if exported is not None:
    call = jax.export.deserialize(path.read_bytes()).call
    pred, radius = (np.asarray(a) for a in call(x))
    pred_x, _ = (np.asarray(a) for a in call(x_adv))
    if radius[0] > distance:
      assert pred_x[0] == pred[0], (
          f"the artifact certifies class {pred[0]} at radius {radius[0]} and predicts "
          f"{pred_x[0]} at distance {distance}")


# -- 2. Forward methods overridden where the check does not look --------------------------------


class _Amplify:
  """A mixin listed *before* the library class: its ``__call__`` wins in the MRO, and it is
  no subclass of the class that makes the statement."""

  def __call__(self, x):
    return super().__call__(3.0 * x)


class _LoudFirstChannels(_Amplify, aol_jax.FirstChannels):
  pass


class _LoudDense(_Amplify, aol_jax.AOLDense):
  pass


def test_a_mixin_before_the_library_class_overrides_call_unrefused():
  """protocol.check_declared refuses a forward method whose defining class ``definer`` is a
  *subclass* of the owner of the statement (``issubclass(definer, owner)``). A mixin placed
  before the library class in the bases (``class C(Mixin, FirstChannels)``) defines
  ``__call__`` in a class that is no subclass of FirstChannels, so the check passes:

  * ``_LoudFirstChannels(2)`` computes 3 x[:2], states L = 1; an ExactMap's rounding_error
    calls ``self(x)``, so the certified evaluation itself computes 3 x. Followed by an
    identity dense with bias (0.5, 0): x = (0.3, 0.4) is certified class 0 at radius
    0.1414; x' = (0.26, 0.44), at distance 0.0566, is class 1 in the certified evaluation
    and the forward pass.
  * ``_LoudDense`` (identity kernel): L stated 1.0, exact operator norm 3.0.

  Fix: in check_declared, refuse a forward method defined anywhere but in the owner or a
  class the owner inherits from: ``definer is not owner and not issubclass(owner,
  definer)`` (today: ``issubclass(definer, owner)``).
  """
  dense = aol_jax.AOLDense(2, 2, kernel_init=_eye, eps=0.0, rngs=nnx.Rngs(0))
  dense.bias = nnx.Param(jnp.array([0.5, 0.0]))
  net = aol_jax.AOLNetwork([_LoudFirstChannels(2), dense])
  x = np.array([[0.3, 0.4]], np.float32)
  x_adv = np.array([[0.26, 0.44]], np.float32)
  distance = float(np.linalg.norm(x_adv - x))
  out = _refused_or_certified(lambda: aol_jax.certified_radii(net, x, batch_size=1))
  if out is not None:
    pred, radii = out
    pred_adv, _ = aol_jax.certified_radii(net, x_adv, batch_size=1)
    forward = np.asarray(aol_jax.freeze(net)(jnp.asarray(x_adv)))
    print(f"class {pred[0]} at radius {radii[0]}; x' at {distance}: certified evaluation "
          f"class {pred_adv[0]}, forward logits {forward[0]}")
    if radii[0] > distance:
      assert pred_adv[0] == pred[0] and np.argmax(forward[0]) == pred[0], (
          f"certified class {pred[0]} at radius {radii[0]}, but x' at distance {distance} "
          f"is class {pred_adv[0]} in the certified evaluation")

  loud = aol_jax.AOLNetwork([_LoudDense(2, 2, use_bias=False, kernel_init=_eye, eps=0.0,
                                        rngs=nnx.Rngs(0))])
  stated = _refused_or_certified(loud.lipschitz_bound)
  if stated is not None:
    exact = aol_jax.operator_norm(aol_jax.freeze(loud), (1, 2))
    assert stated >= exact, f"stated L {stated} < exact operator norm {exact}"


class _ShrunkWhenFrozen(aol_jax.AOLDense):
  """Overrides only applied_kernel, which the bound reads but the forward pass does not."""

  def applied_kernel(self, **kwargs):
    kernel = super().applied_kernel(**kwargs)
    return kernel * 0.01 if isinstance(self.kernel, aol_jax.RescaledKernel) else kernel


def test_a_subclass_overriding_applied_kernel_gets_a_false_certificate():
  """``_FORWARD_METHODS`` of AOLDense / AOLConv is only ``__call__``, but their statement
  reads overridable methods: lipschitz_bound and rounding_error_slope bound
  ``self.applied_kernel()``, while rounding_error and ``__call__`` apply ``self.kernel``.
  A subclass whose applied_kernel returns 0.01 x the stored kernel once frozen (freeze
  itself stores the true kernel, read before freezing):

  * frozen, it states L = 0.01 (exact operator norm 1.0, identity kernel);
  * x = (0.6, 0.4) is certified class 0 at radius 14.14 (the honest radius is 0.1414);
    x' = (0.4, 0.6), at distance 0.283, is class 1 in the frozen forward pass and in the
    certified evaluation.

  Fix: a frozen layer's lipschitz_bound / rounding_error_slope bound the stored kernel
  directly (``_frozen_kernel(self)``, the array rounding_error applies), and AOLDense /
  AOLConv list ``applied_kernel``, ``rescale``, ``factors`` and ``apply_factors`` in
  ``_FORWARD_METHODS`` so that overriding them under the inherited statement is refused.
  """
  layer = _ShrunkWhenFrozen(2, 2, use_bias=False, kernel_init=_eye, eps=0.0, rngs=nnx.Rngs(0))
  net = aol_jax.AOLNetwork([layer])
  frozen = aol_jax.freeze(net)
  stated = _refused_or_certified(frozen.lipschitz_bound)
  exact = aol_jax.operator_norm(frozen, (1, 2))
  if stated is not None:
    assert stated >= exact, f"frozen: stated L {stated} < exact operator norm {exact}"
  x = np.array([[0.6, 0.4]], np.float32)
  x_adv = np.array([[0.4, 0.6]], np.float32)
  distance = float(np.linalg.norm(x_adv - x))
  out = _refused_or_certified(lambda: aol_jax.certified_radii(net, x, batch_size=1))
  if out is not None:
    pred, radii = out
    forward = np.asarray(frozen(jnp.asarray(x_adv)))
    if radii[0] > distance:
      assert np.argmax(forward[0]) == pred[0], (
          f"certified class {pred[0]} at radius {radii[0]}; x' at distance {distance} gives "
          f"logits {forward[0]}")


class _TripledRescale(aol_jax.AOLDense):
  def rescale(self, kernel, **kwargs):
    return 3.0 * super().rescale(kernel, **kwargs)


class _TripledFactors(aol_jax.AOLConv):
  def apply_factors(self, kernel, d):
    return 3.0 * super().apply_factors(kernel, d)


@pytest.mark.parametrize("make, shape", [
    (lambda: _TripledRescale(4, 4, rngs=nnx.Rngs(0)), (1, 4)),
    (lambda: _TripledFactors(2, 2, 3, rngs=nnx.Rngs(0)), (1, 5, 2)),
], ids=["AOLDense.rescale", "AOLConv.apply_factors"])
def test_a_subclass_overriding_the_rescaling_understates_the_networks_bound(make, shape):
  """An unfrozen layer's ``__call__`` applies ``self.rescale(raw)`` (sharding.apply_rescaled
  -> ``layer.rescale`` -> ``layer.factors`` / ``layer.apply_factors``), while its bound and
  freeze use ``applied_kernel``, which calls the module-level rescaling and none of those
  methods. A subclass overriding ``rescale`` (or ``apply_factors``, ``factors``) keeps the
  inherited statement: ``AOLNetwork([layer]).lipschitz_bound()`` states 1.0 where the
  network it describes (its own forward pass) has exact norm 3.0. (certify_dataset certifies
  the frozen copy, which applies the true kernel, so the certificates themselves hold; the
  public bound of the model does not.)

  Fix: list ``rescale``, ``factors``, ``apply_factors`` and ``applied_kernel`` in
  AOLDense / AOLConv's ``_FORWARD_METHODS`` (refused when overridden under the inherited
  statement), or make ``__call__`` apply ``applied_kernel()`` so the two cannot diverge.
  """
  net = aol_jax.AOLNetwork([make()])
  stated = _refused_or_certified(net.lipschitz_bound)
  if stated is not None:
    exact = aol_jax.operator_norm(net, shape)
    print(f"stated {stated}, exact {exact}")
    assert stated >= exact, f"stated L {stated} < exact operator norm {exact}"


class _SpoofedDense(aol_jax.AOLDense):
  """Claims to be a library class: check_declared takes any class whose ``__module__``
  starts with 'aol_jax.' as the owner of the statement."""
  __module__ = "aol_jax.layers"

  def __call__(self, x):
    return super().__call__(3.0 * x)


def test_a_subclass_that_spoofs_its_module_name_overrides_call_unrefused():
  """protocol._is_library_class is ``klass.__module__.startswith('aol_jax.')``. A user
  subclass of AOLDense that sets ``__module__ = 'aol_jax.layers'`` becomes the owner of the
  inherited statement, so its own ``__call__`` (3 x the input) is not refused: stated L
  1.0, exact operator norm 3.0 (the same subclass without the line is refused).

  Fix: recognise the library's classes by identity (a set of the classes aol_jax defines,
  filled where they are defined), not by a module name a class can set for itself.
  """
  net = aol_jax.AOLNetwork([_SpoofedDense(2, 2, use_bias=False, kernel_init=_eye, eps=0.0,
                                          rngs=nnx.Rngs(0))])
  stated = _refused_or_certified(net.lipschitz_bound)
  if stated is not None:
    exact = aol_jax.operator_norm(aol_jax.freeze(net), (1, 2))
    assert stated >= exact, f"stated L {stated} < exact operator norm {exact}"


# -- 3. The registry of exact maps ---------------------------------------------------------------


class _PosesAsRelu:
  """A stateless callable (10 x) whose hash and equality match ``jax.nn.relu``."""

  def __call__(self, x):
    return 10.0 * x

  def __hash__(self):
    return hash(jax.nn.relu)

  def __eq__(self, other):
    return other is jax.nn.relu or other is self


def test_an_object_that_compares_equal_to_relu_is_certified_as_relu():
  """protocol._registered looks a layer up with ``layer in _EXACT_MAPS`` (hash and ``==``).
  A callable whose ``__hash__`` / ``__eq__`` match ``jax.nn.relu`` is taken for relu and
  wrapped as an exact 1-Lipschitz map, whatever it computes: a network [it, identity
  dense] states L = 1.0 where its exact norm is 10.0; x = (0.3, 0.7) is certified class 1
  at radius 2.83 although x' = (0.7, 0.3), at distance 0.57, is class 0.

  Fix: look registrations up by identity (``any(key is layer for key in _EXACT_MAPS)``, and
  the same for ``type(layer)``), e.g. a dict keyed by ``id`` holding the object.
  """
  net = aol_jax.AOLNetwork([_PosesAsRelu(), aol_jax.AOLDense(
      2, 2, use_bias=False, kernel_init=_eye, eps=0.0, rngs=nnx.Rngs(0))])
  stated = _refused_or_certified(net.lipschitz_bound)
  if stated is not None:
    exact = aol_jax.operator_norm(aol_jax.freeze(net), (1, 2))
    x = np.array([[0.3, 0.7]], np.float32)
    x_adv = np.array([[0.7, 0.3]], np.float32)
    pred, radii = aol_jax.certified_radii(net, x, batch_size=1)
    pred_adv, _ = aol_jax.certified_radii(net, x_adv, batch_size=1)
    print(f"stated L {stated}, exact {exact}; class {pred[0]} at radius {radii[0]}, x' at "
          f"{np.linalg.norm(x_adv - x)} is class {pred_adv[0]}")
    assert stated >= exact, f"stated L {stated} < exact operator norm {exact}"


# -- 4. The library's own classes tampered with ---------------------------------------------------


def _amplified_call(self, x):
  return 3.0 * x[..., :self.n]


@pytest.mark.parametrize("attribute, value", [("__call__", _amplified_call),
                                              ("lipschitz", 1 / 3)],
                         ids=["__call__ replaced", "lipschitz lowered"])
def test_a_library_block_patched_on_its_class_is_certified(monkeypatch, attribute, value):
  """Replacing a method or the constant on a library class itself (``FirstChannels.__call__
  = f`` or ``FirstChannels.lipschitz = 1/3``, as a plugin or a careless notebook might)
  changes what every instance computes or states, and nothing notices: the class is still
  the library's, its statement still ExactMap's. [FirstChannels(2), identity dense]:
  __call__ replaced by 3 x[:2]: L stated 1.0, exact 3.0; lipschitz lowered: L stated
  0.333, exact 1.0.

  Fix: snapshot, at import, each library class's forward methods and constants (the
  function objects in ``vars(klass)`` for ``_library_forward_methods`` and ``lipschitz``)
  and refuse a class whose current ones are not those objects.
  """
  monkeypatch.setattr(aol_jax.FirstChannels, attribute, value)
  net = aol_jax.AOLNetwork([aol_jax.FirstChannels(2), aol_jax.AOLDense(
      2, 2, use_bias=False, kernel_init=_eye, eps=0.0, rngs=nnx.Rngs(0))])
  stated = _refused_or_certified(net.lipschitz_bound)
  if stated is not None:
    exact = aol_jax.operator_norm(aol_jax.freeze(net), (1, 2))
    assert stated >= exact, f"stated L {stated} < exact operator norm {exact}"


# -- 5. A compute dtype cleared silently --------------------------------------------------------


def test_a_bfloat16_compute_dtype_is_certified_as_float32_silently():
  """certify_dataset / certified_radii freeze with ``dtype=float32``, which clears every
  module's narrower compute ``dtype``: the certificate is about a float32 network the user
  does not run. The model's own pass (``model(x)``, or ``aol_jax.freeze(model)(x)``, which
  keeps ``dtype``) computes in bfloat16.

  AOLDense(2, 2, dtype=bfloat16), identity kernel, x = (0.5, 0.5 + 2^-11): certified_radii
  certifies class 1 at radius 3.45e-4 (certify_dataset likewise at eps = 1e-4), while the
  model's frozen forward pass rounds x to bfloat16, gets logits (0.5, 0.5) and predicts
  class 0 at x itself. (complex64 and float16 compute dtypes are certified the same way.)

  Fix: refuse, in one line, a model whose compute ``dtype`` (or a cast inside a layer) is
  narrower than the mode's format, naming the layer and the fix (``dtype=None`` or
  ``freeze(model, dtype=jnp.float32)`` before certifying); never clear it silently.
  """
  layer = aol_jax.AOLDense(2, 2, use_bias=False, kernel_init=_eye, eps=0.0,
                           dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  net = aol_jax.AOLNetwork([layer])
  x = np.array([[0.5, 0.5 + 2.0 ** -11]], np.float32)
  _certified_class_is_the_own_pass(net, x, "the image")


# -- 6. The runner ---------------------------------------------------------------------------------


def test_the_runner_defaults_to_the_rigorous_mode():
  """Issue 22: the rigorous float32 mode "becomes the default of certify_dataset,
  certified_radii, export_certified and the runner". The runner's config still defaults to
  'float32_statistical' (Config.rounding, and the digits and paper presets), which the
  brief names not a guarantee; its choices (configs.ROUNDINGS) do not even include
  'float32'; and experiments/cifar/train.py imports ``EXPORT_ROUNDING``, which export.py no
  longer defines, so the runner does not import at all.

  Fix: ``rounding: str = aol_jax.certification.DEFAULT_ROUNDING`` in Config and the presets,
  ROUNDINGS = tuple(aol_jax.ROUNDING_MODES), and train.py's export check reading
  ``aol_jax.ROUNDING_MODES[name].exportable``.
  """
  configs = importlib.import_module("experiments.cifar.configs")
  assert "float32" in configs.ROUNDINGS, configs.ROUNDINGS
  assert configs.Config().rounding == aol_jax.certification.DEFAULT_ROUNDING
  from support.configs import get_config
  for preset in configs.PRESETS:
    config = get_config(preset)
    assert not aol_jax.ROUNDING_MODES[config.rounding].statistical, (preset, config.rounding)
  importlib.import_module("experiments.cifar.train")


def test_a_float16_image_is_certified_for_a_pass_the_model_does_not_run():
  """certify_dataset / certified_radii widen float16 (and bfloat16) images to float32 and
  certify the float32 evaluation. The model's own forward pass on the image as given
  normalises in the image's dtype (Normalisation: ``(x - mean.astype(x.dtype)) /
  std.astype(x.dtype)``), in float16 here, mean and all.

  input_mean (0, 0.1), identity dense: the float16 image x = (0.50683594, 0.60693359) is
  certified class 1 by certified_radii (radius 6.87e-5) and by certify_dataset at eps = 0;
  the model's own frozen forward pass on that image computes logits (0.50683594,
  0.50683594) and predicts class 0 at x itself (on the float32 copy of x it gives class 1).
  989 of 4000 such images disagree.

  Fix: refuse images narrower than the mode's format in checked_images ("pass float32
  images: the model evaluates float16 ones in float16"), or make the normalisation compute
  in at least float32 (``x.astype(jnp.promote_types(x.dtype, jnp.float32))``) so that the
  model's pass is the certified one.
  """
  net = aol_jax.AOLNetwork([aol_jax.AOLDense(2, 2, use_bias=False, kernel_init=_eye, eps=0.0,
                                             rngs=nnx.Rngs(0))],
                           input_mean=(0.0, 0.1), input_std=(1.0, 1.0))
  x = np.array([[0.50683594, 0.60693359]], np.float16)
  _certified_class_is_the_own_pass(net, x, "the float16 image")
