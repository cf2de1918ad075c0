"""The Triton backend: the momentum update of sgd_math.h as Triton kernels.

Contract (the CUDA one, csrc/cuda/sgd_kernel.cuh): bit for bit torch.optim.SGD(foreach=False) on a
GPU, where every torch op computes in opmath (fp32 for fp32/bf16/fp16, fp64 for fp64) with an
opmath alpha (NOT narrowed to bf16/fp16) and rounds its result to the storage dtype, round to
nearest even. The formula, in the order of sgd_math.h, with r() = that rounding:
    g   = -g                                  (maximize)
    g   = r(fma(p, wd, g))                    (weight_decay != 0)
    buf = g                                   (first step: torch clones the gradient)
    buf = r(fma(g, 1-d, r(buf * m)))          (later steps)
    g   = r(fma(buf, m, g)) if nesterov else buf
    p   = r(fma(g, -lr, p))
Scalars are the user's doubles rounded ONCE on the host to opmath (float(1 - d), not
1.0f - float(d)); they reach the kernel as fp64 arguments holding those exact values and are
narrowed (exactly) to opmath inside. The kernels are compiled with enable_fp_fusion=False, and
every multiply-add is an explicit tl.fma, so no contraction can change the bits.

r() for bf16 and fp16 is integer bit arithmetic (round to nearest even), not a cast: Triton's
interpreter (TRITON_INTERPRET=1) TRUNCATES fp32 -> bf16 casts, while compiled GPU code rounds to
nearest even; with explicit rounding the later store cast is exact in both.

Block size (every kernel): BLOCK_SIZE = 1024 elements per program, num_warps = 4 (128 threads, 8
elements per thread: in the flat kernel two 16-byte accesses per tensor per thread for fp32, one
for bf16/fp16, four 8-byte for fp64; in the list kernel 8 element-wide accesses, see below). The
update is memory bound (read p, g, buf; write p, buf); 1024 keeps enough bytes in flight per SM
without register pressure, and a 1024-element tail costs at most one masked program (in the list
kernel: at most one per tensor, so a model of many tiny tensors runs mostly masked lanes).
Offsets are int64 (flat: pid is widened before the multiply; list: block starts are int64
table entries): spans longer than 2^31 elements work.

Entry points (the ops' signatures, csrc/momentum_ops.cpp):
    triton_sgd_step_flat_(param, grad, momentum_buffer, segments, *, lr, momentum, dampening,
                          weight_decay, nesterov, maximize, first_step, lr_tensor=None,
                          grad_scale=None, found_inf=None, clip_coef=None,
                          momentum_tensor=None, dampening_tensor=None,
                          weight_decay_tensor=None, first_step_tensor=None)
    triton_sgd_step_list_(params, grads, momentum_buffers, *, ...)
    triton_sgd_step_master_list_(params, grads, momentum_buffers, remainders, ties, *, lr,
                                 momentum, dampening, weight_decay, nesterov, maximize,
                                 first_step, found_inf=None, lr_tensor=None, ...)
    triton_sgd_step_sr_list_(params, grads, momentum_buffers, keys, *, lr, momentum, dampening,
                             weight_decay, nesterov, maximize, first_step, offsets=None,
                             lr_tensor=None, ...)
    triton_sgd_step_qmom_list_(params, grads, momentum_buffers, scales, *, lr, momentum,
                               dampening, weight_decay, nesterov, maximize, first_step,
                               found_inf=None, lr_tensor=None, ...)
    triton_sgd_step_fp16_master_list_(params, grads, momentum_buffers, masters, *, lr,
                                      momentum, dampening, weight_decay, nesterov, maximize,
                                      first_step, found_inf=None, lr_tensor=None, ...)
lr_tensor, momentum_tensor, dampening_tensor, weight_decay_tensor (every entry point): 1-element
fp32/fp64 tensors on the parameters' device read by the kernels in place of the floats (no host
sync), as the CUDA kernels read them (_sgd_block; the modes' kernels: _mode_scalars); with
momentum_tensor the buffers are given and a zero momentum leaves them unwritten. grad_scale, found_inf (torch.amp.GradScaler's, 1-element fp32) and
clip_coef (opt.clip_grad_norm_'s coefficient, 1-element, the parameters' dtype), all on the
parameters' device, are read by the kernels too, with the CUDA kernel's semantics
(sgd_kernel.cuh: amp_step, amp_grad, update_one): inv = fp32(1 / fp64(scale)); g = r(g * inv)
in opmath unless inv == 1; then g = r(g * coef) if clip_coef is given; that g is written back to
the gradient whenever grad_scale or clip_coef is given (also on a skipped step), and
found_inf != 0 skips the update of p and buf. first_step_tensor (1-element bool, with
first_step=True; capturable=True's device decision, optim._Unsure) makes it a first step where
it is true and a momentum step where it is false, as the CUDA kernels' device_flags. Each is a
tl.constexpr flag (AMP_SCALE, AMP_SKIP, CLIP, FIRST_TENSOR): off, the kernel compiles without it
(no extra load); on or off, a step makes the same launches.
The master-weights step (bf16 parameters with exact fp32 masters, csrc/include/momentum_cuda/
bf16_split.h; the op sgd_step_master_list_ of the C++ extension, whose checks it repeats) takes
the floats only: no hyper-parameter tensors, no AMP; so does the stochastic-rounding step (bf16
parameters, gradients and buffers, csrc/include/momentum_cuda/stochastic.h; the op
sgd_step_sr_list_, whose checks it repeats), which takes a key per parameter as well, and so
does momentum_dtype (fp32 parameters, narrow momentum buffers, csrc/include/momentum_cuda/
momentum_dtype.h; the op sgd_step_qmom_list_, whose checks it repeats), and so do fp16 master
weights (fp16 parameters with separate fp32 masters, csrc/include/momentum_cuda/fp16_master.h;
the op sgd_step_fp16_master_list_, whose checks it repeats).
All validate everything before the first launch; a bad call raises ValueError/TypeError naming
the argument and changes nothing.

Kernels: the flat and the list kernel call ONE _sgd_block (load, _sgd_math, store), so the
formula exists once; the master kernel calls _sgd_math too.
- _sgd_flat_kernel: one contiguous span per launch; the flat path launches it once per non-empty
  segment.
- _sgd_list_kernel: the list path, ONE launch for all tensors of a step. The host builds an
  int64 pointer table (_list_table): per tensor [address of p, of g, of buf, numel], then a block
  map with one row per program [tensor index, first element of its block], so program k updates
  one BLOCK of one tensor; the table reaches the device in one host-to-device copy (pinned,
  non_blocking). The kernel casts the addresses to typed pointers (int64 -> tl.pointer_type(DTYPE),
  accepted by the interpreter and by compiled code). Those pointers carry no alignment
  guarantee, so compiled list-kernel accesses are scalar, not 128-bit like the flat kernel's
  (which the Triton JIT specialises on 16-byte-aligned pointers and counts divisible by 16).
  Empty tensors get no row and no program. A dense tensor with any strides is walked from
  data_ptr() over numel elements in memory order (p, g and buf have equal strides). The launch is
  split only past CUDA's grid limit of 2^31 - 1 programs (2^41 elements). Table size: 32 bytes
  per tensor + 16 per program (about 0.4 MB for 25 M parameters), built once per set of
  addresses and sizes and reused while they do not change (_cached_list_table: the last 8);
  each program reads 48 bytes of table for 20 KB of fp32 data.
- _sgd_master_kernel: the master-weights step, one launch through the same pointer table with
  rows of 6 (addresses of p, g, buf, remainder, tie bytes; numel). Join and split are integer
  bit arithmetic on uint16 pointers (_bf16_join, _bf16_split: the interpreter's truncating
  bf16 cast is never used); _sgd_math runs with KIND 0 (fp32 master, no storage rounding).
  BLOCK_SIZE is a multiple of 8, so a program owns whole tie bytes: it gathers byte offs // 8
  for each element's bit and writes its bytes packed by a (BLOCK // 8, 8) reshape.
- _sgd_sr_kernel: stochastic rounding, one launch through the list kernel's table (rows of 4:
  p, g, buf, numel; the same cached table) plus a small int64 tensor of the tensors' keys,
  copied at every step (the keys change at every step, the table does not). The fp32 step is
  _sgd_math with KIND 0, as the master kernel's (_mode_step); then the parameter's bits are
  (bits(m) + (r & 0xFFFF)) >> 16 (_bf16_round_stochastic; NaN -> 0x7FC0) with r = lowbias32(
  lowbias32(key ^ (i >> 32)) ^ (i mod 2^32)) for its memory-order index i in its whole tensor
  (the tensor's offset, a shard's place, travels next to its key; _lowbias32 in wrapping
  uint32 arithmetic; the inner hash twice per block: a block meets at most two values of
  i >> 32), and the buffer is rounded to nearest even (_bf16_rne). Integer bit arithmetic only.
- _sgd_qmom_kernel: momentum_dtype, one launch through the list kernel's table (bf16 buffers:
  rows of 4, the same cached table) or rows of 5 (int8: p, g, codes, scales, numel). A program's
  BLOCK is BLOCK // QBLOCK rows of QBLOCK = 256 elements, so it owns whole int8 blocks (block
  starts are multiples of BLOCK): row r is block start // QBLOCK + r of its tensor. _mode_step
  runs on the widened buffer (bf16 bits << 16, or code * scale) and the parameter takes that
  unquantized fp32 buffer; the buffer is stored by _bf16_rne, or quantized: a row's absmax is
  an integer max over _q8_abs_bits, the scale div_rn(absmax, 127) (div.rn.f32: Triton's fp32
  `/` is approximate), the codes div_rn(v, scale) clamped and rounded by adding and removing
  1.5 * 2^23 (_q8_scale, _q8_code). When the host finds every p, g and buffer address 16-byte
  aligned (ALIGNED), the pointers carry that hint and a block inside its tensor runs unmasked,
  so fp32 and bf16 accesses are 128-bit; the tensor's last block stays masked.
- _sgd_fp16_master_kernel: fp16 master weights, one launch through a table of rows of 5 (p, g,
  buf, master, numel). _mode_step on the master with the fp16 gradient widened (an exact
  cast); the parameter is stored as the bits of the new master's rounding (_fp16_bits: r() of
  KIND 2, then the exponent moved: integer arithmetic and one exact add, as c10 bit for bit,
  subnormals, inf and NaN 0x7E00 included). ALIGNED as in the momentum_dtype kernel (fp32
  master and buffer, fp16 parameter and gradient: all 128-bit in unmasked blocks).
"""
# No `from __future__ import annotations` in this module: postponed, the kernels' "fp64"
# annotations reach Triton as the text '"fp64"' (quotes included), which it does not read as a
# type, and the scalars compile as fp32 parameters. tests/test_triton_jit.py checks the JIT's
# compiled signatures.
import collections
import contextlib
import math
import struct

import torch

from ._util import is_dense as _dense

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
    TRITON_UNAVAILABLE_REASON = ""
except ImportError as e:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    TRITON_AVAILABLE = False
    TRITON_UNAVAILABLE_REASON = f"triton did not import ({e}); pip install triton"

BLOCK_SIZE = 1024
NUM_WARPS = 4
QBLOCK = 256  # elements per int8 momentum block (momentum_dtype.h's kQBlock)
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Storage kinds: how r() rounds an opmath value.
_KIND_NONE, _KIND_BF16, _KIND_FP16 = 0, 1, 2
_KIND = {torch.float32: _KIND_NONE, torch.float64: _KIND_NONE,
         torch.bfloat16: _KIND_BF16, torch.float16: _KIND_FP16}
_TL_DTYPE = ({torch.float32: tl.float32, torch.float64: tl.float64,
              torch.bfloat16: tl.bfloat16, torch.float16: tl.float16} if tl is not None else {})


def interpreting() -> bool:
    """Whether kernels run in Triton's CPU interpreter (decided when this module was imported:
    @triton.jit reads TRITON_INTERPRET at decoration time)."""
    return _INTERPRETED


def _to_f32(x: float) -> float:
    """A Python double rounded once to fp32 (round to nearest even), as a Python float."""
    return struct.unpack("f", struct.pack("f", x))[0]


