//! Linear layers, dense or quantized. Quantized weights are made tensor by tensor straight from
//! the checkpoint file (one full-precision tensor alive at a time), so loading peaks
//! close to the final size. On the CPU both kinds multiply through the engine's kernels
//! (`pio-kernels`, via `crate::cpu`): dense weights in their dtype; quantized ones with 8-bit
//! activations and integer dot products, every format repacked into 16-row tiles (which replace
//! the blocks); candle's kernels elsewhere.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;
use pio_kernels::PackedMatrix;

/// How linear weights are stored (the manifest's `quantization`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantization {
    /// The model dtype.
    #[default]
    None,
    /// 8-bit blocks of 32 (ggml Q8_0, ~8.5 bits per weight).
    Q8,
    /// 4-bit super-blocks of 256 (ggml Q4_K, ~4.5 bits per weight); Q4_0 for rows that are not a
    /// multiple of 256 wide.
    Q4,
}

impl Quantization {
    /// The manifest's word for it.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Q8 => "q8",
            Self::Q4 => "q4",
        }
    }

    /// The block format for rows `width` wide, or `None` to keep them dense (too narrow to block).
    fn format(self, width: usize) -> Option<GgmlDType> {
        match self {
            Self::None => None,
            Self::Q8 => width.is_multiple_of(32).then_some(GgmlDType::Q8_0),
            Self::Q4 if width.is_multiple_of(256) => Some(GgmlDType::Q4K),
            Self::Q4 => width.is_multiple_of(32).then_some(GgmlDType::Q4_0),
        }
    }
}

/// The block formats a layer takes as a file stores them.
const STORED_FORMATS: [GgmlDType; 4] = [
    GgmlDType::Q8_0,
    GgmlDType::Q4_0,
    GgmlDType::Q4K,
    GgmlDType::Q6K,
];

/// `y = x Wᵀ + b`.
#[derive(Debug, Clone)]
pub enum Linear {
    /// Weights in the model dtype.
    Dense(candle_nn::Linear),
    /// The weights of several bias-free layers over one input, in the model dtype, each kept as
    /// loaded (a mapped checkpoint's own pages) and multiplied as one stacked layer, outputs in
    /// order: see [`Self::stacked`]. CPU tensors only.
    DenseStack(Vec<Tensor>),
    /// Block-quantized weights.
    Quantized {
        /// The weight.
        weight: QuantWeight,
        /// The bias, in the model dtype.
        bias: Option<Tensor>,
    },
}

/// A quantized weight as the layer keeps it.
#[derive(Debug, Clone)]
pub enum QuantWeight {
    /// ggml blocks (on other devices, through candle).
    Blocks(QMatMul),
    /// Q8_0, Q4_0, Q4_K or Q6_K repacked into the kernels' 16-row tiles (CPU).
    Tiles(Arc<PackedMatrix>),
}

impl Linear {
    /// Reads `weight` (and `bias`) under `vb`, quantized as asked.
    pub fn load(
        input: usize,
        output: usize,
        bias: bool,
        quantization: Quantization,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        if let Some((format, name)) = stored_format(input, output, &vb) {
            // A file that stores the weight quantized (a GGUF) decides its format.
            let bias = bias.then(|| vb.get(output, "bias")).transpose()?;
            return Self::from_blocks(&vb, &name, format, (output, input), bias);
        }
        if quantization.format(input).is_none() {
            return candle_nn::linear_b(input, output, bias, vb).map(Self::Dense);
        }
        let bias = bias.then(|| vb.get(output, "bias")).transpose()?;
        if let Some(format) = quantization.format(input) {
            // A checkpoint hands out blocks itself: from its quantization cache, or quantized
            // there from the stored values (see `crate::weights`).
            let name = crate::weights::quantized_name("weight", format, output, input);
            if vb.contains_tensor(&name) {
                return Self::from_blocks(&vb, &name, format, (output, input), bias);
            }
        }
        Self::from_weight(vb.get((output, input), "weight")?, bias, quantization)
    }

