"""The bag report: how often bag members share their anchor's class, and a picture of bags.

Purity of an anchor = fraction of its bag members that have the anchor's label (the paper's
bag-quality measure behind Tables 7 and 11: label bags are pure by construction, random
bags sit at chance). Overall purity is the mean over anchors with a non-empty bag; per-class
purity the same mean over the anchors of one class. Chance purity (two random images share a
class) is ``sum_c p_c^2``.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from bingo_jax.bags import bag_file
from bingo_jax.data import bad_images
from bingo_jax.store import fileio


def anchor_purity(bags: bag_file.Bags, labels: np.ndarray) -> np.ndarray:
  """Per-anchor purity ``(N,)`` float64; NaN for anchors whose bag is empty (singleton group).

  Group bags are handled without listing members: an anchor of class c in group g has
  ``count(g, c) - 1`` same-class members out of ``size(g) - 1``.
  """
  labels = np.asarray(labels)
  if labels.shape != (bags.num_images,):
    raise ValueError(f'labels shape {labels.shape} does not match {bags.num_images} images.')
  if bags.kind == 'fixed':
    return (labels[bags.neighbors] == labels[:, None]).mean(axis=1)
  groups = bags.group_of.astype(np.int64)
  _, labels_dense = np.unique(labels, return_inverse=True)
  pair = groups * (labels_dense.max() + 1) + labels_dense
  _, pair_id, pair_count = np.unique(pair, return_inverse=True, return_counts=True)
  same = pair_count[pair_id] - 1
  size = np.diff(bags.group_offsets)[groups] - 1
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(size > 0, same / np.maximum(size, 1), np.nan)


def purity_summary(bags: bag_file.Bags, labels: np.ndarray,
                   class_names: Optional[list] = None) -> dict:
  """Overall / per-class purity, chance level and bag-size statistics (JSON-ready)."""
  labels = np.asarray(labels)
  purity = anchor_purity(bags, labels)
  valid = ~np.isnan(purity)
  classes, class_of, counts = np.unique(labels, return_inverse=True, return_counts=True)
  # Per-class means with bincount: one pass, also for ImageNet's 1000 classes x 1.28M.
  anchors = np.bincount(class_of[valid], minlength=len(classes))
  sums = np.bincount(class_of[valid], weights=purity[valid], minlength=len(classes))
  per_class = {}
  for position, c in enumerate(classes):
    name = str(class_names[c]) if class_names is not None and c < len(class_names) else str(c)
    per_class[name] = float(sums[position] / anchors[position]) if anchors[position] else None
  if bags.kind == 'groups':
    sizes = np.diff(bags.group_offsets)[bags.group_of] - 1
  else:
    sizes = np.full(bags.num_images, bags.neighbors.shape[1])
  frequencies = counts / counts.sum()
  return {'method': bags.method, 'num_images': bags.num_images,
          'purity': float(purity[valid].mean()) if valid.any() else None,
          'purity_per_class': per_class,
          'chance_purity': float((frequencies ** 2).sum()),
          'anchors_with_empty_bag': int((~valid).sum()),
          'bag_size': {'min': int(sizes.min()), 'mean': float(sizes.mean()),
                       'max': int(sizes.max())}}


def draw_bag_grid(bags: bag_file.Bags, source: Any, path: str, *, num_anchors: int = 8,
                  members_shown: int = 8, seed: int = 0,
                  class_names: Optional[list] = None) -> str:
  """PNG grid: each row a random anchor (left, thick frame) then members of its bag.

  Members are framed green when they share the anchor's label, red otherwise (no frames
  without labels). Group bags larger than ``members_shown`` show a random subset.
  """
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  rng = np.random.default_rng(seed)
  labels = source.labels
  anchors = rng.choice(bags.num_images, size=min(num_anchors, bags.num_images), replace=False)
  columns = 1 + max(1, min(members_shown, max(bags.bag_size(int(a)) for a in anchors)))
  figure, axes = plt.subplots(len(anchors), columns, figsize=(1.3 * columns, 1.45 * len(anchors)),
                              squeeze=False)

  def name(index):
    if labels is None:
      return f'#{index}'
    label = int(labels[index])
    return str(class_names[label]) if class_names is not None else str(label)

  for row, anchor in enumerate(anchors):
    members = bags.members(int(anchor))
    if len(members) > members_shown:
      members = np.sort(rng.choice(members, size=members_shown, replace=False))
    for column in range(columns):
      axis = axes[row, column]
      axis.set_xticks([])
      axis.set_yticks([])
      if column > len(members):
        axis.axis('off')
        continue
      index = int(anchor) if column == 0 else int(members[column - 1])
      # With data.on_bad_image='skip' an undecodable image shows its replacement, as the
      # feature pass read it.
      axis.imshow(source.read(bad_images.replacements_of(source).replacement(index)))
      axis.set_title(('anchor ' if column == 0 else '') + name(index), fontsize=6)
      if column == 0:
        colour, width = 'black', 3
      elif labels is not None:
        colour = 'green' if labels[index] == labels[anchor] else 'red'
        width = 2
      else:
        colour, width = 'grey', 1
      for spine in axis.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(width)
  figure.suptitle(f'{bags.method} bags: anchor, then bag members (green: same label)',
                  fontsize=8)
  figure.tight_layout()
  try:
    fileio.atomic_write(path, lambda f: figure.savefig(f, format='png', dpi=110))
  finally:
    plt.close(figure)
  return path


def write_report(bags: bag_file.Bags, source: Any, directory: str, *, num_anchors: int = 8,
                 members_shown: int = 8, seed: int = 0,
                 class_names: Optional[list] = None) -> dict:
  """Writes ``bag_report.json`` and ``bag_report.png`` into ``directory``; prints the purity.

  Args:
    bags: the bags.
    source: their image source (``read``, ``labels``; purity only when labels exist).
    directory: output directory.
    num_anchors: rows of the grid.
    members_shown: bag members per row.
    seed: which anchors are drawn.
    class_names: names of the label ids (default: ``source.class_names`` if any, else ids).
  Returns:
    The report dictionary written to ``bag_report.json``; ``bad_images_skipped`` holds the
    ``count`` and the ``images`` (index, file, problem, replaced_by) of the undecodable
    images this run's feature pass read as others (``data.on_bad_image='skip'``).
  """
  class_names = class_names or getattr(source, 'class_names', None)
  skipped = bad_images.replacements_of(source).records()
  report: dict = {'method': bags.method, 'num_images': bags.num_images,
                  'metadata': bags.metadata,
                  'bad_images_skipped': {'count': len(skipped), 'images': skipped}}
  if source.labels is not None:
    report.update(purity_summary(bags, source.labels, class_names))
    print(format_purity(report))
  report['grid'] = draw_bag_grid(bags, source, fileio.join(directory, 'bag_report.png'),
                                 num_anchors=num_anchors, members_shown=members_shown, seed=seed,
                                 class_names=class_names)
  path = fileio.join(directory, 'bag_report.json')
  fileio.write_json_atomically(path, report)
  print(f'bag report: {path}, {report["grid"]}')
  return report


def format_purity(report: dict) -> str:
  """A short human-readable purity table."""
  purity = report['purity']  # None when every bag is empty
  lines = [f'bag purity ({report["method"]}, {report["num_images"]} images, bag size '
           f'{report["bag_size"]["mean"]:.1f}): {"-" if purity is None else f"{purity:.4f}"} '
           f'(chance {report["chance_purity"]:.4f})']
  for name, value in report['purity_per_class'].items():
    lines.append(f'  {name:>14}: {"-" if value is None else f"{value:.4f}"}')
  return '\n'.join(lines)
