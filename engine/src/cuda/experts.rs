//! A sparse layer's routed experts on the GPU (`experts.cu`): every active expert of a step in
//! three launches (gate/up with SwiGLU, down, the weighted sum), reading each expert's weights
//! where they lie through a table of their device addresses, where candle's path launched ~8
//! operations per active expert.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Shape, Storage, Tensor};

use super::launch::{view, Gpu, Launch};
use crate::Result;

const SOURCE: &str = include_str!("experts.cu");
/// The source's `EXPERT_WARPS`, as threads.
const WARPS: usize = 8;

fn ptx() -> candle_core::Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    super::compiled(&PTX, "experts.cu", SOURCE)
}

/// Where a layer's experts' weights lie on the device, as the kernels read them.
#[derive(Debug, Clone)]
pub struct ExpertWeights {
    /// Per expert, the low and high halves of its stacked gate/up weight's address.
    gate_up: Tensor,
    /// The same for its down weight.
    down: Tensor,
    experts: usize,
    hidden: usize,
    width: usize,
    dtype: DType,
    /// The weights themselves (handles on their storage), so that the addresses stay theirs for
    /// as long as the table lives.
    _held: Vec<Tensor>,
}

impl ExpertWeights {
    /// The table for experts given as (stacked gate/up weight `(2·width, hidden)`, down weight
    /// `(hidden, width)`), all of one float dtype on one GPU; `None` where the kernels do not
    /// apply (off the GPU, mixed shapes or dtypes, a non-contiguous weight). The table holds the
    /// tensors too, so their storage outlives it.
    pub fn new(experts: &[(&Tensor, &Tensor)]) -> Result<Option<Self>> {
        let Some(&(first, _)) = experts.first() else {
            return Ok(None);
        };
        let (Ok((rows, hidden)), dtype) = (first.dims2(), first.dtype()) else {
            return Ok(None);
        };
        let width = rows / 2;
        let fits = |(gate_up, down): &(&Tensor, &Tensor)| {
            gate_up.device().is_cuda()
                && gate_up.dims() == [2 * width, hidden]
                && down.dims() == [hidden, width]
                && gate_up.dtype() == dtype
                && down.dtype() == dtype
                && gate_up.is_contiguous()
                && down.is_contiguous()
        };
        if width == 0
            || !matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
            || !experts.iter().all(fits)
        {
            return Ok(None);
        }
        let table = |weights: Vec<&Tensor>| -> Result<Tensor> {
            let mut words = Vec::with_capacity(2 * weights.len());
            for w in weights {
                let at = address(w)?;
                words.extend([at as u32, (at >> 32) as u32]);
            }
            let len = words.len();
            Ok(Tensor::from_vec(words, len, first.device())?)
        };
        Ok(Some(Self {
            gate_up: table(experts.iter().map(|e| e.0).collect())?,
            down: table(experts.iter().map(|e| e.1).collect())?,
            experts: experts.len(),
            _held: experts
                .iter()
                .flat_map(|(a, b)| [(*a).clone(), (*b).clone()])
                .collect(),
            hidden,
            width,
            dtype,
        }))
    }
}

/// The device address of a contiguous float tensor's first element.
fn address(t: &Tensor) -> candle_core::Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        candle_core::bail!("pio-experts: a weight off the GPU")
    };
    let Some((start, _)) = layout.contiguous_offsets() else {
        candle_core::bail!("pio-experts: a weight that is not contiguous")
    };
    let stream = s.device.cuda_stream();
    let base = match &s.slice {
        CudaStorageSlice::F32(x) => x.device_ptr(&stream).0,
        CudaStorageSlice::BF16(x) => x.device_ptr(&stream).0,
        CudaStorageSlice::F16(x) => x.device_ptr(&stream).0,
        _ => candle_core::bail!("pio-experts: a weight of {:?}", t.dtype()),
    };
    Ok(base + (start * t.dtype().size_in_bytes()) as u64)
}

