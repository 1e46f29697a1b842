//! A decoder layer's small steps in one launch each (`fused.cu`): on a GPU a decode step is bound
//! by the launches the host makes, not by the device, so every launch saved is time saved. Each
//! function returns `None` where its kernel does not apply (off the GPU, an unsupported dtype or
//! shape, or the kernels switched off: [`super::KERNELS`]), and the caller then runs candle's separate operations.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Shape, Storage, Tensor};

use candle_core::Result;

use super::launch::{warps_for, Gpu, Launch, MAX_GRID_Y};

const SOURCE: &str = include_str!("fused.cu");

fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    super::compiled(&PTX, "fused.cu", SOURCE)
}

static LAUNCHES: AtomicU64 = AtomicU64::new(0);

/// How many fused kernels this process has launched (a test's proof that they ran).
pub fn launches() -> u64 {
    LAUNCHES.load(Ordering::Relaxed)
}

/// Whether the fused kernels can take `t`: on a GPU, f32/bf16/f16, fusion switched on.
fn applies(t: &Tensor) -> bool {
    t.device().is_cuda()
        && matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && super::KERNELS.on()
}

/// `(x + y, rms_norm(x + y) · weight)` over the last dimension, in one launch: a residual add and
/// the norm after it. `x` and `y` of one shape and dtype, `weight` as wide as their rows.
pub fn add_rms_norm(
    x: &Tensor,
    y: &Tensor,
    weight: &Tensor,
    eps: f64,
) -> Result<Option<(Tensor, Tensor)>> {
    let width = x.dims().last().copied().unwrap_or(0);
    if !applies(x)
        || x.dims() != y.dims()
        || weight.dims() != [width]
        || y.dtype() != x.dtype()
        || weight.dtype() != x.dtype()
    {
        return Ok(None);
    }
    let (x, y) = (x.contiguous()?, y.contiguous()?);
    let both = x.apply_op3_no_bwd(
        &y,
        &weight.contiguous()?,
        &Gpu(AddRmsNorm { eps: eps as f32 }),
    )?;
    Ok(Some((both.get(0)?, both.get(1)?)))
}

struct AddRmsNorm {
    eps: f32,
}

impl Launch<3> for AddRmsNorm {
    const NAME: &'static str = "pio-add-rms-norm";

    fn shape(&self, [x, ..]: [&Layout; 3]) -> Shape {
        let mut dims = vec![2];
        dims.extend_from_slice(x.dims());
        Shape::from(dims)
    }

    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        [x, y, w]: [(&CudaStorage, &Layout); 3],
        suffix: &str,
    ) -> Result<CudaStorage> {
        let dev = x.0.device();
        let n = x.1.shape().elem_count();
        let width = x.1.dims().last().copied().unwrap_or(1).max(1);
        let rows = n / width;
        let x = super::view(T::as_cuda_slice(x.0)?, x.1)?;
        let y = super::view(T::as_cuda_slice(y.0)?, y.1)?;
        let w = super::view(T::as_cuda_slice(w.0)?, w.1)?;
        // SAFETY: the kernel writes every element: one block per row, both halves.
        let out = unsafe { dev.alloc::<T>(2 * n)? };
        if rows > 0 {
            let func = dev.get_or_load_custom_func(
                &format!("add_rms_norm_{suffix}"),
                "pio_fused",
                ptx()?,
            )?;
            let mut b = func.builder();
            let width = width as i32;
            b.arg(&out)
                .arg(&x)
                .arg(&y)
                .arg(&w)
                .arg(&width)
                .arg(&self.eps);
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (warps_for(width as usize, 1024), 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments match the kernel's signature; `x`, `y` hold `rows × width`.
            unsafe { b.launch(cfg) }.w()?;
            LAUNCHES.fetch_add(1, Ordering::Relaxed);
        }
        Ok(T::wrap_cuda_slice(out, dev.clone()))
    }
}