    /// A layer over the `format` blocks of `output × input` weights that `vb` serves as `name`:
    /// on the CPU packed into the kernels' tiles straight from the bytes read (through a
    /// `QTensor` they would be copied twice more, a second start from the quantization cache
    /// spent about a tenth of its time there).
    fn from_blocks(
        vb: &VarBuilder,
        name: &str,
        format: GgmlDType,
        (output, input): (usize, usize),
        bias: Option<Tensor>,
    ) -> candle_core::Result<Self> {
        let raw = raw_blocks(vb, name, format, output, input)?;
        if let Some(tiles) = crate::cpu::packed_bytes(&raw, format, (output, input))? {
            return Ok(Self::Quantized {
                weight: QuantWeight::Tiles(Arc::new(tiles)),
                bias,
            });
        }
        Self::from_qtensor(qtensor(&raw, vb, format, output, input)?, bias)
    }

    /// A layer over `weight` under `vb` (`output × input`, no bias) as its file stores it, when
    /// it is stored quantized in a format the kernels take (a GGUF's tied output head); `None`
    /// for weights stored as values.
    pub fn stored(
        input: usize,
        output: usize,
        vb: &VarBuilder,
    ) -> candle_core::Result<Option<Self>> {
        stored_format(input, output, vb)
            .map(|(format, name)| Self::from_blocks(vb, &name, format, (output, input), None))
            .transpose()
    }

    /// `weight` under `vb` (`output × input`) as the blocks its file stores it in, when it is
    /// stored quantized in a format the kernels take; `None` for weights stored as values.
    pub fn stored_blocks(
        input: usize,
        output: usize,
        vb: &VarBuilder,
    ) -> candle_core::Result<Option<QTensor>> {
        stored_format(input, output, vb)
            .map(|(format, name)| read_blocks(vb, &name, format, output, input))
            .transpose()
    }

    /// A layer over `weight` (`output × input`), quantized as asked (a quantized layer holds its
    /// own blocks; a dense one shares `weight`).
    pub fn from_weight(
        weight: Tensor,
        bias: Option<Tensor>,
        quantization: Quantization,
    ) -> candle_core::Result<Self> {
        let (_, input) = weight.dims2()?;
        let Some(format) = quantization.format(input) else {
            return Ok(Self::Dense(candle_nn::Linear::new(weight, bias)));
        };
        Self::from_qtensor(QTensor::quantize(&weight, format)?, bias)
    }

    /// A layer over quantized `weight` (`output × input`): repacked into tiles on the CPU where
    /// the kernels tile its format (the blocks are then dropped), kept as blocks otherwise.
    pub fn from_qtensor(weight: QTensor, bias: Option<Tensor>) -> candle_core::Result<Self> {
        if let Some(tiles) = crate::cpu::packed(&weight)? {
            return Ok(Self::Quantized {
                weight: QuantWeight::Tiles(Arc::new(tiles)),
                bias,
            });
        }
        Ok(Self::Quantized {
            weight: QuantWeight::Blocks(QMatMul::from_qtensor(weight)?),
            bias,
        })
    }

    /// `self`'s outputs followed by `other`'s as one layer over the same input, so that one
    /// product computes both (a gate and an up projection); `None` where they cannot share one
    /// (biases, different dtypes or block formats, candle's blocks, or rows that end inside a
    /// tile). Dense weights on the CPU are not copied together (the kernels multiply the parts
    /// where they lie, see [`Self::DenseStack`]); elsewhere they are concatenated.
    pub fn stacked(&self, other: &Self) -> candle_core::Result<Option<Self>> {
        if let (Some(a), Some(b)) = (self.dense_parts(), other.dense_parts()) {
            if a[0].dtype() != b[0].dtype() || a[0].dim(1)? != b[0].dim(1)? {
                return Ok(None);
            }
            let parts: Vec<Tensor> = a.into_iter().chain(b).cloned().collect();
            if parts.iter().all(|w| w.device().is_cpu()) {
                return Ok(Some(Self::DenseStack(parts)));
            }
            let weight = Tensor::cat(&parts, 0)?;
            return Ok(Some(Self::Dense(candle_nn::Linear::new(weight, None))));
        }
        Ok(match (self, other) {
            (
                Self::Quantized {
                    weight: QuantWeight::Tiles(a),
                    bias: None,
                },
                Self::Quantized {
                    weight: QuantWeight::Tiles(b),
                    bias: None,
                },
            ) => a.stacked(b).map(|t| Self::Quantized {
                weight: QuantWeight::Tiles(Arc::new(t)),
                bias: None,
            }),
            _ => None,
        })
    }

