"""Small helpers shared by several test modules."""

import pathlib
import shutil


def copy_of_data_dir(cifar10_dir, tmp_path: pathlib.Path):
  """A private copy of the `cifar10_dir` fixture's data_dir, to damage, and its version directory."""
  data_dir = tmp_path / 'tfds'
  shutil.copytree(cifar10_dir[0], data_dir)
  (version_dir,) = (data_dir / 'cifar10').iterdir()
  return data_dir, version_dir


def directory_contents(directory: pathlib.Path) -> dict:
  """Every path under `directory` with its bytes (None for a directory), to compare before and after."""
  return {p: p.read_bytes() if p.is_file() else None for p in sorted(directory.rglob('*'))}
