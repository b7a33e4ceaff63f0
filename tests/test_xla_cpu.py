"""lcmt_jax.xla_cpu: the XLA:CPU flags are added by one explicit call, never over the user's."""

import os
import subprocess
import sys
import types

import jax
import pytest

from lcmt_jax import experiment
from lcmt_jax import xla_cpu
from lcmt_jax.testing.runs import REPO
from lcmt_jax.xla_cpu import flags as cpu_flags

SETTING = f'--{cpu_flags.FLAG}={cpu_flags.VALUE}'


@pytest.mark.skipif(not cpu_flags.jaxlib_knows_flag(),
                    reason='the installed jaxlib has no such flag')
def test_the_suites_set_up_call_set_the_flag_before_jax_started():
  assert SETTING in os.environ['XLA_FLAGS'].split()  # tests/conftest.py calls configure().
  assert jax.devices()  # The backend that read the flag started fine.


def test_importing_lcmt_jax_changes_no_flag():
  script = ('import os; import lcmt_jax, train; from lcmt_jax import evaluate, models, trainer; '
            'print(os.environ.get("XLA_FLAGS", "<unset>"))')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=env, check=True,
                          capture_output=True, text=True)
  assert result.stdout.strip() == '<unset>'


@pytest.mark.parametrize('environment', [
    {'XLA_FLAGS': f'--{cpu_flags.FLAG}=default'},
    {'LCMT_XLA_CPU_FLAGS': '0', 'XLA_FLAGS': ''},
], ids=['user_flag_wins', 'opt_out'])
def test_configure_leaves_the_users_choice(monkeypatch, environment):
  for name, value in environment.items():
    monkeypatch.setenv(name, value)
  assert SETTING not in xla_cpu.configure()
  assert os.environ['XLA_FLAGS'] == environment['XLA_FLAGS']


def test_jaxlib_defines_finds_names_in_the_xla_library():
  assert cpu_flags.jaxlib_defines(b'xla_dump_to')  # A flag every XLA has.
  assert not cpu_flags.jaxlib_defines(b'xla_dump_to', b'xla_no_such_flag_in_any_version')


def _fake_jaxlib(tmp_path, monkeypatch, library: bytes) -> None:
  """Makes cpu_flags read `library` as jaxlib's XLA library."""
  (tmp_path / 'libjax_common.so').write_bytes(library)
  monkeypatch.setattr(cpu_flags.importlib.util, 'find_spec', lambda name: types.SimpleNamespace(
      submodule_search_locations=[str(tmp_path)]))


def test_a_flag_is_a_name_between_nuls_not_a_reserved_field_name(tmp_path, monkeypatch):
  assert cpu_flags.jaxlib_has_flag('xla_dump_to')  # In the installed jaxlib.
  assert not cpu_flags.jaxlib_has_flag('xla_dump_t')
  # How jaxlib 0.11 holds a registered flag, and a removed one kept as a reserved field name.
  _fake_jaxlib(tmp_path, monkeypatch, b'\x00xla_cpu_registered\x00\x1bxla_cpu_removedR\x00')
  assert cpu_flags.jaxlib_has_flag('xla_cpu_registered')
  assert cpu_flags.jaxlib_defines(b'xla_cpu_removed')
  assert not cpu_flags.jaxlib_has_flag('xla_cpu_removed')


BF16_SETTING = f'--{cpu_flags.BF16_FLAG}={cpu_flags.BF16_VALUE}'


@pytest.mark.parametrize('compute_dtype, library, xla_flags, added', [
    ('bfloat16', b'\x00' + cpu_flags.BF16_FLAG.encode() + b'\x00', '--xla_dump_to=/tmp/x', True),
    ('float32', b'\x00' + cpu_flags.BF16_FLAG.encode() + b'\x00', '--xla_dump_to=/tmp/x', False),
    ('bfloat16', b'\x00xla_dump_to\x00', '--xla_dump_to=/tmp/x', False),
    ('bfloat16', b'\x00' + cpu_flags.BF16_FLAG.encode() + b'\x00', f'--{cpu_flags.BF16_FLAG}=false',
     False),
], ids=['bfloat16', 'float32_never', 'jaxlib_without_the_flag', 'user_flag_wins'])
def test_onednn_flag_only_for_bfloat16_runs(tmp_path, monkeypatch, compute_dtype, library,
                                            xla_flags, added):
  _fake_jaxlib(tmp_path, monkeypatch, library)
  monkeypatch.setenv('XLA_FLAGS', xla_flags)
  assert xla_cpu.configure(compute_dtype) == ([BF16_SETTING] if added else [])
  want = f'{xla_flags} {BF16_SETTING}' if added else xla_flags
  assert os.environ['XLA_FLAGS'] == want


@pytest.mark.parametrize('environment, backend, unoptimised, want', [
    ({}, 'cpu', False, {cpu_flags.OPT_LEVEL_OPTION: cpu_flags.OPT_LEVEL}),
    ({'LCMT_XLA_CPU_FLAGS': '0'}, 'cpu', False, None),
    ({'XLA_FLAGS': f'--{cpu_flags.OPT_LEVEL_OPTION}=3'}, 'cpu', False, None),
    ({}, 'cpu', True, None),
    ({}, 'gpu', False, None),
], ids=['cpu', 'opt_out', 'user_flag_wins', 'most_optimizations_disabled', 'accelerator'])
def test_compiler_options_lower_llvm_level_on_the_cpu_only(monkeypatch, environment, backend,
                                                           unoptimised, want):
  monkeypatch.delenv('LCMT_XLA_CPU_FLAGS', raising=False)
  monkeypatch.setenv('XLA_FLAGS', os.environ.get('XLA_FLAGS', '').replace(
      cpu_flags.OPT_LEVEL_OPTION, 'xla_unrelated'))
  for name, value in environment.items():
    monkeypatch.setenv(name, value)
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  before = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', unoptimised)
  try:
    assert xla_cpu.compiler_options() == want
  finally:
    jax.config.update('jax_disable_most_optimizations', before)


def _double(x):
  return 2 * x


def test_run_programs_are_compiled_with_the_compiler_options(monkeypatch):
  jit = experiment.cached_jit.__wrapped__  # Not the cached factory.
  x = jax.numpy.arange(3.0)
  assert list(jit(_double, out_shardings=None)(x)) == [0.0, 2.0, 4.0]  # The real options compile.
  # An option XLA does not know fails the compilation: proof that the options reach XLA.
  monkeypatch.setattr(xla_cpu, 'compiler_options', lambda: {'xla_no_such_option_anywhere': 1})
  with pytest.raises(Exception, match='xla_no_such_option_anywhere'):
    jit(_double, out_shardings=None)(x)