    /// The dense weights, part by part, of a layer with no bias; `None` for quantized layers.
    fn dense_parts(&self) -> Option<Vec<&Tensor>> {
        match self {
            Self::Dense(l) if l.bias().is_none() => Some(vec![l.weight()]),
            Self::DenseStack(parts) => Some(parts.iter().collect()),
            _ => None,
        }
    }

    /// The kernels' tiles, for a layer that holds them and no bias.
    pub fn tiles(&self) -> Option<&PackedMatrix> {
        match self {
            Self::Quantized {
                weight: QuantWeight::Tiles(t),
                bias: None,
            } => Some(t),
            _ => None,
        }
    }

    /// Whether the weights are block-quantized.
    pub fn is_quantized(&self) -> bool {
        matches!(self, Self::Quantized { .. })
    }

    /// Bytes its weights take.
    pub fn weight_bytes(&self) -> usize {
        match self {
            Self::Dense(l) => l.weight().elem_count() * l.weight().dtype().size_in_bytes(),
            Self::DenseStack(parts) => parts
                .iter()
                .map(|w| w.elem_count() * w.dtype().size_in_bytes())
                .sum(),
            Self::Quantized { weight, .. } => match weight {
                QuantWeight::Tiles(t) => t.size_in_bytes(),
                QuantWeight::Blocks(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
                QuantWeight::Blocks(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                    t.elem_count() * t.dtype().size_in_bytes()
                }
            },
        }
    }
}

/// The format `vb`'s file stores `weight` (`output × input`) in, when it stores it as blocks the
/// kernels take, and the name `vb` hands those bytes out under.
fn stored_format(input: usize, output: usize, vb: &VarBuilder) -> Option<(GgmlDType, String)> {
    STORED_FORMATS.into_iter().find_map(|format| {
        let name = crate::weights::stored_name("weight", format, output, input);
        vb.contains_tensor(&name).then_some((format, name))
    })
}

/// `output × input` weights in `format` blocks, which `vb` hands out as bytes under `name`.
fn read_blocks(
    vb: &VarBuilder,
    name: &str,
    format: GgmlDType,
    output: usize,
    input: usize,
) -> candle_core::Result<QTensor> {
    let raw = raw_blocks(vb, name, format, output, input)?;
    qtensor(&raw, vb, format, output, input)
}

/// The bytes of `name`'s `output × input` `format` blocks under `vb`, as a `U8` tensor.
fn raw_blocks(
    vb: &VarBuilder,
    name: &str,
    format: GgmlDType,
    output: usize,
    input: usize,
) -> candle_core::Result<Tensor> {
    let bytes = format.type_size() * output * input / format.block_size();
    vb.get_with_hints_dtype(bytes, name, Default::default(), DType::U8)
}

/// `raw` (the blocks' bytes) as an `output × input` `QTensor` on `vb`'s device.
fn qtensor(
    raw: &Tensor,
    vb: &VarBuilder,
    format: GgmlDType,
    output: usize,
    input: usize,
) -> candle_core::Result<QTensor> {
    let storage = QStorage::from_data(Cow::Owned(raw.to_vec1::<u8>()?), vb.device(), format)?;
    QTensor::new(storage, (output, input))
}

/// `y + b`, the bias broadcast over rows.
fn with_bias(y: Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let op = match self {
            Self::Dense(_) | Self::DenseStack(_) => crate::profile::Op::DenseLinear,
            Self::Quantized { .. } => crate::profile::Op::QuantizedLinear,
        };
        let _timed = crate::profile::PROFILE.scope(op);
        match self {
            Self::Dense(l) => {
                // The engine's own kernels on the CPU (candle has no bf16 matrix kernel and a
                // slow matrix-vector product), and on a GPU for a decode step's few rows;
                // candle elsewhere.
                let y = match l.bias() {
                    Some(b) => crate::cpu::biased_linear(x, l.weight(), b)?,
                    None => crate::cpu::linear(x, l.weight())?,
                };
                if let Some(y) = y {
                    return Ok(y);
                }
                #[cfg(feature = "cuda")]
                if let Some(y) = crate::cuda::gemv::linear(x, l.weight())? {
                    return with_bias(y, l.bias());
                }
                l.forward(x)
            }
            Self::DenseStack(parts) => {
                let parts: Vec<&Tensor> = parts.iter().collect();
                if let Some(y) = crate::cpu::linear_stacked(x, &parts)? {
                    return Ok(y);
                }
                // Not reached for CPU tensors of a dtype the kernels take; candle otherwise.
                candle_nn::Linear::new(Tensor::cat(&parts, 0)?, None).forward(x)
            }
            Self::Quantized {
                weight: QuantWeight::Tiles(tiles),
                bias,
            } => with_bias(crate::cpu::tiled_linear(x, tiles)?, bias.as_ref()),
            Self::Quantized {
                weight: QuantWeight::Blocks(weight),
                bias,
            } => {
                if let QMatMul::QTensor(q) = weight {
                    if let Some(y) = crate::cpu::quantized_linear(x, q)? {
                        return with_bias(y, bias.as_ref());
                    }
                }
                // The quantized kernels take f32 activations.
                let y = weight
                    .forward(&x.to_dtype(DType::F32)?.contiguous()?)?
                    .to_dtype(x.dtype())?;
                with_bias(y, bias.as_ref())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::normal;
    use candle_core::Device;
    use std::collections::HashMap;

    fn relative_error(q: Quantization, input: usize) -> f32 {
        let device = Device::Cpu;
        let w = normal(0.0, 1.0, (64, input), &device, 1);
        let x = normal(0.0, 1.0, (3, input), &device, 2);
        let vb = VarBuilder::from_tensors(
            HashMap::from([("weight".to_string(), w.clone())]),
            DType::F32,
            &device,
        );
        let layer = Linear::load(input, 64, false, q, vb).unwrap();
        let exact = x.matmul(&w.t().unwrap()).unwrap();
        let got = layer.forward(&x).unwrap();
        let err = (got - &exact)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap();
        let norm = exact.sqr().unwrap().sum_all().unwrap().sqrt().unwrap();
        (err / norm).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn quantized_products_stay_close_to_the_exact_ones() {
        // ggml's formats on Gaussian weights: Q8_0 ~0.5%, Q4_K ~9%, Q4_0 ~11% relative error of
        // the product (each a round-off of uniform width over the block's range).
        assert!(relative_error(Quantization::Q8, 512) < 0.01);
        assert!(relative_error(Quantization::Q4, 512) < 0.15);
        assert!(relative_error(Quantization::Q4, 96) < 0.15);
        // Too narrow to block: kept dense, so only the summation order differs.
        assert!(relative_error(Quantization::Q8, 48) < 1e-6);
    }

    #[test]
    fn quantized_layers_hold_tiles_no_larger_than_their_blocks() {
        let device = Device::Cpu;
        // Q8_0, Q4_K, and Q4_0 (rows not a multiple of 256 wide): bytes of a row's blocks.
        for (q, width, blocks) in [
            (Quantization::Q8, 256, 34 * 8),
            (Quantization::Q4, 256, 144),
            (Quantization::Q4, 96, 18 * 3),
        ] {
            let w = normal(0.0, 1.0, (32, width), &device, width as u64);
            let layer = Linear::from_weight(w, None, q).unwrap();
            assert!(
                matches!(
                    &layer,
                    Linear::Quantized {
                        weight: QuantWeight::Tiles(_),
                        ..
                    }
                ),
                "{q:?}: {layer:?}"
            );
            let bytes = layer.weight_bytes();
            assert!(
                bytes >= 32 * blocks && bytes <= 32 * blocks * 21 / 20,
                "{q:?}: {bytes}"
            );
        }
    }

    /// Dense layers stacked on the CPU keep their own tensors (no copy) and compute what the
    /// concatenated weights compute, bit for bit, for decode's rows and prefill's.
    #[test]
    fn stacked_dense_layers_keep_their_tensors_and_compute_the_copy() {
        let device = Device::Cpu;
        for dtype in [DType::F32, DType::BF16] {
            let w = |rows, seed| {
                normal(0.0, 1.0, (rows, 64), &device, seed)
                    .to_dtype(dtype)
                    .unwrap()
            };
            let layer = |w: &Tensor| Linear::Dense(candle_nn::Linear::new(w.clone(), None));
            let (a, b, c) = (w(48, 1), w(20, 2), w(20, 3));
            let stack = layer(&a).stacked(&layer(&b)).unwrap().unwrap();
            let stack = stack.stacked(&layer(&c)).unwrap().unwrap();
            let Linear::DenseStack(parts) = &stack else {
                panic!("{dtype:?}: copied into {stack:?}");
            };
            let ids: Vec<_> = parts.iter().map(Tensor::id).collect();
            assert_eq!(ids, [a.id(), b.id(), c.id()], "{dtype:?}");
            assert_eq!(stack.weight_bytes(), 88 * 64 * dtype.size_in_bytes());
            let copy = layer(&Tensor::cat(&[&a, &b, &c], 0).unwrap());
            for rows in [1, 40] {
                let x = normal(0.0, 1.0, (1, rows, 64), &device, 9)
                    .to_dtype(dtype)
                    .unwrap();
                let bits = |l: &Linear| {
                    let y = l.forward(&x).unwrap().to_dtype(DType::F32).unwrap();
                    let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    y.into_iter().map(f32::to_bits).collect::<Vec<_>>()
                };
                assert_eq!(bits(&stack), bits(&copy), "{dtype:?}, {rows} rows");
            }
        }
    }

    /// A bias added into the product's output (f32) or after it (bf16) gives what adding it to
    /// the product's tensor gives, bit for bit.
    #[test]
    fn biased_layers_add_their_bias_exactly() {
        let device = Device::Cpu;
        for dtype in [DType::F32, DType::BF16] {
            let w = normal(0.0, 1.0, (24, 64), &device, 1)
                .to_dtype(dtype)
                .unwrap();
            let b = normal(0.0, 1.0, 24, &device, 2).to_dtype(dtype).unwrap();
            let biased = Linear::Dense(candle_nn::Linear::new(w.clone(), Some(b.clone())));
            let plain = Linear::Dense(candle_nn::Linear::new(w, None));
            for rows in [1, 40] {
                let x = normal(0.0, 1.0, (1, rows, 64), &device, 3)
                    .to_dtype(dtype)
                    .unwrap();
                let want = plain.forward(&x).unwrap().broadcast_add(&b).unwrap();
                let bits = |y: Tensor| {
                    let y = y.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
                    let y = y.to_vec1::<f32>().unwrap();
                    y.into_iter().map(f32::to_bits).collect::<Vec<_>>()
                };
                assert_eq!(
                    bits(biased.forward(&x).unwrap()),
                    bits(want),
                    "{dtype:?}, {rows} rows"
                );
            }
        }
    }

    #[test]
    fn formats_follow_the_row_width() {
        assert_eq!(Quantization::Q4.format(2048), Some(GgmlDType::Q4K));
        assert_eq!(Quantization::Q4.format(96), Some(GgmlDType::Q4_0));
        assert_eq!(Quantization::Q8.format(768), Some(GgmlDType::Q8_0));
        assert_eq!(Quantization::Q8.format(48), None);
        assert_eq!(Quantization::None.format(4096), None);
    }

    fn resident_bytes() -> usize {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<usize>()
            .unwrap()
            * 1024
    }

    /// A quantized weight multiplies on its compact blocks: no second copy appears when it runs
    /// (candle's `QMatMul` on x86 adds expanded tiles at least as large as the blocks).
    #[test]
    fn quantized_products_keep_no_second_copy_of_the_weight() {
        let device = Device::Cpu;
        let w = normal(0.0, 1.0, (8192, 4096), &device, 3);
        let layer = Linear::from_weight(w, None, Quantization::Q4).unwrap();
        let blocks = layer.weight_bytes();
        assert!(blocks >= 18 << 20, "{blocks}");
        let x = normal(0.0, 1.0, (1, 1, 4096), &device, 4);
        let before = resident_bytes();
        for _ in 0..3 {
            layer.forward(&x).unwrap();
        }
        let grown = resident_bytes().saturating_sub(before);
        assert!(
            grown < blocks / 2,
            "running the layer added {grown} bytes beside {blocks} of blocks"
        );
    }
}
