"""`files.write_atomically`: whole files or none, no write through a planted link."""

import os

import pytest

from lcmt_jax import files


def test_write_atomically_replaces_the_file_and_leaves_no_temporary(tmp_path):
  path = tmp_path / 'record.json'
  path.write_text('old')
  files.write_atomically(str(path), '{"new": 1}')
  assert path.read_text() == '{"new": 1}'
  assert os.listdir(tmp_path) == ['record.json']
  files.write_atomically(str(path), b'\x00\x01')
  assert path.read_bytes() == b'\x00\x01'


def test_write_atomically_replaces_a_planted_link_instead_of_writing_through_it(tmp_path):
  victim = tmp_path / 'victim'
  victim.write_text('keep me')
  link = tmp_path / 'cache.npz'
  link.symlink_to(victim)
  files.write_atomically(str(link), 'data')
  assert victim.read_text() == 'keep me'
  assert not link.is_symlink() and link.read_text() == 'data'


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path, monkeypatch):
  path = tmp_path / 'summary.json'
  path.write_text('old')

  def fail(*_):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(os, 'fsync', fail)
  with pytest.raises(OSError):
    files.write_atomically(str(path), 'new')
  assert path.read_text() == 'old'
  assert os.listdir(tmp_path) == ['summary.json']


def test_the_new_file_gets_the_mode_less_the_umask(tmp_path):
  path = tmp_path / 'split.json'
  old = os.umask(0o022)
  try:
    files.write_atomically(str(path), 'x', mode=0o666)
  finally:
    os.umask(old)
  assert (path.stat().st_mode & 0o777) == 0o644
