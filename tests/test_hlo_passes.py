"""benchmarks/hlo_passes.py: the pass counts of a hand-written HLO module and of a jitted function."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import hlo_passes

# A scanned step in the form XLA:GPU prints it: a cuDNN convolution as a custom call with a
# scratch buffer, the batch mean as a reduction fusion, centring and leaky ReLU as a loop
# fusion, an unnamed copy, and a loop of 3 iterations (dropout's random bits on XLA:CPU)
# inside the step. A copy in ENTRY, outside the step, must not count.
_TOY_HLO = """\
HloModule toy, entry_computation_layout={(f32[4,8,8,16]{3,2,1,0})->f32[4,8,8,16]{3,2,1,0}}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%fused_mean (param_0: f32[4,8,8,16]) -> f32[16] {
  %param_0 = f32[4,8,8,16]{3,2,1,0} parameter(0)
  %zero = f32[] constant(0)
  ROOT %reduce.1 = f32[16]{0} reduce(%param_0, %zero), dimensions={0,1,2}, to_apply=%add, metadata={op_name="jit(f)/while/body/student/jvp(ConvLarge)/conv1b/batch_norm/reduce_sum"}
}

%fused_centre (param_0.1: f32[4,8,8,16], param_1: f32[16]) -> f32[4,8,8,16] {
  %param_0.1 = f32[4,8,8,16]{3,2,1,0} parameter(0)
  %param_1 = f32[16]{0} parameter(1)
  %broadcast = f32[4,8,8,16]{3,2,1,0} broadcast(%param_1), dimensions={3}
  %subtract = f32[4,8,8,16]{3,2,1,0} subtract(%param_0.1, %broadcast), metadata={op_name="jit(f)/while/body/student/jvp(ConvLarge)/conv1b/batch_norm/sub"}
  ROOT %maximum = f32[4,8,8,16]{3,2,1,0} maximum(%subtract, %subtract), metadata={op_name="jit(f)/while/body/student/jvp(ConvLarge)/jit(leaky_relu)/max"}
}

%fused_bits (param_0.2: u32[4,8,8,16]) -> u32[4,8,8,16] {
  %param_0.2 = u32[4,8,8,16]{3,2,1,0} parameter(0)
  ROOT %xor = u32[4,8,8,16]{3,2,1,0} xor(%param_0.2, %param_0.2)
}