if TRITON_AVAILABLE:

    @triton.jit
    def _round_storage(x, KIND: tl.constexpr):
        """r(): round an opmath value to the storage dtype (nearest even) and widen it back."""
        if KIND == 1:  # bf16: keep the top 16 bits of the fp32, rounded; NaN -> 0x7FC0 (c10)
            u = x.to(tl.uint32, bitcast=True)
            r = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
            r = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC00000, r)
            return r.to(tl.float32, bitcast=True)
        elif KIND == 2:  # fp16: 11 significant bits, subnormals below 2^-14, inf above 65504
            u = x.to(tl.uint32, bitcast=True)
            s = u & 0x80000000
            a = u & 0x7FFFFFFF
            # normal fp16 range: round away the low 13 mantissa bits (nearest even)
            rn = (a + 0xFFF + ((a >> 13) & 1)) & 0xFFFFE000
            rn = tl.where(rn > 0x477FE000, 0x7F800000, rn)  # beyond 65504: inf
            # fp16 subnormals (|x| < 2^-14): quantum 2^-24 = ulp of fp32 in [0.5, 1), so
            # (|x| + 0.5) - 0.5 rounds |x| to a multiple of 2^-24, nearest even, both ops exact
            # but the first
            ax = a.to(tl.float32, bitcast=True)
            sub = ((ax + 0.5) - 0.5).to(tl.uint32, bitcast=True)
            r = tl.where(a < 0x38800000, sub, rn)
            r = tl.where(a > 0x7F800000, 0x7FC00000, r)  # NaN stays NaN
            return (r | s).to(tl.float32, bitcast=True)
        else:
            return x

    @triton.jit
    def _sgd_math(p, buf, g, neg_lr, wd, m_mul, m_add, one_minus_d, wd_on, m_on,
                  MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, MOMENTUM: tl.constexpr,
                  NESTEROV: tl.constexpr, FIRST_STEP: tl.constexpr, KIND: tl.constexpr,
                  WD_TENSOR: tl.constexpr, M_TENSOR: tl.constexpr):
        """sgd_math.h, once: p, buf, g in opmath; scalars already opmath. WD_TENSOR /
        M_TENSOR: the weight decay / the momentum ops run where wd_on / m_on (a weight_decay
        or momentum read from device memory is nonzero: torch's `!= 0` tests), selected
        element by element; otherwise the flags alone decide."""
        if MAXIMIZE:
            g = -g
        if WEIGHT_DECAY:
            gw = _round_storage(tl.fma(p, wd, g), KIND)
            if WD_TENSOR:
                g = tl.where(wd_on, gw, g)
            else:
                g = gw
        if MOMENTUM:
            if FIRST_STEP:
                nb = g
            else:
                nb = _round_storage(tl.fma(g, one_minus_d, _round_storage(buf * m_mul, KIND)),
                                    KIND)
            if NESTEROV:
                ng = _round_storage(tl.fma(nb, m_add, g), KIND)
            else:
                ng = nb
            if M_TENSOR:
                buf = tl.where(m_on, nb, buf)
                g = tl.where(m_on, ng, g)
            else:
                buf = nb
                g = ng
        p = _round_storage(tl.fma(g, neg_lr, p), KIND)
        return p, buf

    @triton.jit
    def _amp_grad(g, g_ptr, offs, mask, scale_ptr, coef_ptr, KIND: tl.constexpr,
                  OPMATH: tl.constexpr, AMP_SCALE: tl.constexpr, CLIP: tl.constexpr,
                  BLOCK: tl.constexpr):
        """GradScaler's unscale, then the clip (torch's order: scaler.unscale_(opt),
        clip_grad_norm_, scaler.step(opt)), as sgd_kernel.cuh's amp_grad, and the gradient
        written back where it changed. g: the loaded gradient in opmath. AMP_SCALE: inv =
        fp32(1 / fp64(scale)) (torch: scale.double().reciprocal().float()), g = r(g * inv) in
        opmath, skipped when inv == 1 (torch's unscale keeps the value then; like the CUDA
        kernel, the gradient is then not rewritten and keeps its bits, NaN payloads included);
        CLIP: g = r(g * coef), coef (of the gradients' dtype) widened exactly to opmath.
        Returns the gradient the update sees. (The scalars are broadcast to the block BEFORE
        any comparison: Triton 3.9's interpreter turns a broadcast scalar bool into fp32.)"""
        if AMP_SCALE:
            inv = tl.broadcast_to((1.0 / tl.load(scale_ptr).to(tl.float64)).to(tl.float32),
                                  [BLOCK])
            unscale = inv != 1.0
            # a select: where inv == 1, g keeps its bits (r() would make NaNs canonical)
            g = tl.where(unscale, _round_storage(g * inv.to(OPMATH), KIND), g)
            if not CLIP:
                tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask & unscale)
        if CLIP:
            g = _round_storage(g * tl.load(coef_ptr).to(OPMATH), KIND)
            tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
        return g

    @triton.jit
    def _sgd_block(p_ptr, g_ptr, b_ptr, offs, mask, lr_ptr, m_ptr, d_ptr, wd_ptr, scale_ptr,
                   inf_ptr, coef_ptr, first_ptr, neg_lr, wd, m_mul, m_add, one_minus_d,
                   MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, MOMENTUM: tl.constexpr,
                   NESTEROV: tl.constexpr, FIRST_STEP: tl.constexpr, KIND: tl.constexpr,
                   OPMATH: tl.constexpr, LR_TENSOR: tl.constexpr, M_TENSOR: tl.constexpr,
                   D_TENSOR: tl.constexpr, WD_TENSOR: tl.constexpr, AMP_SCALE: tl.constexpr,
                   AMP_SKIP: tl.constexpr, CLIP: tl.constexpr, FIRST_TENSOR: tl.constexpr,
                   BLOCK: tl.constexpr):
        """Load, update (_sgd_math) and store the elements offs[mask] of one span; shared by
        the flat and the list kernel. LR_TENSOR, M_TENSOR, D_TENSOR, WD_TENSOR: lr, momentum,
        dampening, weight_decay are read from lr_ptr, m_ptr, d_ptr, wd_ptr (1-element fp32 or
        fp64 tensors), as sgd_kernel.cuh's device_step reads them: each alpha a double
        rounded once to opmath, 1 - dampening computed in the tensor's dtype first, the
        factor of buf.mul_(momentum) rounded to the storage dtype first (torch's CUDA mul_
        loads a 0-dim CUDA tensor as the common dtype); a zero momentum leaves the buffer
        unwritten.
        AMP_SCALE / CLIP: the gradient is unscaled by scale_ptr's GradScaler scale and
        multiplied by coef_ptr's clip coefficient, and written back (_amp_grad); AMP_SKIP:
        found_inf (inf_ptr, fp32) != 0 skips the update (p and buf neither read nor written),
        after the gradient's write-back, as the CUDA kernel. FIRST_TENSOR (with FIRST_STEP):
        first_ptr (a 1-element uint8 view of a bool) decides on the device whether this is a
        first step (nonzero) or a momentum step, as device_flags in sgd_kernel.cuh: both
        updates are computed and one is selected, each with the bits of its own constexpr
        path. Flags off: nothing of this is compiled (the pointers are then never
        dereferenced)."""
        # The fp64 arguments hold values already rounded to opmath: this narrowing is exact.
        if LR_TENSOR:
            s_neg_lr = (-(tl.load(lr_ptr).to(tl.float64))).to(OPMATH)
        else:
            s_neg_lr = tl.full((), neg_lr, OPMATH)
        wd_on = mask  # a placeholder unless WD_TENSOR (then read by _sgd_math)
        if WD_TENSOR:
            wd64 = tl.load(wd_ptr).to(tl.float64)
            s_wd = wd64.to(OPMATH)
            wd_on = tl.broadcast_to(wd64, [BLOCK]) != 0.0
        else:
            s_wd = tl.full((), wd, OPMATH)
        m_on = mask
        if M_TENSOR:
            m64 = tl.load(m_ptr).to(tl.float64)
            s_m_add = m64.to(OPMATH)
            s_m_mul = _round_storage(m64.to(OPMATH), KIND)
            m_on = tl.broadcast_to(m64, [BLOCK]) != 0.0
        else:
            s_m_mul = tl.full((), m_mul, OPMATH)
            s_m_add = tl.full((), m_add, OPMATH)
        if D_TENSOR:
            s_omd = (1.0 - tl.load(d_ptr)).to(tl.float64).to(OPMATH)
        else:
            s_omd = tl.full((), one_minus_d, OPMATH)
        if AMP_SKIP:
            # found_inf != 0 (NaN included) skips the update: p and buf masked off entirely
            # (masked loads and stores touch no memory); the gradient is still written back
            upd = mask & (tl.broadcast_to(tl.load(inf_ptr), [BLOCK]) == 0.0)
        else:
            upd = mask
        p = tl.load(p_ptr + offs, mask=upd).to(OPMATH)
        g = tl.load(g_ptr + offs, mask=mask).to(OPMATH)
        if AMP_SCALE or CLIP:
            g = _amp_grad(g, g_ptr, offs, mask, scale_ptr, coef_ptr, KIND, OPMATH, AMP_SCALE,
                          CLIP, BLOCK)
        if MOMENTUM and (FIRST_TENSOR or not FIRST_STEP):
            buf = tl.load(b_ptr + offs, mask=upd).to(OPMATH)
        else:
            buf = tl.zeros([BLOCK], OPMATH)
        if FIRST_TENSOR:
            first = tl.broadcast_to(tl.load(first_ptr), [BLOCK]) != 0
            p1, buf1 = _sgd_math(p, buf, g, s_neg_lr, s_wd, s_m_mul, s_m_add, s_omd, wd_on,
                                 m_on, MAXIMIZE, WEIGHT_DECAY, MOMENTUM, NESTEROV, True, KIND,
                                 WD_TENSOR, M_TENSOR)
            p, buf = _sgd_math(p, buf, g, s_neg_lr, s_wd, s_m_mul, s_m_add, s_omd, wd_on,
                               m_on, MAXIMIZE, WEIGHT_DECAY, MOMENTUM, NESTEROV, False, KIND,
                               WD_TENSOR, M_TENSOR)
            p = tl.where(first, p1, p)
            buf = tl.where(first, buf1, buf)
        else:
            p, buf = _sgd_math(p, buf, g, s_neg_lr, s_wd, s_m_mul, s_m_add, s_omd, wd_on, m_on,
                               MAXIMIZE, WEIGHT_DECAY, MOMENTUM, NESTEROV, FIRST_STEP, KIND,
                               WD_TENSOR, M_TENSOR)
        # p and buf are exactly representable in storage: these casts do not round.
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=upd)
        if MOMENTUM:
            if M_TENSOR:
                tl.store(b_ptr + offs, buf.to(b_ptr.dtype.element_ty), mask=upd & m_on)
            else:
                tl.store(b_ptr + offs, buf.to(b_ptr.dtype.element_ty), mask=upd)

    @triton.jit
    def _sgd_flat_kernel(p_ptr, g_ptr, b_ptr, n, lr_ptr, m_ptr, d_ptr, wd_ptr, scale_ptr,
                         inf_ptr, coef_ptr, first_ptr,
                         neg_lr: "fp64", wd: "fp64", m_mul: "fp64", m_add: "fp64",
                         one_minus_d: "fp64",
                         MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                         MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                         FIRST_STEP: tl.constexpr, KIND: tl.constexpr, OPMATH: tl.constexpr,
                         LR_TENSOR: tl.constexpr, M_TENSOR: tl.constexpr,
                         D_TENSOR: tl.constexpr, WD_TENSOR: tl.constexpr,
                         AMP_SCALE: tl.constexpr, AMP_SKIP: tl.constexpr, CLIP: tl.constexpr,
                         FIRST_TENSOR: tl.constexpr, BLOCK: tl.constexpr):
        """One contiguous span of n elements; program k updates [k*BLOCK, (k+1)*BLOCK)."""
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        _sgd_block(p_ptr, g_ptr, b_ptr, offs, offs < n, lr_ptr, m_ptr, d_ptr, wd_ptr, scale_ptr,
                   inf_ptr, coef_ptr, first_ptr, neg_lr, wd, m_mul, m_add, one_minus_d,
                   MAXIMIZE, WEIGHT_DECAY, MOMENTUM, NESTEROV, FIRST_STEP, KIND, OPMATH,
                   LR_TENSOR, M_TENSOR, D_TENSOR, WD_TENSOR, AMP_SCALE, AMP_SKIP, CLIP,
                   FIRST_TENSOR, BLOCK)

    @triton.jit
    def _table_program(rows_ptr, blocks_ptr, WIDTH: tl.constexpr):
        """This program's entry of a pointer table (_list_table): its tensor's index, the
        address of that tensor's row (WIDTH int64: the tensor's addresses, then its numel), the
        first element of its block (int64) and the tensor's numel."""
        blk = blocks_ptr + 2 * tl.program_id(0).to(tl.int64)
        t = tl.load(blk)
        row = rows_ptr + WIDTH * t
        return t, row, tl.load(blk + 1), tl.load(row + WIDTH - 1)

    @triton.jit
    def _unless_skipped(n, inf_ptr, AMP_SKIP: tl.constexpr):
        """A mode kernel's numel n, or 0 where GradScaler's found_inf (inf_ptr, fp32) != 0, NaN
        included, skips the step: every lane is then masked off, nothing is read or written
        (the mode kernels write no gradient). AMP_SKIP off: n (inf_ptr never dereferenced)."""
        if AMP_SKIP:
            n = tl.where(tl.load(inf_ptr) == 0.0, n, 0)
        return n

    @triton.jit
    def _sgd_list_kernel(rows_ptr, blocks_ptr, lr_ptr, m_ptr, d_ptr, wd_ptr, scale_ptr,
                         inf_ptr, coef_ptr, first_ptr,
                         neg_lr: "fp64", wd: "fp64", m_mul: "fp64", m_add: "fp64",
                         one_minus_d: "fp64",
                         MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                         MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                         FIRST_STEP: tl.constexpr, KIND: tl.constexpr, OPMATH: tl.constexpr,
                         LR_TENSOR: tl.constexpr, M_TENSOR: tl.constexpr,
                         D_TENSOR: tl.constexpr, WD_TENSOR: tl.constexpr,
                         AMP_SCALE: tl.constexpr, AMP_SKIP: tl.constexpr, CLIP: tl.constexpr,
                         FIRST_TENSOR: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
        """Many tensors in one launch, through an int64 pointer table (built by _list_table):
            rows_ptr:   one row per tensor t: [address of p, address of g, address of buf
                        (0 when MOMENTUM is off: never dereferenced), numel]
            blocks_ptr: one row per program k: [tensor index t, first element of its block]
        Program k updates elements [start, start + BLOCK) of tensor t, masked by its numel.
        The addresses are cast to typed pointers (DTYPE) here: int64 -> pointer, which the
        interpreter and compiled code both accept. Nothing tells the compiler those pointers
        are 16-byte aligned, so the accesses are scalar (not 128-bit) in compiled code."""
        _, row, start, n = _table_program(rows_ptr, blocks_ptr, 4)
        p_ptr = tl.load(row).to(tl.pointer_type(DTYPE))
        g_ptr = tl.load(row + 1).to(tl.pointer_type(DTYPE))
        b_ptr = tl.load(row + 2).to(tl.pointer_type(DTYPE))
        offs = start + tl.arange(0, BLOCK)  # int64 (start is loaded as int64)
        _sgd_block(p_ptr, g_ptr, b_ptr, offs, offs < n, lr_ptr, m_ptr, d_ptr, wd_ptr, scale_ptr,
                   inf_ptr, coef_ptr, first_ptr, neg_lr, wd, m_mul, m_add, one_minus_d,
                   MAXIMIZE, WEIGHT_DECAY, MOMENTUM, NESTEROV, FIRST_STEP, KIND, OPMATH,
                   LR_TENSOR, M_TENSOR, D_TENSOR, WD_TENSOR, AMP_SCALE, AMP_SKIP, CLIP,
                   FIRST_TENSOR, BLOCK)

    @triton.jit
    def _bf16_widen(bits):
        """bf16 bits (uint16 or uint32) as fp32: exact, the bits move up by 16."""
        return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)

    @triton.jit
    def _bf16_rne(x):
        """fp32 x rounded to nearest even as bf16 bits (uint32): r() (NaN -> 0x7FC0, c10)."""
        return _round_storage(x, 1).to(tl.uint32, bitcast=True) >> 16

    @triton.jit
    def _mode_scalars(lr_ptr, mom_ptr, d_ptr, wd_ptr, neg_lr, wd, m_mul, m_add, one_minus_d,
                      LR_TENSOR: tl.constexpr, M_TENSOR: tl.constexpr, D_TENSOR: tl.constexpr,
                      WD_TENSOR: tl.constexpr):
        """The fp32 scalars of a mode kernel's step (the modes' math is fp32), as _sgd_block
        makes them for fp32: the fp64 arguments (fp32 values: this narrowing is exact), or
        with LR_TENSOR, M_TENSOR, D_TENSOR, WD_TENSOR read from lr_ptr, mom_ptr, d_ptr, wd_ptr
        (1-element fp32 or fp64 tensors) as sgd_kernel.cuh's device_step reads them: each a
        double rounded once to fp32, 1 - dampening computed in the tensor's dtype first.
        Returns (neg_lr, wd, m_mul, m_add, one_minus_d, weight_decay, momentum), the last two
        as read (fp64), for _on's zero tests."""
        if LR_TENSOR:
            s_neg_lr = (-(tl.load(lr_ptr).to(tl.float64))).to(tl.float32)
        else:
            s_neg_lr = tl.full((), neg_lr, tl.float32)
        if WD_TENSOR:
            wd64 = tl.load(wd_ptr).to(tl.float64)
        else:
            wd64 = tl.full((), wd, tl.float64)
        if M_TENSOR:
            m64 = tl.load(mom_ptr).to(tl.float64)
            s_m_mul = m64.to(tl.float32)
            s_m_add = s_m_mul
        else:
            m64 = tl.full((), m_add, tl.float64)
            s_m_mul = tl.full((), m_mul, tl.float32)
            s_m_add = tl.full((), m_add, tl.float32)
        if D_TENSOR:
            s_omd = (1.0 - tl.load(d_ptr)).to(tl.float64).to(tl.float32)
        else:
            s_omd = tl.full((), one_minus_d, tl.float32)
        return s_neg_lr, wd64.to(tl.float32), s_m_mul, s_m_add, s_omd, wd64, m64

    @triton.jit
    def _on(mask, v, TENSOR: tl.constexpr):
        """The lanes of mask where the op of a hyper-parameter v read from device memory
        (TENSOR) runs: v != 0, as torch's `!= 0` tests (mask itself otherwise: the flags
        alone decide). v is broadcast to the block before the comparison (_amp_grad says
        why)."""
        if TENSOR:
            return mask & (tl.where(mask, v, 0.0) != 0.0)
        else:
            return mask

    @triton.jit
    def _mode_step(m, buf, g, mask, lr_ptr, mom_ptr, d_ptr, wd_ptr, neg_lr, wd, m_mul, m_add,
                   one_minus_d, MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                   MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, FIRST_STEP: tl.constexpr,
                   LR_TENSOR: tl.constexpr, M_TENSOR: tl.constexpr, D_TENSOR: tl.constexpr,
                   WD_TENSOR: tl.constexpr):
        """torch's fp32 step of the mode kernels on the lanes of mask: _sgd_math with KIND 0
        (nothing rounds to storage in between) and _mode_scalars' fp32 alphas; the ops of a
        weight_decay or momentum read from device memory run where it is nonzero (_on).
        Returns (m, buf, the momentum as read: a zero one leaves the buffer unwritten)."""
        s_lr, s_wd, s_mm, s_ma, s_omd, wd64, m64 = _mode_scalars(
            lr_ptr, mom_ptr, d_ptr, wd_ptr, neg_lr, wd, m_mul, m_add, one_minus_d, LR_TENSOR,
            M_TENSOR, D_TENSOR, WD_TENSOR)
        m, buf = _sgd_math(m, buf, g, s_lr, s_wd, s_mm, s_ma, s_omd, _on(mask, wd64, WD_TENSOR),
                           _on(mask, m64, M_TENSOR), MAXIMIZE, WEIGHT_DECAY, MOMENTUM, NESTEROV,
                           FIRST_STEP, 0, WD_TENSOR, M_TENSOR)
        return m, buf, m64

    @triton.jit
    def _bf16_join(param, rem, tie):
        """bf16_split.h's join on bits (uint32 each; tie 0 or 1): the fp32 master. The high
        half is the parameter less one where the master rounded up to it."""
        up = ((rem > 0x8000) | ((rem == 0x8000) & (tie != 0))).to(tl.uint32)
        return (((param - up) << 16) | rem).to(tl.float32, bitcast=True)

    @triton.jit
    def _bf16_split(m):
        """bf16_split.h's split of the fp32 master m: (parameter, remainder, tie) bits as
        uint32. The parameter is r() of m (nearest even, NaN -> 0x7FC0, as c10); the tie is
        set where m sits halfway and rounded up (its high half is not the parameter)."""
        u = m.to(tl.uint32, bitcast=True)
        param = _bf16_rne(m)
        rem = u & 0xFFFF
        tie = ((rem == 0x8000) & ((u >> 16) != param)).to(tl.uint32)
        return param, rem, tie

    @triton.jit
    def _load_tie_bits(ties_ptr, offs, mask):
        """The tie bit of each element offs (memory order): bit offs % 8 of byte offs // 8."""
        byte = tl.load(ties_ptr + offs // 8, mask=mask, other=0).to(tl.uint32)
        return (byte >> (offs % 8).to(tl.uint32)) & 1

    @triton.jit
    def _pack_tie_bits(tie, BLOCK: tl.constexpr):
        """BLOCK tie bits (uint32, 0 or 1) as BLOCK // 8 bytes: bit j of byte k is element
        8k + j. The bits are distinct powers of two, so their sum is their OR."""
        rows = tl.reshape(tie, (BLOCK // 8, 8)) << tl.arange(0, 8).to(tl.uint32)[None, :]
        return tl.sum(rows, axis=1).to(tl.uint8)

    @triton.jit
    def _sgd_master_kernel(rows_ptr, blocks_ptr, inf_ptr, lr_ptr, mom_ptr, d_ptr, wd_ptr,
                           neg_lr: "fp64", wd: "fp64", m_mul: "fp64", m_add: "fp64",
                           one_minus_d: "fp64",
                           MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                           MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                           FIRST_STEP: tl.constexpr, AMP_SKIP: tl.constexpr,
                           LR_TENSOR: tl.constexpr, M_TENSOR: tl.constexpr,
                           D_TENSOR: tl.constexpr, WD_TENSOR: tl.constexpr,
                           BLOCK: tl.constexpr):
        """Master weights (bf16_split.h), many tensors in one launch through a pointer table
        of rows [address of the bf16 parameter, of the bf16 gradient, of the fp32 buffer (0
        when MOMENTUM is off), of the int16 remainder, of the uint8 tie bytes, numel]. Each
        element's master is joined from its three parts, takes _sgd_math's step in fp32
        (KIND 0: the master is fp32, nothing rounds to storage in between) and is split
        again. Bits throughout (uint16 pointers for bf16 and int16): no float cast can round
        differently in the interpreter. A block starts at a multiple of BLOCK, a multiple of
        8, so each program writes whole tie bytes, and no two programs the same one. The
        hyper-parameters: _mode_scalars; a zero momentum read there leaves the buffer
        unwritten."""
        tl.static_assert(BLOCK % 8 == 0)
        _, row, start, n = _table_program(rows_ptr, blocks_ptr, 6)
        n = _unless_skipped(n, inf_ptr, AMP_SKIP)
        p_ptr = tl.load(row).to(tl.pointer_type(tl.uint16))
        g_ptr = tl.load(row + 1).to(tl.pointer_type(tl.uint16))
        b_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        r_ptr = tl.load(row + 3).to(tl.pointer_type(tl.uint16))
        t_ptr = tl.load(row + 4).to(tl.pointer_type(tl.uint8))
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        m = _bf16_join(tl.load(p_ptr + offs, mask=mask).to(tl.uint32),
                       tl.load(r_ptr + offs, mask=mask).to(tl.uint32),
                       _load_tie_bits(t_ptr, offs, mask))
        g = _bf16_widen(tl.load(g_ptr + offs, mask=mask))
        if MOMENTUM and not FIRST_STEP:
            buf = tl.load(b_ptr + offs, mask=mask)
        else:
            buf = tl.zeros([BLOCK], tl.float32)
        m, buf, m64 = _mode_step(m, buf, g, mask, lr_ptr, mom_ptr, d_ptr, wd_ptr, neg_lr, wd,
                                 m_mul, m_add, one_minus_d, MAXIMIZE, WEIGHT_DECAY, MOMENTUM,
                                 NESTEROV, FIRST_STEP, LR_TENSOR, M_TENSOR, D_TENSOR, WD_TENSOR)
        param, rem, tie = _bf16_split(m)
        tl.store(p_ptr + offs, param.to(tl.uint16), mask=mask)
        tl.store(r_ptr + offs, rem.to(tl.uint16), mask=mask)
        if MOMENTUM:
            if m64 != 0.0:  # (a zero momentum read from mom_ptr leaves the buffer as it is)
                tl.store(b_ptr + offs, buf, mask=mask)
        # the bits past numel are 0 in the last byte
        kb = start // 8 + tl.arange(0, BLOCK // 8)
        tl.store(t_ptr + kb, _pack_tie_bits(tl.where(mask, tie, 0), BLOCK),
                 mask=kb < (n + 7) // 8)

    @triton.jit
    def _lowbias32(x):
        """C. Wellons' lowbias32 on uint32 x (reference.lowbias32, stochastic.h's
        mc_lowbias32): the multiplies wrap around mod 2^32."""
        x = x ^ (x >> 16)
        x = x * tl.full((), 0x7FEB352D, tl.uint32)
        x = x ^ (x >> 15)
        x = x * tl.full((), 0x846CA68B, tl.uint32)
        return x ^ (x >> 16)

    @triton.jit
    def _sr_random(key, first, BLOCK: tl.constexpr):
        """The random bits (uint32) of indices i = first + arange(BLOCK) (int64, memory order
        in the whole tensor) of a tensor keyed `key` (uint32): lowbias32(lowbias32(key ^
        (i >> 32)) ^ (i mod 2^32)). A block (shorter than 2^32) meets at most two values of
        i >> 32, so the inner hash is computed twice per block, not per element (a shard's
        offset may put the crossing anywhere)."""
        idx = first + tl.arange(0, BLOCK)
        hi0 = first >> 32
        inner0 = _lowbias32(key ^ hi0.to(tl.uint32))
        inner1 = _lowbias32(key ^ ((first + (BLOCK - 1)) >> 32).to(tl.uint32))
        inner = tl.where((idx >> 32) == hi0, inner0, inner1)
        return _lowbias32(inner ^ idx.to(tl.uint32))  # int64 -> uint32 keeps the low half

    @triton.jit
    def _bf16_round_stochastic(m, r):
        """fp32 m rounded stochastically to bf16 bits (uint32) with the low 16 bits of r:
        (bits(m) + r mod 2^16) >> 16 (up in magnitude with probability low16(m) / 2^16);
        NaN -> 0x7FC0 (reference.bf16_round_stochastic, stochastic.h)."""
        u = m.to(tl.uint32, bitcast=True)
        up = (u + (r & 0xFFFF)) >> 16
        return tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, up)

    @triton.jit
    def _sgd_sr_kernel(rows_ptr, blocks_ptr, keys_ptr, lr_ptr, mom_ptr, d_ptr, wd_ptr,
                       neg_lr: "fp64", wd: "fp64", m_mul: "fp64", m_add: "fp64",
                       one_minus_d: "fp64",
                       MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                       MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                       FIRST_STEP: tl.constexpr, LR_TENSOR: tl.constexpr,
                       M_TENSOR: tl.constexpr, D_TENSOR: tl.constexpr,
                       WD_TENSOR: tl.constexpr, BLOCK: tl.constexpr):
        """Stochastic rounding (stochastic.h), many tensors in one launch through the list
        kernel's pointer table (rows [address of the bf16 parameter, of the bf16 gradient, of
        the bf16 buffer (0 when MOMENTUM is off), numel]) and keys_ptr: int64, the uint32 key
        of tensor t at keys_ptr[t]. Each element is widened to fp32, takes _mode_step and is
        rounded stochastically with the random bits of its index in the walk (memory order);
        the buffer is rounded to nearest even. Bits throughout (uint16 pointers): no float
        cast can round differently in the interpreter. The hyper-parameters: _mode_scalars."""
        t, row, start, n = _table_program(rows_ptr, blocks_ptr, 4)
        p_ptr = tl.load(row).to(tl.pointer_type(tl.uint16))
        g_ptr = tl.load(row + 1).to(tl.pointer_type(tl.uint16))
        b_ptr = tl.load(row + 2).to(tl.pointer_type(tl.uint16))
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        m = _bf16_widen(tl.load(p_ptr + offs, mask=mask))
        g = _bf16_widen(tl.load(g_ptr + offs, mask=mask))
        if MOMENTUM and not FIRST_STEP:
            buf = _bf16_widen(tl.load(b_ptr + offs, mask=mask))
        else:
            buf = tl.zeros([BLOCK], tl.float32)
        m, buf, m64 = _mode_step(m, buf, g, mask, lr_ptr, mom_ptr, d_ptr, wd_ptr, neg_lr, wd,
                                 m_mul, m_add, one_minus_d, MAXIMIZE, WEIGHT_DECAY, MOMENTUM,
                                 NESTEROV, FIRST_STEP, LR_TENSOR, M_TENSOR, D_TENSOR, WD_TENSOR)
        # keys_ptr[2t], keys_ptr[2t + 1]: the key and the tensor's offset in its whole tensor
        first = tl.load(keys_ptr + 2 * t + 1) + start
        r = _sr_random(tl.load(keys_ptr + 2 * t).to(tl.uint32), first, BLOCK)
        tl.store(p_ptr + offs, _bf16_round_stochastic(m, r).to(tl.uint16), mask=mask)
        if MOMENTUM:
            if m64 != 0.0:  # (a zero momentum read from mom_ptr leaves the buffer as it is)
                tl.store(b_ptr + offs, _bf16_rne(buf).to(tl.uint16), mask=mask)

    @triton.jit
    def _q8_abs_bits(v):
        """momentum_dtype.h's q8_abs_bits: the bits of |v| (uint32), a NaN as inf's. Bit
        patterns of non-negative floats order as their values, so a block's absmax is an exact,
        order-free integer max, and a NaN makes the block non-finite."""
        u = v.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
        return tl.where(u > 0x7F800000, 0x7F800000, u)

    @triton.jit
    def _q8_scale(absmax_bits):
        """q8_scale: absmax / 127, NaN (0x7FC00000) where absmax is inf. div_rn is the correctly
        rounded division (div.rn.f32); Triton's `/` on fp32 compiles to an approximate one."""
        a = absmax_bits.to(tl.float32, bitcast=True)
        nan = tl.full(absmax_bits.shape, 0x7FC00000, tl.uint32).to(tl.float32, bitcast=True)
        return tl.where(absmax_bits < 0x7F800000, tl.math.div_rn(a, 127.0), nan)

    @triton.jit
    def _q8_code(v, scale):
        """q8_code: round(clamp(v / scale, -127, 127)), ties to even, 0 where scale is 0 or NaN;
        an int32 in [-127, 127]."""
        ok = scale > 0.0  # false for NaN
        x = tl.math.div_rn(v, tl.where(ok, scale, 1.0))
        x = tl.where(ok, x, 0.0)  # before the clamp: a non-finite block's v must not reach it
        x = tl.where(x < -127.0, -127.0, tl.where(x > 127.0, 127.0, x))
        # x + 1.5 * 2^23 has no fraction bits left (|x| <= 2^22): it rounds x to an integer,
        # ties to even; subtracting 1.5 * 2^23 again is exact
        x = (x + 12582912.0) - 12582912.0
        return x.to(tl.int32)

    @triton.jit
    def _ld(ptr, mask, MASKED: tl.constexpr):
        """A load, masked unless the whole span is known in bounds (no mask: 128-bit accesses
        on aligned pointers)."""
        if MASKED:
            return tl.load(ptr, mask=mask)
        else:
            return tl.load(ptr)

    @triton.jit
    def _st(ptr, value, mask, MASKED: tl.constexpr):
        """A store, masked unless the whole span is known in bounds (as _ld)."""
        if MASKED:
            tl.store(ptr, value, mask=mask)
        else:
            tl.store(ptr, value)

    @triton.jit
    def _qmom_block(p_ptr, g_ptr, b_ptr, s_ptr, start, n, lr_ptr, mom_ptr, d_ptr, wd_ptr,
                    neg_lr, wd, m_mul, m_add, one_minus_d, MAXIMIZE: tl.constexpr,
                    WEIGHT_DECAY: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                    FIRST_STEP: tl.constexpr, LR_TENSOR: tl.constexpr, M_TENSOR: tl.constexpr,
                    D_TENSOR: tl.constexpr, WD_TENSOR: tl.constexpr, QUANT: tl.constexpr,
                    MASKED: tl.constexpr, BLOCK: tl.constexpr, QBLOCK: tl.constexpr):
        """Elements [start, start + BLOCK) of one tensor (start a multiple of BLOCK, itself a
        multiple of QBLOCK: the program owns whole int8 blocks), as BLOCK // QBLOCK rows of
        QBLOCK: row r is int8 block start // QBLOCK + r. MASKED: bounded by n (else all in).
        The step: _mode_step."""
        rows = tl.arange(0, BLOCK // QBLOCK)
        offs = start + (rows * QBLOCK)[:, None] + tl.arange(0, QBLOCK)[None, :]
        mask = offs < n
        row_ok = start + rows * QBLOCK < n
        p = _ld(p_ptr + offs, mask, MASKED)
        g = _ld(g_ptr + offs, mask, MASKED)
        if MOMENTUM and not FIRST_STEP:
            if QUANT == 1:  # code * scale, one fp32 multiply (q8_load)
                scale = _ld(s_ptr + start // QBLOCK + rows, row_ok, MASKED)
                buf = _ld(b_ptr + offs, mask, MASKED).to(tl.float32) * scale[:, None]
            else:
                buf = _bf16_widen(_ld(b_ptr + offs, mask, MASKED))
        else:
            buf = tl.zeros([BLOCK // QBLOCK, QBLOCK], tl.float32)
        p, buf, m64 = _mode_step(p, buf, g, mask, lr_ptr, mom_ptr, d_ptr, wd_ptr, neg_lr, wd,
                                 m_mul, m_add, one_minus_d, MAXIMIZE, WEIGHT_DECAY, MOMENTUM,
                                 NESTEROV, FIRST_STEP, LR_TENSOR, M_TENSOR, D_TENSOR, WD_TENSOR)
        _st(p_ptr + offs, p, mask, MASKED)  # the parameter takes the unquantized buffer
        if MOMENTUM:
            if m64 != 0.0:  # (a zero momentum read from mom_ptr leaves codes and scales)
                if QUANT == 1:
                    bits = _q8_abs_bits(buf)
                    if MASKED:  # lanes past n hold no element (their loads are undefined)
                        bits = tl.where(mask, bits, 0)
                    scale = _q8_scale(tl.max(bits, axis=1))
                    _st(b_ptr + offs, _q8_code(buf, scale[:, None]).to(tl.int8), mask, MASKED)
                    _st(s_ptr + start // QBLOCK + rows, scale, row_ok, MASKED)
                else:
                    _st(b_ptr + offs, _bf16_rne(buf).to(tl.uint16), mask, MASKED)

    @triton.jit
    def _sgd_qmom_kernel(rows_ptr, blocks_ptr, inf_ptr, lr_ptr, mom_ptr, d_ptr, wd_ptr,
                         neg_lr: "fp64", wd: "fp64", m_mul: "fp64", m_add: "fp64",
                         one_minus_d: "fp64",
                         MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                         MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                         FIRST_STEP: tl.constexpr, QUANT: tl.constexpr, ALIGNED: tl.constexpr,
                         AMP_SKIP: tl.constexpr, LR_TENSOR: tl.constexpr,
                         M_TENSOR: tl.constexpr, D_TENSOR: tl.constexpr,
                         WD_TENSOR: tl.constexpr, BLOCK: tl.constexpr, QBLOCK: tl.constexpr):
        """momentum_dtype (momentum_dtype.h): fp32 parameters and gradients, buffers stored
        narrow; many tensors in one launch through a pointer table of rows [address of p, of g,
        of the buffer (0 when MOMENTUM is off), then with QUANT 1 of the scales, numel].
        QUANT 0: bf16 buffers (uint16 bits, rounded to nearest even by _bf16_rne); QUANT 1:
        int8 codes and one fp32 scale per QBLOCK elements. Each element takes _mode_step with
        its widened buffer. ALIGNED: every address in the table is a multiple of 16 bytes
        (the host checked), so a program whose block lies inside its tensor runs unmasked
        with 16-byte-aligned pointers: 128-bit accesses; the last block of a tensor stays
        masked."""
        tl.static_assert(BLOCK % QBLOCK == 0)
        _, row, start, n = _table_program(rows_ptr, blocks_ptr, 4 + QUANT)
        n = _unless_skipped(n, inf_ptr, AMP_SKIP)  # (a skipped block takes the masked path)
        # The block map's starts are multiples of BLOCK; the multiply says so to the compiler's
        # alignment analysis, which drops hints (tl.multiple_of) placed on loaded values.
        start = start // BLOCK * BLOCK
        p_ptr = tl.load(row).to(tl.pointer_type(tl.float32))
        g_ptr = tl.load(row + 1).to(tl.pointer_type(tl.float32))
        if QUANT == 1:
            b_ptr = tl.load(row + 2).to(tl.pointer_type(tl.int8))
            s_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
        else:
            b_ptr = tl.load(row + 2).to(tl.pointer_type(tl.uint16))
            s_ptr = p_ptr  # never dereferenced
        if ALIGNED:  # on the casts' results (int_to_ptr), where the analysis keeps them
            p_ptr = tl.multiple_of(p_ptr, 16)
            g_ptr = tl.multiple_of(g_ptr, 16)
            b_ptr = tl.multiple_of(b_ptr, 16)
        if ALIGNED:
            if start + BLOCK <= n:
                _qmom_block(p_ptr, g_ptr, b_ptr, s_ptr, start, n, lr_ptr, mom_ptr, d_ptr, wd_ptr,
                            neg_lr, wd, m_mul, m_add, one_minus_d, MAXIMIZE, WEIGHT_DECAY,
                            MOMENTUM, NESTEROV, FIRST_STEP, LR_TENSOR, M_TENSOR, D_TENSOR,
                            WD_TENSOR, QUANT, False, BLOCK, QBLOCK)
            else:
                _qmom_block(p_ptr, g_ptr, b_ptr, s_ptr, start, n, lr_ptr, mom_ptr, d_ptr, wd_ptr,
                            neg_lr, wd, m_mul, m_add, one_minus_d, MAXIMIZE, WEIGHT_DECAY,
                            MOMENTUM, NESTEROV, FIRST_STEP, LR_TENSOR, M_TENSOR, D_TENSOR,
                            WD_TENSOR, QUANT, True, BLOCK, QBLOCK)
        else:
            _qmom_block(p_ptr, g_ptr, b_ptr, s_ptr, start, n, lr_ptr, mom_ptr, d_ptr, wd_ptr,
                        neg_lr, wd, m_mul, m_add, one_minus_d, MAXIMIZE, WEIGHT_DECAY, MOMENTUM,
                        NESTEROV, FIRST_STEP, LR_TENSOR, M_TENSOR, D_TENSOR, WD_TENSOR, QUANT,
                        True, BLOCK, QBLOCK)

    @triton.jit
    def _fp16_bits(x):
        """fp32 x rounded to nearest even as fp16 bits (uint32 below 2^16): c10's conversion
        (sgd_math.h's mc_float_to_fp16_bits): fp16 subnormals, inf from 65520 on, NaN as
        0x7E00 with x's sign. r() (_round_storage, KIND 2) does the rounding in integer bit
        arithmetic; its result is an fp16 value, so moving its exponent and mantissa is exact."""
        r = _round_storage(x, 2).to(tl.uint32, bitcast=True)
        sign = (r >> 16) & 0x8000
        a = r & 0x7FFFFFFF
        # normal: the exponent rebiased from 127 to 15, the 13 dropped mantissa bits are zero
        normal = (a - 0x38000000) >> 13
        # subnormal: a multiple k of 2^-24 below 2^-14; |r| + 0.5 is exact (2^-24 is the ulp
        # of [0.5, 1)) and holds k in its low mantissa bits
        sub = (a.to(tl.float32, bitcast=True) + 0.5).to(tl.uint32, bitcast=True) - 0x3F000000
        h = tl.where(a < 0x38800000, sub, normal)
        h = tl.where(a == 0x7F800000, 0x7C00, h)
        h = tl.where(a > 0x7F800000, 0x7E00, h)
        return h | sign

    @triton.jit
    def _fp16_master_block(p_ptr, g_ptr, b_ptr, m_ptr, start, n, lr_ptr, mom_ptr, d_ptr, wd_ptr,
                           neg_lr, wd, m_mul, m_add, one_minus_d, MAXIMIZE: tl.constexpr,
                           WEIGHT_DECAY: tl.constexpr, MOMENTUM: tl.constexpr,
                           NESTEROV: tl.constexpr, FIRST_STEP: tl.constexpr,
                           LR_TENSOR: tl.constexpr, M_TENSOR: tl.constexpr,
                           D_TENSOR: tl.constexpr, WD_TENSOR: tl.constexpr,
                           MASKED: tl.constexpr, BLOCK: tl.constexpr):
        """Elements [start, start + BLOCK) of one tensor (fp16_master.h's fp16_master_elem):
        the master steps, the parameter is written as the new master's rounding (never read),
        the buffer read unless first step. MASKED: bounded by n (else all in). The step:
        _mode_step."""
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        m = _ld(m_ptr + offs, mask, MASKED)
        g = _ld(g_ptr + offs, mask, MASKED).to(tl.float32)  # fp16 -> fp32 is exact
        if MOMENTUM and not FIRST_STEP:
            buf = _ld(b_ptr + offs, mask, MASKED)
        else:
            buf = tl.zeros([BLOCK], tl.float32)
        new, buf, m64 = _mode_step(m, buf, g, mask, lr_ptr, mom_ptr, d_ptr, wd_ptr, neg_lr, wd,
                                   m_mul, m_add, one_minus_d, MAXIMIZE, WEIGHT_DECAY, MOMENTUM,
                                   NESTEROV, FIRST_STEP, LR_TENSOR, M_TENSOR, D_TENSOR,
                                   WD_TENSOR)
        _st(m_ptr + offs, new, mask, MASKED)
        _st(p_ptr + offs, _fp16_bits(new).to(tl.uint16), mask, MASKED)
        if MOMENTUM:
            if m64 != 0.0:  # (a zero momentum read from mom_ptr leaves the buffer as it is)
                _st(b_ptr + offs, buf, mask, MASKED)

    @triton.jit
    def _sgd_fp16_master_kernel(rows_ptr, blocks_ptr, inf_ptr, lr_ptr, mom_ptr, d_ptr, wd_ptr,
                                neg_lr: "fp64", wd: "fp64", m_mul: "fp64", m_add: "fp64",
                                one_minus_d: "fp64",
                                MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                                MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                                FIRST_STEP: tl.constexpr, ALIGNED: tl.constexpr,
                                AMP_SKIP: tl.constexpr, LR_TENSOR: tl.constexpr,
                                M_TENSOR: tl.constexpr, D_TENSOR: tl.constexpr,
                                WD_TENSOR: tl.constexpr, BLOCK: tl.constexpr):
        """fp16 master weights (fp16_master.h): fp16 parameters and gradients, fp32 masters and
        buffers; many tensors in one launch through a pointer table of rows [address of p, of
        g, of the buffer (0 when MOMENTUM is off), of the master, numel]. The parameter is
        stored as bits (uint16, _fp16_bits): no float cast rounds. ALIGNED: every address in
        the table is a multiple of 16 bytes (the host checked), so a block inside its tensor
        runs unmasked: 128-bit accesses; the tensor's last block stays masked."""
        _, row, start, n = _table_program(rows_ptr, blocks_ptr, 5)
        n = _unless_skipped(n, inf_ptr, AMP_SKIP)  # (a skipped block takes the masked path)
        # multiples of BLOCK, said so for the alignment analysis (as in _sgd_qmom_kernel)
        start = start // BLOCK * BLOCK
        p_ptr = tl.load(row).to(tl.pointer_type(tl.uint16))
        g_ptr = tl.load(row + 1).to(tl.pointer_type(tl.float16))
        b_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        m_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
        if ALIGNED:
            p_ptr = tl.multiple_of(p_ptr, 16)
            g_ptr = tl.multiple_of(g_ptr, 16)
            b_ptr = tl.multiple_of(b_ptr, 16)
            m_ptr = tl.multiple_of(m_ptr, 16)
        if ALIGNED:
            if start + BLOCK <= n:
                _fp16_master_block(p_ptr, g_ptr, b_ptr, m_ptr, start, n, lr_ptr, mom_ptr, d_ptr,
                                   wd_ptr, neg_lr, wd, m_mul, m_add, one_minus_d, MAXIMIZE,
                                   WEIGHT_DECAY, MOMENTUM, NESTEROV, FIRST_STEP, LR_TENSOR,
                                   M_TENSOR, D_TENSOR, WD_TENSOR, False, BLOCK)
            else:
                _fp16_master_block(p_ptr, g_ptr, b_ptr, m_ptr, start, n, lr_ptr, mom_ptr, d_ptr,
                                   wd_ptr, neg_lr, wd, m_mul, m_add, one_minus_d, MAXIMIZE,
                                   WEIGHT_DECAY, MOMENTUM, NESTEROV, FIRST_STEP, LR_TENSOR,
                                   M_TENSOR, D_TENSOR, WD_TENSOR, True, BLOCK)
        else:
            _fp16_master_block(p_ptr, g_ptr, b_ptr, m_ptr, start, n, lr_ptr, mom_ptr, d_ptr,
                               wd_ptr, neg_lr, wd, m_mul, m_add, one_minus_d, MAXIMIZE,
                               WEIGHT_DECAY, MOMENTUM, NESTEROV, FIRST_STEP, LR_TENSOR, M_TENSOR,
                               D_TENSOR, WD_TENSOR, True, BLOCK)

    @triton.jit
    def _sr_random_kernel(key, base, out_ptr, n, BLOCK: tl.constexpr):
        """out[j] = the random bits (as int64) of element base + j of a tensor keyed `key`
        (_sr_random, blocks of BLOCK from base, any int64): lets tests reach indices past 2^32
        and blocks that cross it."""
        j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        r = _sr_random(key.to(tl.uint32), base + tl.program_id(0).to(tl.int64) * BLOCK, BLOCK)
        tl.store(out_ptr + j, r.to(tl.int64), mask=j < n)

    @triton.jit
    def _round_storage_kernel(x_ptr, y_ptr, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
        """y = r(x) for fp32 x: lets tests compare r() with torch's RNE casts."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(y_ptr + offs, _round_storage(tl.load(x_ptr + offs, mask=m), KIND), mask=m)

    @triton.jit
    def _cast_fp16_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        """y = fp32(fp16(x)) by plain casts: lets tests see whether a backend's cast is RNE."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=m).to(tl.float16).to(tl.float32),
                 mask=m)

    _INTERPRETED = type(_sgd_flat_kernel).__name__ == "InterpretedFunction"
else:
    _INTERPRETED = False


# ---- validation ------------------------------------------------------------------------------
def _describe(t: torch.Tensor) -> str:
    return f"{t.dtype} {t.device} tensor of shape {tuple(t.shape)}"


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    lo = t.data_ptr()
    return lo, lo + t.numel() * t.element_size()


def _check_scalars(lr, momentum, dampening, weight_decay, nesterov, maximize, first_step,
                   momentum_tensor=None):
    vals = {}
    for name, v in (("lr", lr), ("momentum", momentum), ("dampening", dampening),
                    ("weight_decay", weight_decay)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a Python float, got {type(v).__name__}")
        v = float(v)
        if not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v}")
        vals[name] = v
    for name, v in (("nesterov", nesterov), ("maximize", maximize), ("first_step", first_step)):
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    # a momentum tensor is read where it lives: the buffers are given, its value decides
    vals["use_buf"] = momentum_tensor is not None or vals["momentum"] != 0
    if nesterov and not vals["use_buf"]:
        raise ValueError(f"nesterov=True needs momentum != 0, got momentum={momentum}")
    if first_step and not vals["use_buf"]:
        raise ValueError("first_step=True (buffer = gradient) needs momentum != 0, got "
                         f"momentum={momentum}")
    return vals


def _check_device(t: torch.Tensor, name: str) -> None:
    if not TRITON_AVAILABLE:
        raise RuntimeError(TRITON_UNAVAILABLE_REASON)
    if t.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(f"{name} must be on a CUDA device for the Triton backend (or run with "
                         f"TRITON_INTERPRET=1), got {_describe(t)}")


def _check_tensor(t, n: str) -> None:
    """t is a dense (strided) tensor; n names it in the error."""
    if t is None:
        raise ValueError(f"{n} is undefined (None)")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{n} must be a tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"{n} must be a dense (strided) tensor, got layout {t.layout}")


def _check_triple(where: str, p, g, b, dev_dtype: list) -> None:
    single = where == ""
    pn = ("param" if single else "params") + where
    gn = ("grad" if single else "grads") + where
    bn = ("momentum_buffer" if single else "momentum_buffers") + where
    for t, n in ((p, pn), (g, gn)):
        _check_tensor(t, n)
    _check_device(p, pn)
    if p.dtype not in _DTYPES:
        raise ValueError(f"{pn} must be float32, float64, bfloat16 or float16, got {_describe(p)}")
    if not dev_dtype:
        dev_dtype.extend((p.device, p.dtype))
    if p.dtype != dev_dtype[1]:
        raise ValueError(f"{pn} has dtype {p.dtype} but params[0] has dtype {dev_dtype[1]}; "
                         "one call takes one dtype")
    if p.device != dev_dtype[0]:
        raise ValueError(f"{pn} is on {p.device} but params[0] is on {dev_dtype[0]}")
    if not _dense(p):
        raise ValueError(f"{pn} must be dense and non-overlapping, got strides {p.stride()} "
                         f"for shape {tuple(p.shape)}")
    _check_like(g, gn, p, pn)
    if b is not None:
        _check_like(b, bn, p, pn)


def _check_like(t, n, p, pn: str, dtype=None) -> None:
    """t (named n) is laid out like the dense tensor p (named pn): same device and shape, and
    the same strides on every dimension of size other than 1 (whose stride moves nothing), so
    that both hold their elements in the same memory order; its dtype is `dtype` (p's when
    None)."""
    _check_tensor(t, n)
    if t.device != p.device:
        raise ValueError(f"{n} is on {t.device} but {pn} is on {p.device}")
    if dtype is None and t.dtype != p.dtype:
        raise ValueError(f"{n} has dtype {t.dtype} but {pn} has dtype {p.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{n} must be {dtype} (with {p.dtype} {pn}), got {_describe(t)}")
    if t.shape != p.shape:
        raise ValueError(f"{n} has shape {tuple(t.shape)} but {pn} has shape {tuple(p.shape)}")
    if any(s != q for s, q, m in zip(t.stride(), p.stride(), p.shape) if m != 1):
        raise ValueError(f"{n} has strides {t.stride()} but {pn} has strides {p.stride()} "
                         "(the memory layouts must match: equal strides on every dimension "
                         "of size > 1)")


def _check_list_lengths(params, lists, bufs, need_buf: bool, momentum) -> None:
    """lists: (list, name) that take one tensor per parameter; bufs too when need_buf."""
    for lst, name in lists:
        if len(lst) != len(params):
            raise ValueError(f"{name} has {len(lst)} tensors but params has {len(params)}")
    if need_buf and len(bufs) != len(params):
        raise ValueError(f"momentum_buffers has {len(bufs)} tensors but params has "
                         f"{len(params)} (momentum={momentum} needs one each)")


def _check_ties(t, n: str, p, pn: str) -> None:
    """t (named n) holds p's tie bits: a contiguous 1-D uint8 tensor of ceil(numel / 8)
    bytes on p's device."""
    _check_tensor(t, n)
    nbytes = (p.numel() + 7) // 8
    if not (t.device == p.device and t.dtype == torch.uint8 and t.dim() == 1
            and t.numel() == nbytes and t.is_contiguous()):
        raise ValueError(f"{n} must be a contiguous 1-D uint8 tensor of {nbytes} bytes on "
                         f"{p.device} (a bit per element of {pn}), got {_describe(t)} with "
                         f"strides {t.stride()}")


def _check_list_triples(params, grads, bufs, need_buf: bool, why=None,
                        param_dtype=torch.bfloat16, buf_dtype=None) -> list:
    """Each (params[i], grads[i], momentum_buffers[i] when need_buf) checked by _check_triple
    (one device and one dtype for all; the lengths checked before); with `why` (the modes'
    ops: a reason) each parameter must be param_dtype, and given buf_dtype the buffers are of
    that dtype, laid out like their parameters (csrc/momentum_ops.cpp's check_mode_step).
    Returns the (tensor, name) pairs for _check_no_overlap."""
    dev_dtype: list = []
    named = []
    for i, (p, g) in enumerate(zip(params, grads)):
        b = bufs[i] if need_buf else None
        if need_buf and b is None:
            raise ValueError(f"momentum_buffers[{i}] is undefined (None) but momentum != 0")
        _check_triple(f"[{i}]", p, g, None if buf_dtype is not None else b, dev_dtype)
        if why is not None and p.dtype != param_dtype:
            raise ValueError(f"params[{i}] must be {str(param_dtype).removeprefix('torch.')} "
                             f"({why}), got {_describe(p)}")
        named += [(p, f"params[{i}]"), (g, f"grads[{i}]")]
        if need_buf:
            if buf_dtype is not None:
                _check_like(b, f"momentum_buffers[{i}]", p, f"params[{i}]", buf_dtype)
            named.append((b, f"momentum_buffers[{i}]"))
    return named


def _triple_addrs(params, grads, bufs, need_buf: bool):
    """The list kernel's table rows (address of p, of g, of buf or 0) and numels of the
    non-empty checked triples, and their indices in params. Dense with equal strides: p, g
    and buf hold their elements in the same memory order, from data_ptr() (the lowest address:
    strides are never negative) over numel elements, so element j of the walk is the same
    element of all three whatever the layout."""
    addrs, numels, kept = [], [], []
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.numel() == 0:
            continue
        addrs.append((p.data_ptr(), g.data_ptr(), bufs[i].data_ptr() if need_buf else 0))
        numels.append(p.numel())
        kept.append(i)
    return addrs, numels, kept


def _check_keys(keys, n_params: int) -> list:
    """The stochastic-rounding keys: one int in [0, 2^32) per parameter (csrc/momentum_ops.cpp's
    checks, its messages)."""
    if isinstance(keys, (str, bytes)) or not hasattr(keys, "__len__"):
        raise TypeError(f"keys must be a list of ints, got {type(keys).__name__}")
    keys = list(keys)
    if len(keys) != n_params:
        raise ValueError(f"keys has {len(keys)} entries but params has {n_params}")
    for i, k in enumerate(keys):
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"keys[{i}] must be an int, got {type(k).__name__} {k!r}")
        if not 0 <= k <= 0xFFFFFFFF:
            raise ValueError(f"keys[{i}] must be in [0, 2^32), got {k}")
    return keys


def _check_no_overlap(named) -> None:
    """named: (tensor, name) of dense tensors; no two may share a byte."""
    ranges = sorted((*_byte_range(t), n) for t, n in named if t.numel() > 0)
    for (lo0, hi0, n0), (lo1, hi1, n1) in zip(ranges, ranges[1:]):
        if lo1 < hi0:
            raise ValueError(f"{n1} overlaps {n0} in memory; every tensor of a step must be "
                             "distinct")


def _scalars(vals, dtype):
    """(neg_lr, wd, m_mul, m_add, one_minus_d) as Python floats holding opmath values: each
    user double rounded once (fp32 for fp32/bf16/fp16; alpha NOT narrowed to bf16/fp16)."""
    rnd = (lambda x: x) if dtype == torch.float64 else _to_f32
    lr, m, d, wd = vals["lr"], vals["momentum"], vals["dampening"], vals["weight_decay"]
    return rnd(-lr), rnd(wd), rnd(m), rnd(m), rnd(1.0 - d)


def _step_flags(vals, nesterov, maximize, first_step) -> dict:
    """The constexpr arguments of every step kernel: the update's flags, the block, the warps
    and no fp fusion."""
    return dict(MAXIMIZE=maximize, WEIGHT_DECAY=vals["weight_decay"] != 0,
                MOMENTUM=vals["use_buf"], NESTEROV=nesterov, FIRST_STEP=first_step,
                BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS, enable_fp_fusion=False)


def _hyper_flags(vals, nesterov, maximize, first_step, hyper) -> dict:
    """_step_flags with the hyper-parameters held in tensors (hyper: a _HyperTensors): each
    sets its *_TENSOR constexpr, and a weight_decay there its op's flag (the kernel then decides
    by its value)."""
    wd_tensor = hyper.weight_decay is not None
    flags = _step_flags(vals, nesterov, maximize, first_step)
    flags.update(WEIGHT_DECAY=wd_tensor or flags["WEIGHT_DECAY"],
                 LR_TENSOR=hyper.lr is not None, M_TENSOR=hyper.momentum is not None,
                 D_TENSOR=hyper.dampening is not None, WD_TENSOR=wd_tensor)
    return flags


def _flags(dtype, vals, nesterov, maximize, first_step, hyper=None, amp=None) -> dict:
    """The constexpr arguments shared by the flat and the list kernel (hyper: a _HyperTensors,
    amp: an _Amp, or None): _hyper_flags', the dtype's and GradScaler's."""
    amp = amp or _NO_AMP
    flags = _hyper_flags(vals, nesterov, maximize, first_step, hyper or _NO_HYPER)
    flags.update(KIND=_KIND[dtype], OPMATH=tl.float64 if dtype == torch.float64 else tl.float32,
                 AMP_SCALE=amp.grad_scale is not None,
                 AMP_SKIP=amp.found_inf is not None, CLIP=amp.clip_coef is not None,
                 FIRST_TENSOR=amp.first is not None)
    return flags


class _Amp:
    """GradScaler's grad_scale and found_inf, a clip coefficient and the first-step flag
    (first_step_tensor as uint8) of one step, checked (_check_amp); each None when not given."""
    __slots__ = ("grad_scale", "found_inf", "clip_coef", "first")

    def __init__(self, grad_scale=None, found_inf=None, clip_coef=None, first=None):
        self.grad_scale, self.found_inf, self.clip_coef = grad_scale, found_inf, clip_coef
        self.first = first

    def pointers(self, dummy):
        """(scale_ptr, inf_ptr, coef_ptr, first_ptr) kernel arguments: `dummy` (a tensor of
        the launch, never dereferenced: its flag is off) for each one not given."""
        return tuple(dummy if t is None else t
                     for t in (self.grad_scale, self.found_inf, self.clip_coef, self.first))


_NO_AMP = _Amp()


class _HyperTensors:
    """The hyper-parameters of one step held in tensors (_check_hyper_tensors), each None when
    given as a float."""
    __slots__ = ("lr", "momentum", "dampening", "weight_decay")

    def __init__(self, lr=None, momentum=None, dampening=None, weight_decay=None):
        self.lr, self.momentum, self.dampening = lr, momentum, dampening
        self.weight_decay = weight_decay

    def pointers(self, dummy):
        """(lr_ptr, m_ptr, d_ptr, wd_ptr) kernel arguments, `dummy` for each one not given."""
        return tuple(dummy if t is None else t
                     for t in (self.lr, self.momentum, self.dampening, self.weight_decay))


_NO_HYPER = _HyperTensors()


def _check_hyper_tensors(lr_tensor, momentum_tensor, dampening_tensor, weight_decay_tensor,
                         device) -> _HyperTensors:
    """Hyper-parameters held in tensors: 1 element, fp32 or fp64, on the parameters' device
    (the kernels read them there: no host sync)."""
    for t, n in ((lr_tensor, "lr_tensor"), (momentum_tensor, "momentum_tensor"),
                 (dampening_tensor, "dampening_tensor"),
                 (weight_decay_tensor, "weight_decay_tensor")):
        if t is None:
            continue
        if not (isinstance(t, torch.Tensor) and t.layout == torch.strided and t.numel() == 1
                and t.dtype in (torch.float32, torch.float64) and t.device == device):
            raise ValueError(f"{n} must be a 1-element float32 or float64 tensor on {device} "
                             f"(the parameters' device), got "
                             + (_describe(t) if isinstance(t, torch.Tensor) else repr(t)))
    return _HyperTensors(lr_tensor, momentum_tensor, dampening_tensor, weight_decay_tensor)


def _check_amp(grad_scale, found_inf, clip_coef, device, dtype, first_step_tensor=None,
               first_step=False) -> _Amp:
    """GradScaler's grad_scale and found_inf: 1-element float32 tensors on the parameters'
    device; clip_coef: 1-element, of the parameters' dtype, on their device; first_step_tensor:
    1-element bool on their device, with first_step=True (the kernels read all four there: no
    host sync). The messages are csrc/momentum_ops.cpp's check_tensors'."""
    want_dtype = {"grad_scale": (torch.float32, "float32"),
                  "found_inf": (torch.float32, "float32"),
                  "clip_coef": (dtype, f"{dtype} (the parameters' dtype)"),
                  "first_step_tensor": (torch.bool, "bool")}
    for t, n in ((grad_scale, "grad_scale"), (found_inf, "found_inf"),
                 (clip_coef, "clip_coef"), (first_step_tensor, "first_step_tensor")):
        if t is None:
            continue
        want_t, want = want_dtype[n]
        ok = (isinstance(t, torch.Tensor) and t.layout == torch.strided and t.numel() == 1
              and t.dtype == want_t and t.device == device)
        if not ok:
            raise ValueError(f"{n} must be a 1-element {want} tensor on {device} (the "
                             f"parameters' device), got "
                             + (_describe(t) if isinstance(t, torch.Tensor) else repr(t)))
    if first_step_tensor is not None and not first_step:
        raise ValueError("first_step_tensor is given with first_step=False: it decides a first "
                         "step, which first_step=True allows")
    return _Amp(grad_scale, found_inf, clip_coef,
                None if first_step_tensor is None else first_step_tensor.view(torch.uint8))


def _device_guard(device: torch.device):
    """Triton launches on the CURRENT device's current stream: make it the tensors' device."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _launch(p, g, b, n, sc, vals, nesterov, maximize, first_step, hyper, amp=_NO_AMP) -> None:
    if n == 0:
        return
    grid = (triton.cdiv(n, BLOCK_SIZE),)
    _sgd_flat_kernel[grid](p, g, b if vals["use_buf"] else p, n, *hyper.pointers(p),
                           *amp.pointers(p), *sc,
                           **_flags(p.dtype, vals, nesterov, maximize, first_step, hyper, amp))


# Most programs in one launch: CUDA's grid.x limit. Reaching it takes 2^41 elements, beyond any
# GPU's memory today, but the list path splits its launch there rather than fail.
_MAX_PROGRAMS = 2**31 - 1


def _list_table(addrs, numels, device):
    """The pointer table of the list and the master kernel, as ONE int64 tensor moved to
    `device` in one host-to-device copy: rows (per tensor its addresses, then its numel: 4
    for the list kernel's p, g, buf; 6 for the master kernel's), then the block map (2 per
    program: tensor index, first element of the block). Every numel must be > 0.
    Returns (rows, blocks, n_programs): rows and blocks are views of that one device tensor."""
    nt = len(numels)
    numel = torch.tensor(numels, dtype=torch.int64)
    nblocks = (numel + (BLOCK_SIZE - 1)) // BLOCK_SIZE
    n_programs = int(nblocks.sum())
    tensor_of = torch.repeat_interleave(torch.arange(nt, dtype=torch.int64), nblocks)
    first_program = torch.cumsum(nblocks, 0) - nblocks
    start = (torch.arange(n_programs, dtype=torch.int64) - first_program[tensor_of]) * BLOCK_SIZE
    rows = torch.cat([torch.tensor(addrs, dtype=torch.int64).reshape(nt, len(addrs[0])),
                      numel.reshape(nt, 1)], 1)
    host = torch.cat([rows.reshape(-1), torch.stack([tensor_of, start], 1).reshape(-1)])
    table = _to_device(host, device)
    return table[:rows.numel()], table[rows.numel():], n_programs


def _to_device(host: torch.Tensor, device):
    """A host tensor on `device` in one host-to-device copy that does not make the host wait."""
    if device.type == "cuda":
        # Pinned + non_blocking: the copy is queued on the current stream (before the kernel)
        # without making the host wait for the GPU; torch's caching host allocator keeps the
        # pinned block alive until the copy has run.
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)  # the interpreter: it stays on the CPU


_TABLES: collections.OrderedDict = collections.OrderedDict()  # (device, addrs, numels) -> table
_TABLES_KEPT = 8  # the most recent tables kept (an optimizer makes one per group and dtype)


def _cached_list_table(addrs, numels, device):
    """_list_table's result for these addresses and sizes, built once: the table is a function
    of them alone, so a step over the same tensors reuses its device copy: no host work, no
    allocation, no copy (such a step can be captured in a CUDA graph once warmed up)."""
    key = (device, tuple(addrs), tuple(numels))
    hit = _TABLES.get(key)
    if hit is None:
        hit = _TABLES[key] = _list_table(addrs, numels, device)
        if len(_TABLES) > _TABLES_KEPT:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return hit


def _table_launches(addrs, numels, device):
    """(rows, blocks, programs) of each launch over the tensors of one table: one, split only
    past CUDA's grid limit (_MAX_PROGRAMS)."""
    rows, blocks, n_programs = _cached_list_table(addrs, numels, device)
    for first in range(0, n_programs, _MAX_PROGRAMS):
        yield rows, blocks[2 * first:], min(_MAX_PROGRAMS, n_programs - first)


# ---- entry points ----------------------------------------------------------------------------
def triton_sgd_step_flat_(param, grad, momentum_buffer, segments, *, lr, momentum, dampening,
                          weight_decay, nesterov, maximize, first_step, lr_tensor=None,
                          grad_scale=None, found_inf=None, clip_coef=None, momentum_tensor=None,
                          dampening_tensor=None, weight_decay_tensor=None,
                          first_step_tensor=None) -> None:
    """Flat step over the spans listed in segments ([k, 2] int64 CPU: offset, numel, increasing
    and disjoint) of three contiguous 1-D buffers; one launch per non-empty segment.
    grad_scale / clip_coef: the spans' gradients are unscaled / clipped and written back;
    found_inf != 0 skips the update (module doc)."""
    vals = _check_scalars(lr, momentum, dampening, weight_decay, nesterov, maximize, first_step,
                          momentum_tensor)
    need_buf = vals["use_buf"]
    if need_buf and momentum_buffer is None:
        raise ValueError(f"momentum_buffer is None but momentum={momentum} needs one")
    for t, n in ((param, "param"), (grad, "grad"),
                 (momentum_buffer if need_buf else param, "momentum_buffer")):
        _check_tensor(t, n)
        if t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"{n} of a flat step must be a contiguous 1-D tensor, got "
                             f"{_describe(t)} with strides {t.stride()}")
    if not (isinstance(segments, torch.Tensor) and segments.device.type == "cpu"
            and segments.dtype == torch.int64 and segments.dim() == 2
            and segments.shape[1] == 2 and segments.is_contiguous()):
        raise ValueError("segments must be a contiguous CPU int64 tensor of shape [k, 2], got "
                         + (_describe(segments) if isinstance(segments, torch.Tensor)
                            else repr(segments)))
    b = momentum_buffer if need_buf else None
    _check_triple("", param, grad, b, [])
    hyper = _check_hyper_tensors(lr_tensor, momentum_tensor, dampening_tensor,
                                 weight_decay_tensor, param.device)
    amp = _check_amp(grad_scale, found_inf, clip_coef, param.device, param.dtype,
                     first_step_tensor, first_step)
    named = [(param, "param"), (grad, "grad")] + ([(b, "momentum_buffer")] if need_buf else [])
    _check_no_overlap(named)
    total = param.numel()
    spans, end = [], 0
    for i, (off, cnt) in enumerate(segments.tolist()):
        if not (off >= end and off <= total and 0 <= cnt <= total - off):
            raise ValueError(f"segments[{i}] = ({off}, {cnt}) must lie inside the flat buffer of "
                             f"{total} elements, after the previous segment (which ends at {end})")
        end = off + cnt
        if cnt:
            spans.append((off, cnt))
    sc = _scalars(vals, param.dtype)
    with _device_guard(param.device):
        for off, cnt in spans:
            _launch(param[off:off + cnt], grad[off:off + cnt],
                    b[off:off + cnt] if need_buf else None, cnt, sc, vals, nesterov, maximize,
                    first_step, hyper, amp)


def triton_sgd_step_list_(params, grads, momentum_buffers, *, lr, momentum, dampening,
                          weight_decay, nesterov, maximize, first_step, lr_tensor=None,
                          grad_scale=None, found_inf=None, clip_coef=None, momentum_tensor=None,
                          dampening_tensor=None, weight_decay_tensor=None,
                          first_step_tensor=None) -> None:
    """Per-tensor step over lists of dense tensors (one dtype, one device; each triple with
    equal shapes and strides; momentum_buffers empty/None when momentum == 0). ONE launch of the
    list kernel for all non-empty tensors (split only past CUDA's grid limit, _MAX_PROGRAMS),
    through a pointer table copied to the device in one transfer; each tensor is walked in
    memory order (dense: any layout). grad_scale, found_inf, clip_coef: as for the flat step."""
    vals = _check_scalars(lr, momentum, dampening, weight_decay, nesterov, maximize, first_step,
                          momentum_tensor)
    params, grads = list(params), list(grads)
    bufs = list(momentum_buffers) if momentum_buffers is not None else []
    need_buf = vals["use_buf"]
    _check_list_lengths(params, [(grads, "grads")], bufs, need_buf, momentum)
    named = _check_list_triples(params, grads, bufs, need_buf)
    if not params:
        return
    hyper = _check_hyper_tensors(lr_tensor, momentum_tensor, dampening_tensor,
                                 weight_decay_tensor, params[0].device)
    amp = _check_amp(grad_scale, found_inf, clip_coef, params[0].device, params[0].dtype,
                     first_step_tensor, first_step)
    _check_no_overlap(named)
    addrs, numels, _ = _triple_addrs(params, grads, bufs, need_buf)
    if not numels:
        return
    dtype, device = params[0].dtype, params[0].device
    sc = _scalars(vals, dtype)
    flags = _flags(dtype, vals, nesterov, maximize, first_step, hyper, amp)
    tl_dtype = _TL_DTYPE[dtype]
    with _device_guard(device):
        for rows, blocks, count in _table_launches(addrs, numels, device):
            _sgd_list_kernel[(count,)](rows, blocks, *hyper.pointers(rows), *amp.pointers(rows),
                                       *sc, DTYPE=tl_dtype, **flags)


def triton_sgd_step_master_list_(params, grads, momentum_buffers, remainders, ties, *, lr,
                                 momentum, dampening, weight_decay, nesterov, maximize,
                                 first_step, found_inf=None, lr_tensor=None,
                                 momentum_tensor=None, dampening_tensor=None,
                                 weight_decay_tensor=None) -> None:
    """Master weights (csrc/include/momentum_cuda/bf16_split.h): bf16 params whose fp32
    masters are joined from the params, the int16 remainders (shaped and strided like the
    params) and the tie bits (a contiguous uint8 tensor of ceil(numel / 8) bytes each, bit j of
    byte k for element 8k + j in memory order), take torch's fp32 SGD step with the bf16
    gradients widened exactly, and are split again; momentum_buffers are fp32, like the params
    (empty/None when momentum == 0). The checks of csrc/momentum_ops.cpp's
    sgd_step_master_list, all before the launch; then ONE launch for all non-empty tensors (as
    the list path, through a pointer table). found_inf (GradScaler's) != 0 skips the step on
    the device (_unless_skipped); lr_tensor ... weight_decay_tensor are read there in place
    of the floats (_mode_scalars)."""
    vals = _check_scalars(lr, momentum, dampening, weight_decay, nesterov, maximize, first_step,
                          momentum_tensor)
    params, grads = list(params), list(grads)
    rems, ties = list(remainders), list(ties)
    bufs = list(momentum_buffers) if momentum_buffers is not None else []
    need_buf = vals["use_buf"]
    _check_list_lengths(params, [(grads, "grads"), (rems, "remainders"), (ties, "ties")], bufs,
                        need_buf, momentum)
    named = _check_list_triples(params, grads, bufs, need_buf,
                                why="master weights split a bf16 parameter",
                                buf_dtype=torch.float32)
    for i, (p, r, t) in enumerate(zip(params, rems, ties)):
        _check_like(r, f"remainders[{i}]", p, f"params[{i}]", torch.int16)
        _check_ties(t, f"ties[{i}]", p, f"params[{i}]")
        named += [(r, f"remainders[{i}]"), (t, f"ties[{i}]")]
    _check_no_overlap(named)
    # remainders are strided like the params: element j of the walk is the same element of
    # every tensor (tie bit j included: the bits are in memory order)
    addrs, numels = [], []
    for i, (p, g, r, t) in enumerate(zip(params, grads, rems, ties)):
        if p.numel():
            addrs.append((p.data_ptr(), g.data_ptr(), bufs[i].data_ptr() if need_buf else 0,
                          r.data_ptr(), t.data_ptr()))
            numels.append(p.numel())
    inf, hyper = _mode_tensors(found_inf, lr_tensor, momentum_tensor, dampening_tensor,
                               weight_decay_tensor, params)
    if not numels:
        return
    device = params[0].device
    sc = _scalars(vals, torch.float32)
    flags = _hyper_flags(vals, nesterov, maximize, first_step, hyper)
    with _device_guard(device):
        for rows, blocks, count in _table_launches(addrs, numels, device):
            _sgd_master_kernel[(count,)](rows, blocks, rows if inf is None else inf,
                                         *hyper.pointers(rows), *sc, AMP_SKIP=inf is not None,
                                         **flags)


def triton_sgd_step_sr_list_(params, grads, momentum_buffers, keys, *, lr, momentum, dampening,
                             weight_decay, nesterov, maximize, first_step, offsets=None,
                             lr_tensor=None, momentum_tensor=None, dampening_tensor=None,
                             weight_decay_tensor=None) -> None:
    """Stochastic rounding (csrc/include/momentum_cuda/stochastic.h, reference.
    sgd_sr_reference_step): bf16 params, grads and momentum_buffers (empty/None when
    momentum == 0), dense, each triple with equal shapes and strides; keys: one int in
    [0, 2^32) per parameter, seeding its random bits; offsets (None: all 0): each parameter's
    first index in its whole tensor (a shard's place). Each parameter is widened to fp32, takes
    torch's fp32 step with its widened gradient and buffer, and is rounded stochastically back
    to bf16 with the random bits of each element's index in memory order (from its offset); the
    buffer is rounded to nearest even. The checks of csrc/momentum_ops.cpp's sgd_step_sr_list,
    all before the
    launch; then ONE launch for all non-empty tensors (as the list path, through a pointer
    table). lr_tensor ... weight_decay_tensor are read on the device in place of the floats
    (_mode_scalars)."""
    params, grads = list(params), list(grads)
    keys = _check_keys(keys, len(params))
    vals = _check_scalars(lr, momentum, dampening, weight_decay, nesterov, maximize, first_step,
                          momentum_tensor)
    bufs = list(momentum_buffers) if momentum_buffers is not None else []
    need_buf = vals["use_buf"]
    _check_list_lengths(params, [(grads, "grads")], bufs, need_buf, momentum)
    named = _check_list_triples(params, grads, bufs, need_buf,
                                why="stochastic rounding rounds to bf16")
    _check_no_overlap(named)
    offsets = _check_offsets(offsets, params)
    addrs, numels, kept = _triple_addrs(params, grads, bufs, need_buf)
    _, hyper = _mode_tensors(None, lr_tensor, momentum_tensor, dampening_tensor,
                             weight_decay_tensor, params)
    if not numels:
        return
    device = params[0].device
    # The keys change at every step, the addresses seldom: they travel apart. The pointer
    # table (the list kernel's rows and block map, the same for the same tensors) stays cached
    # on the device (_cached_list_table: no host work, no copy on a repeated step); the keys go
    # in a small int64 tensor of their own (key and offset: 16 bytes per tensor, in the table's
    # tensor order), copied each step without making the host wait. Keys in the table instead
    # would rebuild and copy the whole table (32 bytes per tensor, 16 per program) every step.
    keys_dev = _to_device(torch.tensor([x for i in kept for x in (keys[i], offsets[i])],
                                       dtype=torch.int64), device)
    sc = _scalars(vals, torch.float32)
    flags = _hyper_flags(vals, nesterov, maximize, first_step, hyper)
    with _device_guard(device):
        for rows, blocks, count in _table_launches(addrs, numels, device):
            _sgd_sr_kernel[(count,)](rows, blocks, keys_dev, *hyper.pointers(rows), *sc, **flags)


def _mode_tensors(found_inf, lr_tensor, momentum_tensor, dampening_tensor, weight_decay_tensor,
                  params):
    """A mode op's tensors, checked after its other arguments and in this order
    (csrc/momentum_ops.cpp's run_mode_step), where params is not empty: (found_inf: None or
    GradScaler's 1-element fp32 tensor on the parameters' device, a _HyperTensors)."""
    if not params:
        return None, _NO_HYPER
    device = params[0].device
    inf = None if found_inf is None else _check_amp(None, found_inf, None, device,
                                                    params[0].dtype).found_inf
    return inf, _check_hyper_tensors(lr_tensor, momentum_tensor, dampening_tensor,
                                     weight_decay_tensor, device)


def _check_offsets(offsets, params) -> list:
    """The stochastic-rounding offsets: None (all 0) or one int in [0, 2^63 - numel] per
    parameter (csrc/momentum_ops.cpp's checks, its messages)."""
    if offsets is None:
        return [0] * len(params)
    offsets = list(offsets)
    if len(offsets) != len(params):
        raise ValueError(f"offsets has {len(offsets)} entries but params has {len(params)}")
    for i, (o, p) in enumerate(zip(offsets, params)):
        if isinstance(o, bool) or not isinstance(o, int) or not 0 <= o <= 2**63 - 1 - p.numel():
            raise ValueError(f"offsets[{i}] must be in [0, 2^63 - numel], got {o!r}")
    return offsets


def _check_scales(s, n: str, p, pn: str) -> None:
    """s (named n) holds p's int8 block scales: a contiguous 1-D fp32 tensor of
    ceil(numel / QBLOCK) elements on p's device (csrc/momentum_ops.cpp's check)."""
    _check_tensor(s, n)
    blocks = (p.numel() + QBLOCK - 1) // QBLOCK
    if not (s.device == p.device and s.dtype == torch.float32 and s.dim() == 1
            and s.numel() == blocks and s.is_contiguous()):
        raise ValueError(f"{n} must be a contiguous 1-D float32 tensor of {blocks} block scales "
                         f"(one per {QBLOCK} elements of {pn}) on {p.device}, got "
                         f"{_describe(s)} with strides {s.stride()}")


def triton_sgd_step_qmom_list_(params, grads, momentum_buffers, scales, *, lr, momentum,
                               dampening, weight_decay, nesterov, maximize, first_step,
                               found_inf=None, lr_tensor=None, momentum_tensor=None,
                               dampening_tensor=None, weight_decay_tensor=None) -> None:
    """momentum_dtype (csrc/include/momentum_cuda/momentum_dtype.h, reference.
    sgd_momentum_dtype_reference_step): fp32 params and grads, dense; momentum_buffers
    (empty/None when momentum == 0) shaped and strided like their params, bf16 when scales is
    empty, else int8 codes with scales[i] a contiguous 1-D fp32 tensor of ceil(numel / QBLOCK)
    block scales (blocks counted in memory order from element 0). Each parameter takes torch's
    fp32 step with its widened buffer; the new buffer is stored rounded to nearest even (bf16)
    or quantized per block (int8). The checks of csrc/momentum_ops.cpp's sgd_step_qmom_list,
    all before the launch; then ONE launch for all non-empty tensors (as the list path,
    through a pointer table). found_inf (GradScaler's) != 0 skips the step on the device
    (_unless_skipped); lr_tensor ... weight_decay_tensor are read there in place of the
    floats (_mode_scalars)."""
    vals = _check_scalars(lr, momentum, dampening, weight_decay, nesterov, maximize, first_step,
                          momentum_tensor)
    params, grads = list(params), list(grads)
    bufs = list(momentum_buffers) if momentum_buffers is not None else []
    scales = list(scales) if scales is not None else []
    need_buf = vals["use_buf"]
    _check_list_lengths(params, [(grads, "grads")], bufs, need_buf, momentum)
    int8 = bool(scales)
    if int8 and not need_buf:
        raise ValueError(f"scales has {len(scales)} tensors but momentum={momentum} has no "
                         "momentum buffers to scale")
    if int8 and len(scales) != len(params):
        raise ValueError(f"scales has {len(scales)} tensors but params has {len(params)} (int8 "
                         "momentum buffers need one each; bf16 ones none)")
    named = _check_list_triples(params, grads, bufs, need_buf,
                                why="momentum_dtype keeps float32 parameters",
                                param_dtype=torch.float32,
                                buf_dtype=torch.int8 if int8 else torch.bfloat16)
    for i, p in enumerate(params if int8 else ()):
        _check_scales(scales[i], f"scales[{i}]", p, f"params[{i}]")
        named.append((scales[i], f"scales[{i}]"))
    _check_no_overlap(named)
    # buffers (and scales) are laid out like the params: element j of the walk is the same
    # element of each, and int8 block j // QBLOCK of the memory order
    addrs, numels = [], []
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.numel():
            addrs.append((p.data_ptr(), g.data_ptr(), bufs[i].data_ptr() if need_buf else 0)
                         + ((scales[i].data_ptr(),) if int8 else ()))
            numels.append(p.numel())
    inf, hyper = _mode_tensors(found_inf, lr_tensor, momentum_tensor, dampening_tensor,
                               weight_decay_tensor, params)
    if not numels:
        return
    device = params[0].device
    sc = _scalars(vals, torch.float32)
    flags = _hyper_flags(vals, nesterov, maximize, first_step, hyper)
    # 16-byte aligned p, g and buffers (torch's allocations are; views at odd offsets not):
    # full blocks then run unmasked with 128-bit accesses
    flags.update(QUANT=int(int8), QBLOCK=QBLOCK,
                 ALIGNED=all(a % 16 == 0 for row in addrs for a in row[:3]))
    with _device_guard(device):
        for rows, blocks, count in _table_launches(addrs, numels, device):
            _sgd_qmom_kernel[(count,)](rows, blocks, rows if inf is None else inf,
                                       *hyper.pointers(rows), *sc, AMP_SKIP=inf is not None,
                                       **flags)


def triton_sgd_step_fp16_master_list_(params, grads, momentum_buffers, masters, *, lr, momentum,
                                      dampening, weight_decay, nesterov, maximize,
                                      first_step, found_inf=None, lr_tensor=None,
                                      momentum_tensor=None, dampening_tensor=None,
                                      weight_decay_tensor=None) -> None:
    """fp16 master weights (csrc/include/momentum_cuda/fp16_master.h, reference.
    sgd_fp16_master_reference_step): fp16 params and grads, dense; fp32 masters and
    momentum_buffers (empty/None when momentum == 0) shaped and strided like their params. Each
    master takes torch's fp32 step with its gradient widened exactly; its parameter becomes the
    new master rounded to nearest even (c10's conversion: subnormals, inf, NaN as 0x7E00). The
    checks of csrc/momentum_ops.cpp's sgd_step_fp16_master_list, all before the launch; then
    ONE launch for all non-empty tensors (as the list path, through a pointer table).
    found_inf (GradScaler's) != 0 skips the step on the device (_unless_skipped); lr_tensor ...
    weight_decay_tensor are read there in place of the floats (_mode_scalars)."""
    vals = _check_scalars(lr, momentum, dampening, weight_decay, nesterov, maximize, first_step,
                          momentum_tensor)
    params, grads, masters = list(params), list(grads), list(masters)
    bufs = list(momentum_buffers) if momentum_buffers is not None else []
    need_buf = vals["use_buf"]
    _check_list_lengths(params, [(grads, "grads"), (masters, "masters")], bufs, need_buf,
                        momentum)
    named = _check_list_triples(params, grads, bufs, need_buf,
                                why="fp16 master weights keep an fp32 copy of a float16 "
                                    "parameter",
                                param_dtype=torch.float16, buf_dtype=torch.float32)
    for i, (p, m) in enumerate(zip(params, masters)):
        _check_like(m, f"masters[{i}]", p, f"params[{i}]", torch.float32)
        named.append((m, f"masters[{i}]"))
    _check_no_overlap(named)
    # masters and buffers are laid out like the params: element j of the walk is the same
    # element of each
    addrs, numels = [], []
    for i, (p, g, m) in enumerate(zip(params, grads, masters)):
        if p.numel():
            addrs.append((p.data_ptr(), g.data_ptr(), bufs[i].data_ptr() if need_buf else 0,
                          m.data_ptr()))
            numels.append(p.numel())
    inf, hyper = _mode_tensors(found_inf, lr_tensor, momentum_tensor, dampening_tensor,
                               weight_decay_tensor, params)
    if not numels:
        return
    device = params[0].device
    sc = _scalars(vals, torch.float32)
    flags = _hyper_flags(vals, nesterov, maximize, first_step, hyper)
    # 16-byte aligned tensors (torch's allocations are; views at odd offsets not): full
    # blocks then run unmasked with 128-bit accesses
    flags.update(ALIGNED=all(a % 16 == 0 for row in addrs for a in row))
    with _device_guard(device):
        for rows, blocks, count in _table_launches(addrs, numels, device):
            _sgd_fp16_master_kernel[(count,)](rows, blocks, rows if inf is None else inf,
                                              *hyper.pointers(rows), *sc,
                                              AMP_SKIP=inf is not None, **flags)
