"""Check 2: are trained AOL layers almost orthogonal?

The paper reports per-layer empirical Lipschitz constants of 0.98-0.99 (power iteration)
on trained AOL networks. For every AOL layer of the trained networks, and of the same
networks at initialisation, this measures

* ``power_iteration``: :func:`aol_jax.lipschitz.power_iteration` on the layer's Jacobian
  (a lower bound on its spectral norm, which AOL bounds by 1);
* ``exact`` and ``smallest`` (trained networks only): the largest and smallest singular
  values of the layer's explicit matrix (square roots of the eigenvalues of ``G`` below),
  to show whether the power iteration converged and how far from 1 the spectrum spreads;
* ``distance``: ``||G - I||_F / sqrt(n)``, how far the layer is from an isometry, where
  ``M`` is the layer's explicit ``(out_size, in_size)`` matrix on the input size it sees in
  the network (a conv with its 'SAME' zero padding on that image size, so nothing is
  approximated) and ``G`` is the ``n x n`` Gram of its smaller side: ``M^T M`` when
  ``in_size <= out_size``, else ``M M^T``. ``G = I`` exactly when the layer is orthogonal
  (an isometry, or a co-isometry for a layer that shrinks the size); the value is the RMS
  deviation of ``G``'s entries per row, 0 for orthogonal, and about 1 when ``G`` has lost
  all resemblance to the identity.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aol_jax import AOLConv, AOLDense, explicit_matrix, freeze, power_iteration
from experiments.ablations import report, trainer
from experiments.ablations.configs import PAPER_SETTING, AblationConfig, Recipe

NAME = "orthogonality"
PAPER_RANGE = (0.98, 0.99)


def describe(layer: nnx.Module, in_shape: tuple[int, ...]) -> str:
  """E.g. ``conv3x3 64->64 @7x7`` or ``dense 392->392``."""
  if isinstance(layer, AOLConv):
    k = "x".join(map(str, layer.kernel_size))
    size = "x".join(map(str, in_shape[1:-1]))
    return f"conv{k} {layer.in_features}->{layer.out_features} @{size}"
  return f"dense {layer.in_features}->{layer.out_features}"


def layer_inputs(model: nnx.Module, image: np.ndarray) -> list[tuple[int, tuple[int, ...]]]:
  """``(index, input shape)`` of every AOL layer of ``model.layers``, for a batch of one."""
  x = jnp.asarray(image[None])
  out = []
  for i, layer in enumerate(model.layers):
    if isinstance(layer, (AOLConv, AOLDense)):
      out.append((i, tuple(x.shape)))
    x = layer(x)
  return out


# The layer's weights are an argument, not constants: one program serves every layer of a
# shape, at initialisation and trained (AOL-Small on digits: 4 compiles instead of 16).
@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _power_iteration(graphdef, state, x0: jax.Array, iterations: int, seed: int) -> jax.Array:
  return power_iteration(lambda z: nnx.merge(graphdef, state)(z), x0, iterations,
                         key=jax.random.key(seed))


def measure_layer(layer: nnx.Module, in_shape: tuple[int, ...], *, iterations: int,
                  seed: int, spectrum: bool) -> dict:
  """The measurements of the module docstring, for one (frozen) AOL layer; ``exact`` and
  ``smallest`` only with ``spectrum`` (an eigendecomposition: seconds for n = 3136)."""
  graphdef, state = nnx.split(layer)
  f = lambda z: nnx.merge(graphdef, state)(z)
  # Placed alike (the trained net's arrays are committed to a device, a new net's are not),
  # the two share a program.
  power = _power_iteration(graphdef, jax.device_put(state, jax.devices()[0]),
                           jnp.zeros(in_shape, jnp.float32), iterations, seed)
  m = explicit_matrix(f, in_shape)  # (out_size, in_size), float64
  gram = m.T @ m if m.shape[1] <= m.shape[0] else m @ m.T
  n = gram.shape[0]
  distance = float(np.linalg.norm(gram - np.eye(n)) / np.sqrt(n))
  row = {"power_iteration": float(power), "distance": distance, "matrix": list(m.shape),
         "gram_size": n}
  if spectrum:
    eig = np.linalg.eigvalsh(gram)  # ascending; the squared singular values of M
    row["exact"] = float(np.sqrt(max(eig[-1], 0.0)))
    row["smallest"] = float(np.sqrt(max(eig[0], 0.0)))
  return row


def measure(model: nnx.Module, recipe: Recipe, *, seed: int, spectrum: bool) -> list[dict]:
  """Every AOL layer of ``model``, measured on the rescaled kernels (``freeze``)."""
  frozen = freeze(model)
  image = trainer.load(recipe.dataset).test_inputs()[0]
  out = []
  for index, shape in layer_inputs(frozen, image):
    layer = frozen.layers[index]
    row = measure_layer(layer, shape, iterations=recipe.power_iterations, seed=seed,
                        spectrum=spectrum)
    out.append({"index": index, "layer": describe(layer, shape), **row})
  return out


def run(config: AblationConfig, workdir: str) -> dict:
  """Measure the trained (paper's loss, ``config.seed``) and initial networks; write files."""
  results = {"config": config.name, "seed": config.seed, "loss": PAPER_SETTING.name,
             "datasets": {}}
  for recipe in config.recipes:
    trained = trainer.fit(recipe, PAPER_SETTING, seed=config.seed, workdir=workdir)
    trainer.log(f"[{NAME}] {recipe.dataset}: trained {recipe.epochs} epochs in "
                f"{trained.seconds:.1f} s (shared with the other checks in one process)")
    entry = {"epochs": recipe.epochs}
    for kind, model in (("init", trainer.initial_model(recipe, PAPER_SETTING,
                                                       seed=config.seed)),
                        ("trained", trained.model)):
      rows, seconds = trainer.timed(measure, model, recipe, seed=config.seed,
                                    spectrum=kind == "trained")
      entry[kind] = rows
      trainer.log(f"[{NAME}] {recipe.dataset} {kind}: {len(rows)} layers measured in "
                  f"{seconds:.1f} s; power-iteration norms "
                  f"{min(r['power_iteration'] for r in rows):.4f}.."
                  f"{max(r['power_iteration'] for r in rows):.4f}")
    results["datasets"][recipe.dataset] = entry
  return report.publish(workdir, NAME, results, markdown, plot)


def markdown(results: dict) -> str:
  """One table per dataset: each AOL layer at initialisation and after training."""
  out = [f"### Almost orthogonal ({results['config']} run, seed {results['seed']}, loss "
         f"{results['loss']})", "",
         f"Paper: per-layer power iteration on trained AOL nets gives "
         f"{PAPER_RANGE[0]}-{PAPER_RANGE[1]}. 'distance' is ||G - I||_F / sqrt(n) for the "
         "n x n Gram G of the layer's explicit matrix (smaller side).", ""]
  for dataset, d in results["datasets"].items():
    out += [f"{dataset} ({d['epochs']} epochs):", ""]
    rows = []
    for init, trained in zip(d["init"], d["trained"]):
      rows.append([str(init["index"]), init["layer"], "x".join(map(str, init["matrix"])),
                   f"{init['power_iteration']:.4f}", f"{trained['power_iteration']:.4f}",
                   f"{trained['exact']:.4f}", f"{trained['smallest']:.3f}",
                   f"{init['distance']:.3f}",
                   f"{trained['distance']:.3f}"])
    out.append(report.markdown_table(
        ["#", "layer", "matrix", "norm at init (power it.)", "norm trained (power it.)",
         "norm trained (exact)", "smallest sv trained", "distance at init",
         "distance trained"], rows))
    out.append("")
  return "\n".join(out)


def plot(results: dict, path: str) -> None:
  """Per layer: power-iteration norm (left) and distance from orthogonal (right)."""
  fig, (ax_norm, ax_dist) = report.figure(2, width=6.0)
  for dataset, d in results["datasets"].items():
    for kind, style in (("init", "o:"), ("trained", "s-")):
      rows = d[kind]
      x = range(len(rows))
      ax_norm.plot(x, [r["power_iteration"] for r in rows], style, label=f"{dataset} {kind}")
      ax_dist.plot(x, [r["distance"] for r in rows], style, label=f"{dataset} {kind}")
  ax_norm.axhspan(*PAPER_RANGE, color="grey", alpha=0.3, label="paper (trained)")
  ax_norm.set(title="Per-layer norm (power iteration)", xlabel="AOL layer (input to output)",
              ylabel="spectral norm")
  ax_dist.set(title="Distance of the Gram from I", xlabel="AOL layer (input to output)",
              ylabel="||G - I||_F / sqrt(n)")
  for ax in (ax_norm, ax_dist):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  report.save_figure(fig, path)