%inner_body (q: (s32[], u32[4,8,8,16])) -> (s32[], u32[4,8,8,16]) {
  %q = (s32[], u32[4,8,8,16]{3,2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%q), index=0
  %bits = u32[4,8,8,16]{3,2,1,0} get-tuple-element(%q), index=1
  %mixed = u32[4,8,8,16]{3,2,1,0} fusion(%bits), kind=kLoop, calls=%fused_bits
  ROOT %next = (s32[], u32[4,8,8,16]{3,2,1,0}) tuple(%i, %mixed)
}

%inner_cond (r: (s32[], u32[4,8,8,16])) -> pred[] {
  %r = (s32[], u32[4,8,8,16]{3,2,1,0}) parameter(0)
  %j = s32[] get-tuple-element(%r), index=0
  %three = s32[] constant(3)
  ROOT %lt = pred[] compare(%j, %three), direction=LT
}

%body (p: (s32[], f32[4,8,8,16], f32[3,3,16,16], u32[4,8,8,16])) -> (s32[], f32[4,8,8,16], f32[3,3,16,16], u32[4,8,8,16]) {
  %p = (s32[], f32[4,8,8,16]{3,2,1,0}, f32[3,3,16,16]{3,2,1,0}, /*index=3*/u32[4,8,8,16]{3,2,1,0}) parameter(0)
  %step = s32[] get-tuple-element(%p), index=0
  %h = f32[4,8,8,16]{3,2,1,0} get-tuple-element(%p), index=1
  %w = f32[3,3,16,16]{3,2,1,0} get-tuple-element(%p), index=2
  %seed = u32[4,8,8,16]{3,2,1,0} get-tuple-element(%p), index=3
  %cudnn = (f32[4,8,8,16]{3,2,1,0}, u8[0]{0}) custom-call(%h, %w), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convForward", metadata={op_name="jit(f)/while/body/student/jvp(ConvLarge)/conv1b/conv1b._project/conv_general_dilated"}
  %conv = f32[4,8,8,16]{3,2,1,0} get-tuple-element(%cudnn), index=0
  %mean = f32[16]{0} fusion(%conv), kind=kInput, calls=%fused_mean, metadata={op_name="jit(f)/while/body/student/jvp(ConvLarge)/conv1b/batch_norm/reduce_sum"}
  %act = f32[4,8,8,16]{3,2,1,0} fusion(%conv, %mean), kind=kLoop, calls=%fused_centre
  %view = f32[4,1024]{1,0} bitcast(%act)
  %moved = f32[4,1024]{0,1} copy(%view)
  %loop_in = (s32[], u32[4,8,8,16]{3,2,1,0}) tuple(%step, %seed)
  %loop = (s32[], u32[4,8,8,16]{3,2,1,0}) while(%loop_in), condition=%inner_cond, body=%inner_body, metadata={op_name="jit(f)/while/body/student/jvp(ConvLarge)/Dropout_0/jit(_bernoulli)/while"}, backend_config={"known_trip_count":{"n":"3"}}
  %bits_out = u32[4,8,8,16]{3,2,1,0} get-tuple-element(%loop), index=1
  %h_out = f32[4,8,8,16]{3,2,1,0} bitcast(%moved)
  ROOT %out = (s32[], f32[4,8,8,16]{3,2,1,0}, f32[3,3,16,16]{3,2,1,0}, /*index=3*/u32[4,8,8,16]{3,2,1,0}) tuple(%step, %h_out, %w, %bits_out)
}

%cond (c: (s32[], f32[4,8,8,16], f32[3,3,16,16], u32[4,8,8,16])) -> pred[] {
  %c = (s32[], f32[4,8,8,16]{3,2,1,0}, f32[3,3,16,16]{3,2,1,0}, /*index=3*/u32[4,8,8,16]{3,2,1,0}) parameter(0)
  %k = s32[] get-tuple-element(%c), index=0
  %two = s32[] constant(2)
  ROOT %less = pred[] compare(%k, %two), direction=LT
}

ENTRY %main (x: f32[4,8,8,16], w0: f32[3,3,16,16], s: u32[4,8,8,16]) -> f32[4,8,8,16] {
  %x = f32[4,8,8,16]{3,2,1,0} parameter(0)
  %w0 = f32[3,3,16,16]{3,2,1,0} parameter(1)
  %s = u32[4,8,8,16]{3,2,1,0} parameter(2)
  %x_copy = f32[4,8,8,16]{3,2,1,0} copy(%x)
  %zero_step = s32[] constant(0)
  %init = (s32[], f32[4,8,8,16]{3,2,1,0}, f32[3,3,16,16]{3,2,1,0}, /*index=3*/u32[4,8,8,16]{3,2,1,0}) tuple(%zero_step, %x_copy, %w0, %s)
  %scan = (s32[], f32[4,8,8,16]{3,2,1,0}, f32[3,3,16,16]{3,2,1,0}, /*index=3*/u32[4,8,8,16]{3,2,1,0}) while(%init), condition=%cond, body=%body, metadata={op_name="jit(f)/while"}
  ROOT %result = f32[4,8,8,16]{3,2,1,0} get-tuple-element(%scan), index=1
}
"""
_ACTIVATION = 4 * 8 * 8 * 16


def _toy_kernels():
  module = hlo_passes.parse_module(_TOY_HLO)
  is_activation = hlo_passes.activation_predicate(frozenset({_ACTIVATION}), [(3, 3, 16, 16)])
  return module, {k.name: k for k in hlo_passes.step_kernels(module, is_activation)}


def test_toy_module_parses_tuple_shapes_and_called_computations():
  module = hlo_passes.parse_module(_TOY_HLO)
  assert module.entry == 'main'
  p = module.by_name['p']
  assert [t.dtype for t in p.shapes] == ['s32', 'f32', 'f32', 'u32']
  assert p.shapes[3].dims == (4, 8, 8, 16)
  loop = module.by_name['loop']
  assert (loop.opcode, loop.trip_count) == ('while', 3)
  assert set(loop.called) == {'inner_cond', 'inner_body'}
  assert module.by_name['cudnn'].target == '__cudnn$convForward'
  assert module.by_name['cudnn'].operands == ('h', 'w')


def test_toy_step_kernels_by_hand():
  module, kernels = _toy_kernels()
  assert hlo_passes.step_computation(module) == 'body'  # Not ENTRY: its copy is outside the step.
  # name: (kind, phase, layer, reads, writes, repeats), worked out from the text above.
  expected = {
      'cudnn': ('convolution', 'student fwd', 'conv1b', 1, 1, 1),
      'mean': ('reduction', 'student fwd', 'conv1b', 1, 0, 1),
      'act': ('elementwise', 'student fwd', 'conv1b', 1, 1, 1),
      'moved': ('copy/transpose', 'other', 'other', 1, 1, 1),
      'mixed': ('elementwise', 'student fwd', 'Dropout_0', 1, 1, 3),
  }
  assert {name: (k.kind, k.phase, k.layer, len(k.reads), len(k.writes), k.repeats)
          for name, k in kernels.items()} == expected
  assert kernels['act'].ops == ('batch_norm', 'leaky_relu')
  passes = 1 + 1 + 1 + 1 + 1 + 1 + 1 + 3 * 2
  assert sum(k.passes for k in kernels.values()) == passes
  assert sum(k.bytes for k in kernels.values()) == passes * _ACTIVATION * 4


def test_toy_tables_add_up():
  _, kernels = _toy_kernels()
  tallies = hlo_passes.summarize(kernels.values(), lambda k: (k.phase,))
  assert tallies[('student fwd',)].kernels == {'convolution': 1, 'reduction': 1, 'elementwise': 4}
  assert (tallies[('student fwd',)].reads, tallies[('student fwd',)].writes) == (6, 5)
  table = hlo_passes.format_table(tallies, ('phase',))
  assert table.splitlines()[-1].split() == ['total', '1', '1', '4', '1', '7', '7', '6', '13',
                                            f'{13 * _ACTIVATION * 4 / 1e6:.1f}']


def test_weights_of_an_activation_size_are_not_activations():
  # conv3a's kernel at width 128 has as many elements as the unlabelled batch's conv3b output.
  sizes = hlo_passes.convlarge_activation_sizes(128, (32, 128))
  assert 128 * 6 * 6 * 256 == 3 * 3 * 256 * 512
  is_activation = hlo_passes.activation_predicate(sizes, [(3, 3, 256, 512)])
  assert is_activation(hlo_passes.Tensor('bf16', (128, 6, 6, 256)))
  assert is_activation(hlo_passes.Tensor('f32', (128 * 36, 256)))  # A 1x1 conv's dot operand.
  assert not is_activation(hlo_passes.Tensor('f32', (3, 3, 256, 512)))
  assert not is_activation(hlo_passes.Tensor('f32', (3, 3, 512, 256)))  # The flipped kernel.
  assert not is_activation(hlo_passes.Tensor('f32', (128, 10)))


def test_jitted_conv_batch_norm_leaky_relu():
  """XLA's own HLO: one convolution writes the activation, and a reduction reads it (the mean)."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 3)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 3, 16)), jnp.float32)

  def f(x, w):
    with jax.named_scope('conv1a'):
      a = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      with jax.named_scope('batch_norm'):
        a = a - jnp.mean(a, axis=(0, 1, 2))
    return jnp.sum(jax.nn.leaky_relu(a, 0.1) ** 2)

  text = jax.jit(f).lower(x, w).compile().as_text()
  module = hlo_passes.parse_module(text)
  size = math.prod((4, 8, 8, 16))
  kernels = hlo_passes.step_kernels(
      module, hlo_passes.activation_predicate(frozenset({size}), [w.shape]))
  convolutions = [k for k in kernels if k.kind == 'convolution']
  assert len(convolutions) == 1
  assert [t.dims for t in convolutions[0].writes] == [(4, 8, 8, 16)]
  assert any(k.kind == 'reduction' and k.reads for k in kernels)