/// `Σ weight · expert(x)` for every row of `xs` (`(tokens, hidden)`, the experts' dtype) over
/// the step's routing `words` (`models::experts::routing_words`: `groups` active experts,
/// `pairs` (token, expert) pairs); `weight_in_dtype`: the routing weight rounded to the model's
/// dtype before its product (Qwen3-MoE), else the product taken in f32 (GLM). `None` where the
/// kernels do not take `xs`.
pub fn forward(
    xs: &Tensor,
    weights: &ExpertWeights,
    words: Vec<u32>,
    (groups, pairs): (usize, usize),
    weight_in_dtype: bool,
) -> Result<Option<Tensor>> {
    let Ok((tokens, hidden)) = xs.dims2() else {
        return Ok(None);
    };
    if !xs.device().is_cuda()
        || xs.dtype() != weights.dtype
        || hidden != weights.hidden
        || tokens > MAX_TOKENS
    {
        return Ok(None);
    }
    if words.len() != 2 * groups + 1 + 3 * pairs + tokens + 1 {
        return Err(crate::EngineError::Internal(format!(
            "expert routing of {} words for {groups} experts, {pairs} pairs, {tokens} tokens",
            words.len()
        )));
    }
    let len = words.len();
    let words = Tensor::from_vec(words, len, xs.device())?;
    stages(xs, weights, &words, (groups, pairs), weight_in_dtype).map(Some)
}

/// [`forward`] for a router that sends each token to its `k` most probable experts (`probs`,
/// `(tokens, experts)` f32 on the GPU), weights renormalized over the k when `normalize`: the
/// choice and the routing words made on the device (`top_k.cu`, `route_words`), so the layer
/// copies nothing to the host and back. `None` where the kernels do not take it.
pub fn forward_routed(
    xs: &Tensor,
    weights: &ExpertWeights,
    probs: &Tensor,
    (k, normalize): (usize, bool),
    weight_in_dtype: bool,
) -> Result<Option<Tensor>> {
    let (Ok((tokens, hidden)), Ok((rows, experts))) = (xs.dims2(), probs.dims2()) else {
        return Ok(None);
    };
    if !xs.device().is_cuda()
        || xs.dtype() != weights.dtype
        || hidden != weights.hidden
        || rows != tokens
        || experts != weights.experts
        || experts > MAX_EXPERTS
        || tokens > MAX_TOKENS
    {
        return Ok(None);
    }
    let Some(best) = super::top_k::on_device(probs, k)? else {
        return Ok(None);
    };
    let route = Route {
        tokens,
        k,
        experts,
        normalize,
    };
    let words = best.apply_op1_no_bwd(&Gpu(route.clone()))?;
    let pairs = tokens * k;
    stages(
        xs,
        weights,
        &words,
        (route.groups(), pairs),
        weight_in_dtype,
    )
    .map(Some)
}

/// The three stages over routing `words` already on the device.
fn stages(
    xs: &Tensor,
    weights: &ExpertWeights,
    words: &Tensor,
    counts: (usize, usize),
    weight_in_dtype: bool,
) -> Result<Tensor> {
    let xs = xs.contiguous()?;
    let stage = |stage: Stage| {
        Gpu(ExpertStage {
            stage,
            words: words.clone(),
            weights: weights.clone(),
            counts,
        })
    };
    let h = xs.apply_op1_no_bwd(&stage(Stage::GateUp))?;
    let y = h.apply_op1_no_bwd(&stage(Stage::Down))?;
    Ok(xs.apply_op2_no_bwd(&y, &stage(Stage::Sum { weight_in_dtype }))?)
}

/// The most experts `route_words` takes (a thread each in one block).
const MAX_EXPERTS: usize = 1024;

/// The most rows the kernels take at once: their per-pair buffers grow with the rows (a 1,024-row
/// chunk of Qwen3-Coder: 8,192 pairs, 64 MB of f32 down outputs), and each expert's weights are
/// re-read once per 8 of its pairs; a longer prompt chunk takes candle's per-expert products
/// (the engine's default step holds 256 tokens).
const MAX_TOKENS: usize = 1024;