/// Attention's inputs for one layer, in one launch, from `qkv` — `(1, rows, (heads + 2 · kv_heads)
/// · head_dim)`, the stacked projection's output: every query and key head normalized by its
/// RMSNorm and rotated by `cos`/`sin` (`(rows, head_dim / 2)`), the keys and values written into
/// the pool's `keys` and `values` (`(slots, kv_heads, head_dim)`) at `slots` (`rows` u32 on the
/// device), and the queries returned, `(rows, heads, head_dim)`.
pub struct AttentionInputs<'a> {
    /// The query heads' norm weight, `head_dim`.
    pub q_norm: &'a Tensor,
    /// The key heads' norm weight.
    pub k_norm: &'a Tensor,
    /// Both norms' epsilon.
    pub eps: f64,
    /// Where each row's keys and values go in the pool.
    pub slots: &'a Tensor,
    /// The pool's keys for this layer.
    pub keys: &'a Tensor,
    /// The pool's values for this layer.
    pub values: &'a Tensor,
    /// (query heads, key/value heads, head size).
    pub shape: (usize, usize, usize),
}

impl AttentionInputs<'_> {
    /// The queries, with the keys and values in the pool; `None` where the kernel does not apply.
    pub fn apply(&self, qkv: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Option<Tensor>> {
        let (heads, kv_heads, head_dim) = self.shape;
        let rows = qkv.elem_count() / ((heads + 2 * kv_heads) * head_dim).max(1);
        let dtype = qkv.dtype();
        let same = [self.q_norm, self.k_norm, self.keys, self.values, cos, sin]
            .iter()
            .all(|t| t.dtype() == dtype);
        let fits = head_dim % 2 == 0
            && head_dim / 2 <= 1024
            && rows <= MAX_GRID_Y
            && kv_heads > 0
            && qkv.dims().last() == Some(&((heads + 2 * kv_heads) * head_dim))
            && self.q_norm.dims() == [head_dim]
            && self.k_norm.dims() == [head_dim]
            && cos.dims() == [rows, head_dim / 2]
            && sin.dims() == cos.dims()
            && self.slots.dims() == [rows]
            && self.slots.dtype() == DType::U32
            && self.keys.dims().get(1..) == Some(&[kv_heads, head_dim][..])
            && self.values.dims() == self.keys.dims()
            && self.keys.is_contiguous()
            && self.values.is_contiguous();
        if !applies(qkv) || !same || !fits {
            return Ok(None);
        }
        let op = AttentionInputsOp {
            q_norm: self.q_norm.contiguous()?,
            k_norm: self.k_norm.contiguous()?,
            eps: self.eps as f32,
            slots: self.slots.contiguous()?,
            keys: self.keys.clone(),
            values: self.values.clone(),
            shape: self.shape,
        };
        let q =
            qkv.contiguous()?
                .apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, &Gpu(op))?;
        Ok(Some(q))
    }
}

/// [`AttentionInputs`] holding its tensors for the launch.
struct AttentionInputsOp {
    q_norm: Tensor,
    k_norm: Tensor,
    eps: f32,
    slots: Tensor,
    keys: Tensor,
    values: Tensor,
    shape: (usize, usize, usize),
}

impl Launch<3> for AttentionInputsOp {
    const NAME: &'static str = "pio-attention-inputs";

