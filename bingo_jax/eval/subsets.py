"""Labelled subsets for semi-supervised fine-tuning (1% / 10% of the labels).

Either the SimCLR split files (text files of ImageNet image file names, one per line, e.g.
``n01440764_10026.JPEG``), matched against the source's image identifiers by file name, or a
class-balanced subset drawn with a fixed seed. A drawn subset is written to the workdir in the
same format (one identifier per line), so it can be inspected and passed back as a split file.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from bingo_jax.store import fileio


def class_balanced_subset(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
  """A subset of ``round(fraction * N)`` images whose class counts differ by at most one.

  Every class gets ``size // C`` images; the ``size % C`` classes that get one more are drawn
  with the seed, and so are the images within each class.

  Args:
    labels: ``(N,)`` int class ids.
    fraction: in ``(0, 1]``.
    seed: the draw; the same seed gives the same subset.
  Returns:
    Sorted ``(size,)`` int64 image indices.
  Raises:
    ValueError: if a class has fewer images than its share.
  """
  labels = np.asarray(labels)
  if not 0 < fraction <= 1:
    raise ValueError(f'finetune fraction must be in (0, 1], got {fraction}.')
  classes = np.unique(labels)
  size = int(round(fraction * len(labels)))
  if size < len(classes):
    raise ValueError(f'fraction {fraction} of {len(labels)} images is {size} images, fewer '
                     f'than the {len(classes)} classes: no class-balanced subset.')
  rng = np.random.default_rng(seed)
  quota = np.full(len(classes), size // len(classes))
  quota[rng.choice(len(classes), size % len(classes), replace=False)] += 1
  chosen = []
  for label, count in zip(classes, quota):
    members = np.flatnonzero(labels == label)
    if len(members) < count:
      raise ValueError(f'class {label} has {len(members)} images, fewer than its share of '
                       f'{count} for a {fraction:.2%} class-balanced subset.')
    chosen.append(rng.choice(members, size=count, replace=False))
  return np.sort(np.concatenate(chosen)).astype(np.int64)


def read_split_file(path: str, identifiers: list[str]) -> np.ndarray:
  """Indices of the images a split file names.

  Args:
    path: text file, one image per line (blank lines ignored): an identifier of the source
      (as ``write_split_file`` writes) or a file name (SimCLR splits), matched by base name.
    identifiers: the source's ordered image identifiers (``source.identifiers()``).
  Returns:
    Sorted ``(n,)`` int64 indices.
  Raises:
    ValueError: naming the file and the first entries that match no image, or that match more
      than one.
  """
  if not fileio.isfile(path):
    raise FileNotFoundError(f'finetune split file {path} does not exist (eval.finetune_split_file).')
  with fileio.open_file(path, 'r') as f:
    names = [line.strip() for line in f if line.strip()]
  by_identifier = {identifier: index for index, identifier in enumerate(identifiers)}
  by_basename: dict[str, list[int]] = {}
  for index, identifier in enumerate(identifiers):
    by_basename.setdefault(os.path.basename(identifier), []).append(index)
  indices, missing, ambiguous = [], [], []
  for name in names:
    if name in by_identifier:
      indices.append(by_identifier[name])
      continue
    matches = by_basename.get(os.path.basename(name), [])
    if len(matches) == 1:
      indices.append(matches[0])
    elif matches:
      ambiguous.append(name)
    else:
      missing.append(name)
  if missing or ambiguous:
    problems = []
    if missing:
      problems.append(f'{len(missing)} of {len(names)} entries name no image of the data '
                      f'(first: {missing[:3]}; identifiers look like {identifiers[:2]})')
    if ambiguous:
      problems.append(f'{len(ambiguous)} entries match several images (first: {ambiguous[:3]})')
    raise ValueError(f'finetune split file {path}: ' + '; '.join(problems) + '.')
  indices = np.unique(np.asarray(indices, np.int64))
  if len(indices) != len(names):
    raise ValueError(f'finetune split file {path}: {len(names) - len(indices)} entries are '
                     'listed twice.')
  return indices


def write_split_file(path: str, indices: np.ndarray, identifiers: list[str]) -> str:
  """Writes the identifiers of ``indices``, one per line, atomically. Returns ``path``."""
  return fileio.write_text_atomically(path, ''.join(identifiers[i] + '\n' for i in indices))


def finetune_subset(identifiers: list[str], labels: np.ndarray, *, workdir: str,
                    fraction: float, seed: int = 0,
                    split_file: Optional[str] = None,
                    write: bool = True) -> tuple[np.ndarray, str]:
  """The labelled subset of the fine-tuning protocol.

  Args:
    identifiers: the training source's identifiers.
    labels: its ``(N,)`` labels.
    workdir: where a drawn subset is written.
    fraction: labelled fraction (used when ``split_file`` is None); 1 takes every image.
    seed: draw seed.
    split_file: SimCLR-style split file to use instead of drawing.
    write: write a drawn subset (process 0 only on multi-host runs; the draw itself is the
      same on every process).
  Returns:
    ``(indices, path)``: sorted int64 indices and the split file they come from or were
    written to (``WORKDIR/finetune_subset_{fraction}_seed{seed}.txt``).
  """
  if split_file:
    return read_split_file(split_file, identifiers), split_file
  # Fraction 1: every labelled image, whatever the class counts (a supervised network on the
  # whole training split); a class-balanced draw would drop images of the larger classes.
  indices = (np.arange(len(labels), dtype=np.int64) if fraction == 1 else
             class_balanced_subset(labels, fraction, seed))
  path = fileio.join(workdir, f'finetune_subset_{fraction:g}_seed{seed}.txt')
  if write:
    write_split_file(path, indices, identifiers)
  return indices, path