/// `route_words`' launch: its operand is `top_k.cu`'s `(tokens, 2k)` output.
#[derive(Clone)]
struct Route {
    tokens: usize,
    k: usize,
    experts: usize,
    normalize: bool,
}

impl Route {
    /// The group slots the words hold: no more than there are experts, or pairs to give them.
    fn groups(&self) -> usize {
        self.experts.min(self.tokens * self.k)
    }
}

impl Launch<1> for Route {
    const NAME: &'static str = "pio-route-words";

    fn shape(&self, _: [&Layout; 1]) -> Shape {
        let pairs = self.tokens * self.k;
        Shape::from(2 * self.groups() + 1 + 3 * pairs + self.tokens + 1)
    }

    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        [(best, layout)]: [(&CudaStorage, &Layout); 1],
        _: &str,
    ) -> candle_core::Result<CudaStorage> {
        let dev = best.device();
        let best = view(best.as_cuda_slice::<u32>()?, layout)?;
        let len = self.shape([layout]).elem_count();
        // SAFETY: every word is written: the experts, their starts, and each token's k pairs.
        let words = unsafe { dev.alloc::<u32>(len)? };
        let func = dev.get_or_load_custom_func("route_words", "pio_experts", ptx()?)?;
        let ints = [self.tokens, self.k, self.experts, self.normalize as usize].map(|v| v as i32);
        let mut b = func.builder();
        b.arg(&words).arg(&best);
        for v in &ints {
            b.arg(v);
        }
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (super::launch::warps_for(self.experts, MAX_EXPERTS), 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the kernel's signature; `best` holds k distinct expert ids below `experts` per
        // token (top_k.cu over `experts` columns), a thread per expert.
        unsafe { b.launch(cfg) }.w()?;
        Ok(<u32 as CudaDType>::wrap_cuda_slice(words, dev.clone()))
    }
}

/// Which of the three launches.
#[derive(Debug, Clone, Copy)]
enum Stage {
    /// `(pairs, width)` in the model's dtype, from `xs`.
    GateUp,
    /// `(pairs, hidden)` in f32, from the gate/up stage's output.
    Down,
    /// `(tokens, hidden)` in the model's dtype, from `xs` (its shape and dtype) and the down
    /// stage's output.
    Sum { weight_in_dtype: bool },
}

/// A stage's launch: the gate/up and down stages over their input alone; the sum over `xs` (its
/// dtype picks the kernel, its shape the output's) and the down stage's f32 output.
struct ExpertStage {
    stage: Stage,
    words: Tensor,
    weights: ExpertWeights,
    counts: (usize, usize),
}

impl Launch<1> for ExpertStage {
    const NAME: &'static str = "pio-experts";

    fn shape(&self, _: [&Layout; 1]) -> Shape {
        let (_, pairs) = self.counts;
        match self.stage {
            Stage::GateUp => Shape::from((pairs, self.weights.width)),
            _ => Shape::from((pairs, self.weights.hidden)),
        }
    }

    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        [input]: [(&CudaStorage, &Layout); 1],
        suffix: &str,
    ) -> candle_core::Result<CudaStorage> {
        self.run::<T>(input, 0, suffix)
    }
}

impl Launch<2> for ExpertStage {
    const NAME: &'static str = "pio-experts";

    fn shape(&self, [xs, _]: [&Layout; 2]) -> Shape {
        xs.shape().clone()
    }

    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        [(_, xs), y]: [(&CudaStorage, &Layout); 2],
        suffix: &str,
    ) -> candle_core::Result<CudaStorage> {
        self.run::<T>(y, xs.dims()[0], suffix)
    }
}