    fn shape(&self, [qkv, ..]: [&Layout; 3]) -> Shape {
        let (heads, kv_heads, head_dim) = self.shape;
        let rows = qkv.shape().elem_count() / ((heads + 2 * kv_heads) * head_dim);
        Shape::from((rows, heads, head_dim))
    }

    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        [qkv, cos, sin]: [(&CudaStorage, &Layout); 3],
        suffix: &str,
    ) -> Result<CudaStorage> {
        let (heads, kv_heads, head_dim) = self.shape;
        let dev = qkv.0.device();
        let rows = qkv.1.shape().elem_count() / ((heads + 2 * kv_heads) * head_dim);
        let qkv = super::view(T::as_cuda_slice(qkv.0)?, qkv.1)?;
        let cos = super::view(T::as_cuda_slice(cos.0)?, cos.1)?;
        let sin = super::view(T::as_cuda_slice(sin.0)?, sin.1)?;
        // The pool's layer is written through its device pointer: candle's lock guards the
        // host-side handle, and the one stream orders these writes before the attention reads.
        let fields = [
            &self.q_norm,
            &self.k_norm,
            &self.keys,
            &self.values,
            &self.slots,
        ]
        .map(Tensor::storage_and_layout);
        let cuda = |i: usize| match &*fields[i].0 {
            Storage::Cuda(s) => Ok(s),
            _ => Err(candle_core::Error::Msg(
                "pio-attention-inputs: a tensor off the GPU".into(),
            )),
        };
        let typed =
            |i: usize| -> Result<_> { super::view(T::as_cuda_slice(cuda(i)?)?, fields[i].1) };
        let (q_norm, k_norm, keys, values) = (typed(0)?, typed(1)?, typed(2)?, typed(3)?);
        let slots = super::view(cuda(4)?.as_cuda_slice::<u32>()?, fields[4].1)?;
        // SAFETY: every element is written: one block per (head, row), each thread a pair.
        let out = unsafe { dev.alloc::<T>(rows * heads * head_dim)? };
        if rows > 0 {
            let func = dev.get_or_load_custom_func(
                &format!("attention_inputs_{suffix}"),
                "pio_fused",
                ptx()?,
            )?;
            let ints = [heads, kv_heads, head_dim].map(|v| v as i32);
            let mut b = func.builder();
            b.arg(&out)
                .arg(&keys)
                .arg(&values)
                .arg(&qkv)
                .arg(&q_norm)
                .arg(&k_norm)
                .arg(&cos)
                .arg(&sin)
                .arg(&slots);
            for v in &ints {
                b.arg(v);
            }
            b.arg(&self.eps);
            let cfg = LaunchConfig {
                grid_dim: ((heads + kv_heads) as u32, rows as u32, 1),
                block_dim: (warps_for(head_dim / 2, 1024), 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments match the kernel's signature; `apply` checked every shape, and
            // the slots come from block tables of this pool (`KvPool::device_slots` checks them).
            unsafe { b.launch(cfg) }.w()?;
            LAUNCHES.fetch_add(1, Ordering::Relaxed);
        }
        Ok(T::wrap_cuda_slice(out, dev.clone()))
    }
}

/// `silu(gate) · up` of `gate_up` = `(…, [gate | up])`, each `width` wide, in one launch.
pub fn swiglu(gate_up: &Tensor, width: usize) -> Result<Option<Tensor>> {
    let rows = gate_up.elem_count() / (2 * width).max(1);
    if !applies(gate_up)
        || gate_up.dims().last() != Some(&(2 * width))
        || width == 0
        || rows > MAX_GRID_Y
    {
        return Ok(None);
    }
    Ok(Some(
        gate_up
            .contiguous()?
            .apply_op1_no_bwd(&Gpu(Swiglu { width }))?,
    ))
}

struct Swiglu {
    width: usize,
}

impl Launch<1> for Swiglu {
    const NAME: &'static str = "pio-swiglu";

    fn shape(&self, [x]: [&Layout; 1]) -> Shape {
        let mut dims = x.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = self.width;
        }
        Shape::from(dims)
    }

    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        [(x, layout)]: [(&CudaStorage, &Layout); 1],
        suffix: &str,
    ) -> Result<CudaStorage> {
        let dev = x.device();
        let rows = layout.shape().elem_count() / (2 * self.width);
        let x = super::view(T::as_cuda_slice(x)?, layout)?;
        // SAFETY: one thread per element of every row.
        let out = unsafe { dev.alloc::<T>(rows * self.width)? };
        if rows > 0 {
            let func =
                dev.get_or_load_custom_func(&format!("swiglu_{suffix}"), "pio_fused", ptx()?)?;
            let width = self.width as i32;
            let mut b = func.builder();
            b.arg(&out).arg(&x).arg(&width);
            let block = warps_for(self.width, 256);
            let cfg = LaunchConfig {
                grid_dim: (self.width.div_ceil(block as usize) as u32, rows as u32, 1),
                block_dim: (block, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments match the kernel's signature; `x` holds `rows × 2 · width`.
            unsafe { b.launch(cfg) }.w()?;
            LAUNCHES.fetch_add(1, Ordering::Relaxed);
        }
        Ok(T::wrap_cuda_slice(out, dev.clone()))
    }
}
