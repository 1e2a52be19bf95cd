"""CutMix of the query view with the positive's student view (docs/method.md §3).

The released ``utils.cutmix`` draws ``lam0 ~ Beta(beta, beta)``, a box whose sides are
``int(side * sqrt(1 - lam0))``, an integer centre uniform over the image, and the box
``[centre - side_cut // 2, centre + side_cut // 2)`` clipped to the image; the box of
``pos_q`` is pasted into ``query`` and the loss weight is the part of ``query`` that is left,
``lam = 1 - box_area / image_area``.

Boxes are drawn once per batch (``'batch'``, the default; docs/method.md §3), once per example
(``'sample'``), or once per group of consecutive examples (``'group'``). The released code
calls ``cutmix`` inside each GPU's loop on its own 32 images with its own numpy RNG, so
its boxes are in fact per GPU batch: ``'group'`` with the student's BatchNorm group size
reproduces that.

Everything here is a pure function of a JAX PRNG key and runs inside ``jax.jit``; the box is
a traced value applied through a mask, so no shape depends on the draw.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# How boxes are drawn (config.train.cutmix also takes 'none': no CutMix view at all).
MODES = ('batch', 'sample', 'group')


class Boxes(NamedTuple):
  """Half-open boxes ``[row_start, row_end) x [col_start, col_end)``, each ``(num_boxes,)``."""
  row_start: jax.Array
  row_end: jax.Array
  col_start: jax.Array
  col_end: jax.Array


class BoxDraws(NamedTuple):
  """The random numbers behind boxes: ``lam0`` float32 and integer centres, ``(num_boxes,)``."""
  lam0: jax.Array
  row_center: jax.Array
  col_center: jax.Array


def sample_draws(rng: jax.Array, num_boxes: int, height: int, width: int,
                 beta: float = 2.0) -> BoxDraws:
  """Draws ``lam0 ~ Beta(beta, beta)`` and centres uniform over the pixels.

  Args:
    rng: JAX PRNG key.
    num_boxes: how many independent boxes.
    height, width: image size in pixels.
    beta: Beta distribution parameter (2 released).
  Returns:
    ``BoxDraws`` with ``(num_boxes,)`` arrays.
  """
  lam_rng, row_rng, col_rng = jax.random.split(rng, 3)
  return BoxDraws(
      lam0=jax.random.beta(lam_rng, beta, beta, (num_boxes,), jnp.float32),
      row_center=jax.random.randint(row_rng, (num_boxes,), 0, height, jnp.int32),
      col_center=jax.random.randint(col_rng, (num_boxes,), 0, width, jnp.int32))


def boxes_from_draws(draws: BoxDraws, height: int, width: int) -> Boxes:
  """The released box of each draw (see the module docstring).

  Args:
    draws: ``BoxDraws`` of ``(num_boxes,)`` arrays.
    height, width: image size in pixels.
  Returns:
    ``Boxes`` of int32 ``(num_boxes,)`` arrays, clipped to the image.
  """
  cut_ratio = jnp.sqrt(1.0 - draws.lam0.astype(jnp.float32))
  # int() truncation as numpy's np.int of a positive float.
  half_rows = jnp.floor(height * cut_ratio).astype(jnp.int32) // 2
  half_cols = jnp.floor(width * cut_ratio).astype(jnp.int32) // 2
  return Boxes(
      row_start=jnp.clip(draws.row_center - half_rows, 0, height),
      row_end=jnp.clip(draws.row_center + half_rows, 0, height),
      col_start=jnp.clip(draws.col_center - half_cols, 0, width),
      col_end=jnp.clip(draws.col_center + half_cols, 0, width))


def box_masks(boxes: Boxes, height: int, width: int) -> jax.Array:
  """Boolean ``(num_boxes, height, width)``: True inside each box."""
  rows = jnp.arange(height, dtype=jnp.int32)[None, :, None]
  cols = jnp.arange(width, dtype=jnp.int32)[None, None, :]
  inside_rows = (rows >= boxes.row_start[:, None, None]) & (rows < boxes.row_end[:, None, None])
  inside_cols = (cols >= boxes.col_start[:, None, None]) & (cols < boxes.col_end[:, None, None])
  return inside_rows & inside_cols


def kept_fraction(boxes: Boxes, height: int, width: int) -> jax.Array:
  """``lam = 1 - box_area / image_area``, float32 ``(num_boxes,)``."""
  area = (boxes.row_end - boxes.row_start) * (boxes.col_end - boxes.col_start)
  return 1.0 - area.astype(jnp.float32) / float(height * width)


def cutmix(rng: jax.Array, query: jax.Array, pos_q: jax.Array, mode: str = 'batch',
           beta: float = 2.0, group_size: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Pastes a random box of ``pos_q`` into ``query``.

  Args:
    rng: JAX PRNG key.
    query: ``(batch, height, width, channels)`` images (any dtype; uint8 before
      normalisation gives the same result as the released mixing of normalised tensors,
      since normalisation is per pixel).
    pos_q: same shape as ``query``.
    mode: ``'batch'`` (one box), ``'sample'`` (one per example) or ``'group'`` (one per
      ``group_size`` consecutive examples).
    beta: Beta(beta, beta) parameter of ``lam0``.
    group_size: examples per box in ``'group'`` mode; must divide the batch.
  Returns:
    ``(mix_q, lam)``: mixed images like ``query`` and the per-example ``lam`` ``(batch,)``
    float32 (the weight of ``CE(m, k)``).
  """
  if query.shape != pos_q.shape:
    raise ValueError(f'cutmix: query {query.shape} and pos_q {pos_q.shape} differ in shape.')
  batch, height, width = query.shape[:3]
  if mode == 'batch':
    examples_per_box = batch
  elif mode == 'sample':
    examples_per_box = 1
  elif mode == 'group':
    if not group_size or batch % group_size:
      raise ValueError(f'cutmix: group_size {group_size} must divide the batch size {batch}.')
    examples_per_box = group_size
  else:
    raise ValueError(f'Unknown cutmix mode {mode!r}; expected one of {MODES}.')
  num_boxes = batch // examples_per_box
  boxes = boxes_from_draws(sample_draws(rng, num_boxes, height, width, beta), height, width)
  masks = jnp.repeat(box_masks(boxes, height, width), examples_per_box, axis=0)
  lam = jnp.repeat(kept_fraction(boxes, height, width), examples_per_box, axis=0)
  mix_q = jnp.where(masks[..., None], pos_q, query)
  return mix_q, lam