impl ExpertStage {
    /// The stage's launch on `input` (`tokens`: the sum's row count).
    fn run<T: CudaDType + DeviceRepr>(
        &self,
        (input, input_layout): (&CudaStorage, &Layout),
        tokens: usize,
        suffix: &str,
    ) -> candle_core::Result<CudaStorage> {
        let dev = input.device().clone();
        let (groups, pairs) = self.counts;
        let (hidden, width) = (self.weights.hidden, self.weights.width);
        // The routing and the address tables, read in place under their storage's lock.
        let held = [&self.words, &self.weights.gate_up, &self.weights.down]
            .map(Tensor::storage_and_layout);
        let u32s = |i: usize| -> candle_core::Result<_> {
            match &*held[i].0 {
                Storage::Cuda(s) => view(s.as_cuda_slice::<u32>()?, held[i].1),
                _ => candle_core::bail!("pio-experts: a table off the GPU"),
            }
        };
        let words = u32s(0)?;
        let name = |kernel: &str| format!("experts_{kernel}_{suffix}");
        let ints = |v: &[usize]| v.iter().map(|&x| x as i32).collect::<Vec<i32>>();
        let rows_grid = |rows: usize| LaunchConfig {
            grid_dim: (rows.div_ceil(WARPS) as u32, groups as u32, 1),
            block_dim: ((WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        match self.stage {
            Stage::GateUp => {
                let x = view(T::as_cuda_slice(input)?, input_layout)?;
                let table = u32s(1)?;
                // SAFETY: every (pair, row) is written: one warp per row and expert, every pair.
                let h = unsafe { dev.alloc::<T>(pairs * width)? };
                if pairs > 0 {
                    let func =
                        dev.get_or_load_custom_func(&name("gate_up"), "pio_experts", ptx()?)?;
                    let mut b = func.builder();
                    let ints = ints(&[groups, hidden, width]);
                    b.arg(&h).arg(&x).arg(&table).arg(&words);
                    for v in &ints {
                        b.arg(v);
                    }
                    // SAFETY: the kernel's signature; the table holds each expert's weights of
                    // these shapes, the words index experts and tokens of this step.
                    unsafe { b.launch(rows_grid(width)) }.w()?;
                }
                Ok(T::wrap_cuda_slice(h, dev))
            }
            Stage::Down => {
                let h = view(T::as_cuda_slice(input)?, input_layout)?;
                let table = u32s(2)?;
                // SAFETY: every (pair, row) is written, as above.
                let y = unsafe { dev.alloc::<f32>(pairs * hidden)? };
                if pairs > 0 {
                    let func = dev.get_or_load_custom_func(&name("down"), "pio_experts", ptx()?)?;
                    let mut b = func.builder();
                    let ints = ints(&[groups, hidden, width]);
                    b.arg(&y).arg(&h).arg(&table).arg(&words);
                    for v in &ints {
                        b.arg(v);
                    }
                    // SAFETY: as for the gate/up stage.
                    unsafe { b.launch(rows_grid(hidden)) }.w()?;
                }
                Ok(<f32 as CudaDType>::wrap_cuda_slice(y, dev))
            }
            Stage::Sum { weight_in_dtype } => {
                let y = view(f32::as_cuda_slice(input)?, input_layout)?;
                // SAFETY: every (token, element) is written: one block per token.
                let out = unsafe { dev.alloc::<T>(tokens * hidden)? };
                if tokens > 0 {
                    let func = dev.get_or_load_custom_func(&name("sum"), "pio_experts", ptx()?)?;
                    let mut b = func.builder();
                    let ints = ints(&[groups, pairs, tokens, hidden, weight_in_dtype as usize]);
                    b.arg(&out).arg(&y).arg(&words);
                    for v in &ints {
                        b.arg(v);
                    }
                    let cfg = LaunchConfig {
                        grid_dim: (tokens as u32, 1, 1),
                        block_dim: (super::launch::warps_for(hidden, 1024), 1, 1),
                        shared_mem_bytes: 0,
                    };
                    // SAFETY: the kernel's signature; the words list every token's pairs.
                    unsafe { b.launch(cfg) }.w()?;
                }
                Ok(T::wrap_cuda_slice(out, dev))
            }
        }
    }
}
