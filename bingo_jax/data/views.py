"""The names of the image views in a training batch: the contract between the input pipeline
and the train steps (docs/method.md §2).

Each training example is an anchor image and a positive drawn from the anchor's bag. The
pipeline makes up to four augmented views of them; a step declares which of these it reads
(``steps.batch_views``), the pipeline makes exactly those, and the trainer hands the step
those alone.
"""

from __future__ import annotations

from typing import Iterable

QUERY = 'query'  # the anchor, embedded by the student (q)
KEY = 'key'      # the anchor, embedded by the teacher or key encoder (k)
POS_Q = 'pos_q'  # the bag positive, embedded by the student (p)
POS_K = 'pos_k'  # the bag positive, embedded by the teacher (kp)

# Every view the input pipeline can make, in its fixed order (each view's augmentation seed
# is its slot in this tuple, so a subset gives the same images as the full set).
VIEW_KEYS = (QUERY, KEY, POS_Q, POS_K)
# The views of the anchor alone: all that MoCo and the anchor-only loss read (no bags).
ANCHOR_VIEWS = (QUERY, KEY)
# The views of the bag positive: reading any of them needs a bag file.
POSITIVE_VIEWS = (POS_Q, POS_K)


def ordered(views: Iterable[str]) -> tuple[str, ...]:
  """Distinct view names in ``VIEW_KEYS`` order.

  Raises:
    ValueError: naming a view that ``VIEW_KEYS`` does not hold.
  """
  views = set(views)
  unknown = sorted(views - set(VIEW_KEYS))
  if unknown:
    raise ValueError(f'Unknown views {unknown}; expected names from {VIEW_KEYS}.')
  return tuple(view for view in VIEW_KEYS if view in views)


def needs_bags(views: Iterable[str]) -> bool:
  """Whether any of ``views`` is a view of the bag positive."""
  return any(view in POSITIVE_VIEWS for view in views)
