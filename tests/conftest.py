"""Fixtures shared by several test modules, and the suite's compilation settings."""

import os
import sys

import jax
import numpy as np
import pytest

from lcmt_jax import data_sources
from lcmt_jax import experiment
from lcmt_jax import xla_cpu
from lcmt_jax.xla_cpu import flags as xla_cpu_flags

# The XLA:CPU flags train.py sets, before JAX starts (subprocesses inherit them).
xla_cpu.configure()

# The suite compiles the same tiny train steps in many tests and in the subprocesses
# they start; a persistent cache (inherited by subprocesses through the environment)
# compiles each once per machine. Set JAX_COMPILATION_CACHE_DIR to move or share it.
# Most tests check behaviour (files, resumes, messages, runs equal to each other), not
# float values, and compile much faster with XLA's optimisations off, as the flax
# examples' tests run; the modules marked `numerics` compare against oracles at tolerances
# measured on optimised code (`pytestmark = pytest.mark.numerics`, a module-level mark)
# and switch them back on (`_optimised_for_numerics`); they run last, so the switch happens once
# (once per worker under pytest-xdist, whose scheduler hands tests out in this order).
# JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs the whole suite optimised.
_SETTINGS = {
    'jax_compilation_cache_dir': os.environ.setdefault(
        'JAX_COMPILATION_CACHE_DIR',
        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '.pytest_cache',
                     'jax_compilation_cache')),
    'jax_persistent_cache_min_compile_time_secs': float(os.environ.setdefault(
        'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')),
    'jax_disable_most_optimizations': os.environ.setdefault(
        'JAX_DISABLE_MOST_OPTIMIZATIONS', '1').lower() in ('1', 'true', 'yes', 'on'),
}
for _name, _value in _SETTINGS.items():
  jax.config.update(_name, _value)

# XLA:CPU's default fusion emitters take about 1.7x the time of its older loop emitters to
# compile the suite's programs (run_steps of the tiny run: 4.9 s against 2.9 s); the suite,
# which compiles dozens, uses the older ones where jaxlib has the flag. Subprocesses inherit
# it (`subprocess_xla_flags` for those that set XLA_FLAGS); a value in XLA_FLAGS wins.
_EMITTERS = 'xla_cpu_use_fusion_emitters'
if xla_cpu_flags.jaxlib_has_flag(_EMITTERS) and _EMITTERS not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} --{_EMITTERS}=false'.strip()


def subprocess_xla_flags(*flags: str) -> str:
  """`XLA_FLAGS` for a subprocess that sets its own: `flags` and the suite's choice of emitters."""
  return ' '.join([f for f in os.environ.get('XLA_FLAGS', '').split() if _EMITTERS in f]
                  + list(flags))


def pytest_collection_modifyitems(items):
  """Modules marked `numerics` run after the others (a stable sort), so the suite switches
  XLA's optimisations once and keeps every other module's compiled functions in memory."""
  items.sort(key=lambda item: item.get_closest_marker('numerics') is not None)


@pytest.fixture(autouse=True, scope='module')
def _optimised_for_numerics(request):
  """XLA's optimisations on while a module marked `numerics` runs, if the suite turned them off."""
  unoptimised = (_SETTINGS['jax_disable_most_optimizations']
                 and request.node.get_closest_marker('numerics') is None)
  if jax.config.read('jax_disable_most_optimizations') != unoptimised:
    jax.config.update('jax_disable_most_optimizations', unoptimised)
    jax.clear_caches()  # The flag is not part of jit's cache key: drop the other executables,
    experiment.clear_compiled()  # and the compiled functions of runs, whose compiler
    # options (`xla_cpu.compiler_options`) were read with the flag.


_CIFAR10_FILES = [f'data_batch_{i}.bin' for i in range(1, 6)] + ['test_batch.bin']
_CIFAR10_CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse',
                    'ship', 'truck']


def _cifar10_binary(num_records, seed):
  """One CIFAR-10 binary file: per record a label byte, then the image channel by channel."""
  rng = np.random.RandomState(seed)
  images = rng.randint(0, 256, (num_records, 32, 32, 3)).astype(np.uint8)
  labels = rng.randint(0, 10, num_records).astype(np.uint8)
  records = np.concatenate([labels[:, None], images.transpose(0, 3, 1, 2).reshape(-1, 3072)], 1)
  return records.tobytes(), images, labels.astype(np.int32)


@pytest.fixture(scope='session')
def cifar10_dir(tmp_path_factory):
  """A real tfds CIFAR-10, prepared once by tfds's own builder from small fake binary files.

  Returns the data_dir and the `(train_images, train_labels, test_images,
  test_labels)` written, in file order.
  """
  tfds = pytest.importorskip('tensorflow_datasets')  # Absent on the GPU image.

  download = tmp_path_factory.mktemp('download')
  batches = download / 'cifar-10-batches-bin'
  batches.mkdir()
  written = []
  for seed, name in enumerate(_CIFAR10_FILES):
    data, images, labels = _cifar10_binary(3 if name == 'test_batch.bin' else 2, seed)
    (batches / name).write_bytes(data)
    written.append((images, labels))
  (batches / 'batches.meta.txt').write_text('\n'.join(_CIFAR10_CLASSES) + '\n')
  data_dir = tmp_path_factory.mktemp('tfds')
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(tfds.download.DownloadManager, 'download_and_extract',
                  lambda self, url: str(download))
    tfds.builder('cifar10', data_dir=str(data_dir)).download_and_prepare()
  train_images, train_labels = (np.concatenate(a) for a in zip(*written[:-1]))
  return data_dir, (train_images, train_labels, *written[-1])


@pytest.fixture(scope='session')
def one_epoch_run(tmp_path_factory):
  """`(workdir, config, summary)` of one epoch of `tiny_config`, trained once for the suite.

  Tests read it; a test that writes works on a copy.
  """
  from lcmt_jax import trainer  # pylint: disable=import-outside-toplevel
  from tests.test_trainer import tiny_config  # pylint: disable=import-outside-toplevel

  workdir = str(tmp_path_factory.mktemp('runs') / 'mt_lc_seed0')
  config = tiny_config(num_epochs=1)
  return workdir, config, trainer.train_and_evaluate(config, workdir)


@pytest.fixture
def offline(monkeypatch):
  """No network: a data set that is not prepared fails at once instead of downloading."""
  monkeypatch.setattr(data_sources, 'network_reachable', lambda host: False)


def run_train(*args: str) -> int:
  """Runs `train.py ARGS` in this process; returns its exit status.

  The flags are parsed as `absl.app.run` parses them.
  """
  from absl import flags  # pylint: disable=import-outside-toplevel
  import train  # pylint: disable=import-outside-toplevel  # Defines its flags on import.
  from lcmt_jax import errors  # pylint: disable=import-outside-toplevel

  argv = ['train.py', *args]
  flags.FLAGS.unparse_flags()
  for name in [n for n in flags.FLAGS if n.startswith('config.')]:
    delattr(flags.FLAGS, name)  # ml_collections defines the overrides anew at each parse.
  with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as exit_info:
    patch.setattr(sys, 'argv', argv)  # Where ml_collections finds the overrides.
    train.main(errors.parse_flags_or_exit(argv))
    raise SystemExit(0)
  return exit_info.value.code


@pytest.fixture
def train_cli(capsys):
  """`train_cli(*args)` -> `(exit status, the error: lines of stderr)` of `train.py` in-process."""

  def run(*args):
    code = run_train(*args)
    stderr = capsys.readouterr().err
    return code, [line for line in stderr.splitlines() if line.startswith('error:')]

  return run
